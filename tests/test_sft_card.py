"""sft.card_preset: on a GPU the fast settings sized by the card replace the configured ones without changing
what is trained (the same samples per optimizer step; tests/test_card_settings.py: each card size); without a GPU
nothing changes. sft.compile_precision=eager: the
compiled blocks round as eager does."""
import logging

import pytest
import torch

from conftest import compose_cfg
from test_card_settings import card  # noqa: F401  (the faked card)
from flare_exp.stages.sft_card import apply_card_preset, card_changes, largest_card_choice, split_batch


@pytest.mark.parametrize("effective, split", [(16, (16, 1)), (4, (4, 1)), (32, (16, 2)), (12, (12, 1)),
                                              (18, (9, 2)), (17, (1, 17)), (1, (1, 1))])
def test_the_effective_batch_is_kept(effective, split):
    assert split_batch(effective) == split


def _cfg(base_overrides, *extra):
    return compose_cfg(["stage=sft", *base_overrides, "model.gradient_checkpointing=true",
                        "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=4", *extra])


def test_a_large_card_gets_the_fast_settings_for_the_same_batch(base_overrides, card, caplog):
    caplog.set_level(logging.INFO, logger="flare_exp")
    card["gib"] = 141
    cfg = _cfg(base_overrides)
    used, changed, name, _ = apply_card_preset(cfg)
    assert str(name) == "NVIDIA FAKE (141 GiB, total)"
    assert (used.sft.per_device_train_batch_size, used.sft.gradient_accumulation_steps) == (16, 1)
    assert used.sft.recompute_above_tokens == 12000 and used.sft.compile_layers is True
    assert changed["sft.per_device_train_batch_size"] == [4, 16] and changed["sft.compile_layers"] == [False, True]
    assert (cfg.sft.per_device_train_batch_size, cfg.sft.compile_layers) == (4, False)  # the configured: kept
    assert "sft.per_device_train_batch_size 4 -> 16" in caplog.text and "the same 16 samples" in caplog.text
    with pytest.raises(Exception):
        used.sft.per_device_train_batchsize = 3  # still the checked config: a typo is refused
    liger = card_changes(cfg, largest_card_choice(16), liger_installed=True)
    assert liger["model.liger_kernel"] == (False, True)
    assert "model.liger_kernel" not in card_changes(cfg, largest_card_choice(16), liger_installed=False)


def test_what_was_set_already_stays(base_overrides, card):
    cfg = _cfg(base_overrides, "sft.per_device_train_batch_size=16", "sft.gradient_accumulation_steps=2",
               "sft.recompute_above_tokens=5000", "sft.compile_layers=true")
    assert card_changes(cfg, largest_card_choice(32), liger_installed=False) == {}
    no_ckpt = _cfg(base_overrides, "model.gradient_checkpointing=false")
    assert "sft.recompute_above_tokens" not in card_changes(no_ckpt, largest_card_choice(16), liger_installed=False)


@pytest.mark.parametrize("extra", [["sft.card_preset=none"], ["model.backend=unsloth"]])
def test_unsloth_and_none_keep_the_configured_values(base_overrides, card, extra):
    cfg = _cfg(base_overrides, *extra)
    used, changed, _, _ = apply_card_preset(cfg)
    assert used is cfg and changed == {}


def test_large_forces_it_and_needs_a_gpu(base_overrides, card, monkeypatch):
    from flare_exp.stages.sft import check_settings

    card["gib"] = 80
    used, changed, name, why = apply_card_preset(_cfg(base_overrides, "sft.card_preset=large"))
    assert name.gib == 80 and used.sft.per_device_train_batch_size == 16 and used.sft.recompute_above_tokens == 12000
    assert why.endswith("sft.card_preset=large")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sft.card_preset=large.*need a CUDA GPU"):  # with the other settings
        check_settings(_cfg(base_overrides, "sft.card_preset=large"))
    used, changed, name, _ = apply_card_preset(_cfg(base_overrides))  # auto without a GPU
    assert changed == {} and name is None


def test_the_choices_are_checked(base_overrides):
    from flare_exp.stages import sft

    for key in ("sft.card_preset", "sft.compile_precision"):
        with pytest.raises(ValueError, match=key):
            sft.check_settings(_cfg(base_overrides, f"{key}=fastest"))


@pytest.mark.slow  # inductor's C++ code generation on the CPU (~25 s)
def test_compiled_blocks_round_as_eager_does():
    """A bf16 block whose fused form would skip eager's rounding between two ops: precision=eager gives eager's
    result bit for bit, fused another one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from flare_exp.models.loading import compile_repeated_blocks

    class Block(GradientCheckpointingLayer):
        def forward(self, x):
            y = x * 1.0009765625 + 0.0001
            return (y * y).sum(-1)

    torch.manual_seed(0)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    eager = Block()(x)
    results = {}
    for precision in ("eager", "fused"):
        torch._dynamo.reset()
        holder = torch.nn.Sequential(Block())
        assert compile_repeated_blocks(holder, "inductor", precision) == 1
        results[precision] = holder(x)
    assert torch.equal(results["eager"], eager)
    assert not torch.equal(results["fused"], eager)



def test_the_run_records_the_config_that_trained_and_resumes_on_another_card(base_overrides, card, tmp_path):
    """config.yaml is what sft ran with (the card's sizing applied; run_info.json says what it changed from the
    configured values), while the fingerprint keeps the configured values: the same command resumes on another
    card, and a changed setting of the user's is still refused."""
    import json

    from omegaconf import OmegaConf

    from flare_exp.run.fingerprint import RunSettingsChangedError
    from flare_exp.run.lifecycle import Run

    card["gib"] = 141
    ran = []
    with Run(_cfg(base_overrides), "sft", tmp_path) as run:
        configured = run.configured.sft.per_device_train_batch_size
        ran.append(run.cfg.sft.per_device_train_batch_size)
    recorded = OmegaConf.load(tmp_path / "config.yaml")
    assert (configured, ran[0], recorded.sft.per_device_train_batch_size) == (4, 16, 16)
    assert recorded.sft.gradient_accumulation_steps == 1 and recorded.sft.compile_layers is True
    applied = json.loads((tmp_path / "run_info.json").read_text())["applied"]
    assert applied["changed"]["sft.per_device_train_batch_size"] == [4, 16] and applied["preset"] == "auto"
    fingerprint = json.loads((tmp_path / "fingerprint.json").read_text())["settings"]
    assert (fingerprint["sft.per_device_train_batch_size"], fingerprint["sft.gradient_accumulation_steps"]) == (4, 4)
    (tmp_path / "checkpoint-1").mkdir()  # the attempt left a checkpoint: the next one resumes from it
    card["gib"] = 24
    with Run(_cfg(base_overrides), "sft", tmp_path) as run:  # the same command on a smaller card: resumes
        assert run.applied["changed"]["sft.per_device_train_batch_size"] == [4, 16]
    with pytest.raises(RunSettingsChangedError, match="sft.gradient_accumulation_steps: 4 -> 2"):
        with Run(_cfg(base_overrides, "sft.gradient_accumulation_steps=2"), "sft", tmp_path):
            pass
