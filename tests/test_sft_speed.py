"""SFT speed settings that must not change the numbers. sft.rope_positions=collator: the collator computes
Qwen3-VL's multimodal rope positions on the CPU with the model's own code, and the forward given them computes
the same loss and gradients as when it builds them itself. The vision tower reads its image layout once per
forward. sft.recompute_above_tokens: only batches over the budget recompute, to the same losses."""
import json

import torch

from conftest import compose_cfg
from flare_exp.data.vision import SFTCollator, VisionChat
from flare_exp.io import read_jsonl


def _padded_batch(loaded, demo_prepared):
    records = read_jsonl(demo_prepared / "train.jsonl")
    picked = [next(r for r in records if r["dataset"] == name)
              for name in ("IU_XRay", "periapical", "boneresorption", "IU_XRay")]
    return VisionChat(loaded.processor, demo_prepared.parent / "raw"), picked


def test_collator_positions_are_the_models_own_and_train_the_same(base_overrides, demo_prepared):
    from flare_exp.models.loading import load_model
    from flare_exp.models.rope_positions import host_rope_index, rope_index, rope_owner

    cfg = compose_cfg(["stage=sft", *base_overrides, "model.dtype=float32"])
    torch.manual_seed(0)
    loaded = load_model(cfg.model, training=True)
    model = loaded.model
    chat, picked = _padded_batch(loaded, demo_prepared)
    plain = SFTCollator(chat)(picked)
    assert "position_ids" not in plain and len({int(m.sum()) for m in plain["attention_mask"]}) > 1
    rope = host_rope_index(model, "collator", sample_batch=plain)
    assert rope is not None and host_rope_index(model, "model", sample_batch=plain) is None
    batch = SFTCollator(chat, rope)(picked)
    own = rope_index(rope_owner(model).get_rope_index, plain)
    assert torch.equal(batch["position_ids"], own)
    assert batch["position_ids"].shape == (3, *plain["input_ids"].shape)
    # the image tokens get 2-D (height, width) positions: not the plain 0..n text positions
    assert not torch.equal(batch["position_ids"][1], batch["position_ids"][2])

    def loss_and_grads(inputs):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    own_loss, own_grads = loss_and_grads(plain)
    host_loss, host_grads = loss_and_grads(batch)
    assert torch.equal(host_loss, own_loss)
    assert own_grads and all(torch.equal(host_grads[n], g) for n, g in own_grads.items())
    # and the forward uses what it is handed: height and width swapped give another loss (a uniform shift
    # would not: rotary attention sees position differences only)
    swapped = dict(batch, position_ids=batch["position_ids"][[0, 2, 1]])
    assert not torch.allclose(loss_and_grads(swapped)[0], own_loss)


def test_the_stage_passes_the_positions_and_checks_its_choice(base_overrides, tmp_path, monkeypatch):
    from flare_exp.main import run
    from flare_exp.stages import sft

    seen = []
    original = sft.SFTCollator.__call__
    monkeypatch.setattr(sft.SFTCollator, "__call__", lambda self, r: (b := original(self, r), seen.append(
        "position_ids" in b))[0])
    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=1", "sft.eval_steps=0",
                       "sft.dataloader_num_workers=0"])
    run(cfg, run_dir=tmp_path / "run")
    assert seen[0] is False  # the plain batch the collator's positions are checked against at setup
    assert seen[1:] and all(seen[1:])  # every batch the Trainer drew came with its positions
    bad = compose_cfg(["stage=sft", *base_overrides, "sft.rope_positions=gpu"])
    try:
        sft.check_settings(bad)
    except ValueError as e:
        assert "sft.rope_positions" in str(e) and "collator" in str(e)
    else:
        raise AssertionError("an unknown sft.rope_positions was accepted")


def test_the_vision_tower_reads_its_image_layout_once_per_forward():
    from flare_exp.models.vision_encoder import image_lengths

    cu = torch.tensor([0, 16, 48, 64], dtype=torch.int32)
    first = image_lengths(cu)
    assert first == [16, 32, 16] and image_lengths(cu) is first  # the next blocks reuse it
    other = torch.tensor([0, 16, 48, 64], dtype=torch.int32)  # a new forward's tensor, even with equal values
    assert image_lengths(other) == first and image_lengths(other) is not first
    assert image_lengths(torch.tensor([0, 4], dtype=torch.int32)) == [4]


def _layer_calls_and_summary(base_overrides, tmp_path, monkeypatch, above_tokens: int, name: str):
    """Train 2 steps with recomputation switched on; count the calls of one text decoder layer (a recomputed
    batch calls it twice: forward, then again in backward)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

    from flare_exp.main import run
    from flare_exp.stages import sft

    calls, original = [], sft.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        layer = next(m for m in trainer.model.modules() if isinstance(m, Qwen3VLTextDecoderLayer))
        layer.register_forward_pre_hook(lambda *hook_args: calls.append(1))  # the recomputation stops early: no post-hook
        return trainer

    monkeypatch.setattr(sft, "build_trainer", build)
    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=2", "sft.eval_steps=0", "sft.logging_steps=1",
                       "sft.per_device_train_batch_size=2", "sft.gradient_accumulation_steps=1",
                       "sft.dataloader_num_workers=0", "model.gradient_checkpointing=true",
                       f"sft.recompute_above_tokens={above_tokens}", "model.dtype=float32"])
    run(cfg, run_dir=tmp_path / name)
    return len(calls), json.loads((tmp_path / name / "sft_summary.json").read_text())


def test_only_batches_over_the_token_budget_recompute(base_overrides, tmp_path, monkeypatch):
    always_calls, always = _layer_calls_and_summary(base_overrides, tmp_path, monkeypatch, 0, "always")
    tight_calls, tight = _layer_calls_and_summary(base_overrides, tmp_path, monkeypatch, 1, "tight")
    roomy_calls, roomy = _layer_calls_and_summary(base_overrides, tmp_path, monkeypatch, 10 ** 6, "roomy")
    assert always_calls == tight_calls == 4 and tight["recomputed_batches"] == 2  # forward + recomputation
    assert roomy_calls == 2 and roomy["recomputed_batches"] == 0  # forward only: activations kept
    assert "recomputed_batches" not in always
    assert always["card_preset"] == {"preset": "auto", "card": None, "changed": {}, "why": "no GPU: as configured"}
    # recomputation changes memory, not numbers
    assert always["first_loss"] == tight["first_loss"] == roomy["first_loss"]
    assert always["last_loss"] == tight["last_loss"] == roomy["last_loss"]


def test_the_token_budget_is_checked(base_overrides):
    from flare_exp.stages import sft

    for overrides, words in ((["sft.recompute_above_tokens=-5"], "a token count"),
                             (["sft.recompute_above_tokens=9000", "model.backend=unsloth"], "model.backend=hf")):
        try:
            sft.check_settings(compose_cfg(["stage=sft", *base_overrides, *overrides]))
        except ValueError as e:
            assert words in str(e) and "sft.recompute_above_tokens" in str(e)
        else:
            raise AssertionError(f"{overrides} accepted")


def test_out_of_memory_under_a_token_budget_names_it(base_overrides):
    from flare_exp.stages.sft import oom_remedies

    budget = compose_cfg(["stage=sft", *base_overrides, "model.gradient_checkpointing=true",
                          "sft.recompute_above_tokens=12000"])
    assert any("lower sft.recompute_above_tokens=12000" in r for r in oom_remedies(budget))
    plain = compose_cfg(["stage=sft", *base_overrides, "model.gradient_checkpointing=true"])
    assert not any("recompute_above_tokens" in r for r in oom_remedies(plain))
    preset = oom_remedies(budget, {"sft.per_device_train_batch_size": [4, 16]})
    assert preset[0].startswith("pass sft.card_preset=none (it set sft.per_device_train_batch_size=16")
