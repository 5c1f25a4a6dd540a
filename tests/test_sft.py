import json
import shutil
import sys

import pytest
import torch

from conftest import compose_cfg
from flare_exp.data.vision import VisionChat
from flare_exp.io import read_jsonl
from flare_exp.main import run


def _sft_cfg(base_overrides, *extra):
    return compose_cfg(["stage=sft", *base_overrides, "sft.logging_steps=1", *extra])


def test_labels_cover_only_the_answer(tiny_model_dir, demo_prepared):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    records = read_jsonl(demo_prepared / "train.jsonl")
    picked = [records[0], next(r for r in records if r["dataset"] == "periapical")]
    chat = VisionChat(processor, demo_prepared.parent / "raw")
    batch = chat.sft_batch(picked)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i, r in enumerate(picked):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert processor.tokenizer.decode(ids[labels != -100]) == r["answer"] + "<|im_end|>\n"
        assert not (labels[ids == image_id] != -100).any()
        assert (labels[batch["attention_mask"][i] == 0] == -100).all()
        prompt_len = int(batch["attention_mask"][i].sum()) - int((labels != -100).sum())
        assert processor.tokenizer.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")
        assert chat.sequence_length(r) == int(batch["attention_mask"][i].sum())


def test_sft_writes_an_adapter_the_model_layer_loads(base_overrides, tmp_path):
    from flare_exp.models.loading import load_model

    cfg = _sft_cfg(base_overrides, "sft.max_steps=2", "sft.save_steps=2", "sft.eval_steps=2")
    summary = run(cfg, run_dir=tmp_path / "sft")
    final = tmp_path / "sft" / "final"
    assert (final / "adapter_config.json").exists() and (final / "flare_exp_checkpoint.json").exists()
    meta = json.loads((final / "flare_exp_checkpoint.json").read_text())
    assert "sft:" in meta["config_yaml"] and meta["data"][0]["sha256"]
    assert (tmp_path / "sft" / "checkpoint-2" / "flare_exp_checkpoint.json").exists()
    assert summary["global_step"] == 2
    loaded = load_model(cfg.model, init_from=str(tmp_path / "sft"), training=False)
    assert loaded.adapter == final
    chat = VisionChat(loaded.processor, cfg.data.root)
    batch = chat.generation_batch(read_jsonl(cfg.sft.train_file)[:2])
    out = loaded.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert "unsloth" not in sys.modules  # the hf backend never imports Unsloth


def test_overfitting_four_samples_lowers_the_loss(base_overrides, tmp_path, demo_prepared):
    four = read_jsonl(demo_prepared / "train.jsonl")[:4]
    (tmp_path / "four.jsonl").write_text("".join(json.dumps(r) + "\n" for r in four))
    cfg = _sft_cfg(base_overrides, f"sft.train_file={tmp_path / 'four.jsonl'}", "sft.val_file=null",
                   "sft.max_steps=30", "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=1",
                   "sft.learning_rate=2e-2", "sft.warmup_ratio=0", "sft.save_steps=100", "model.lora.modules_to_save=[lm_head]")
    summary = run(cfg, run_dir=tmp_path / "sft")
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary


def test_resume_continues_from_the_last_checkpoint(base_overrides, tmp_path, caplog):
    run_dir = tmp_path / "sft"
    common = ["sft.save_steps=2", "sft.eval_steps=0", "sft.warmup_ratio=0", "sft.save_total_limit=null"]
    first = run(_sft_cfg(base_overrides, "sft.max_steps=2", *common), run_dir=run_dir)
    assert first["global_step"] == 2
    # Simulate a job preempted after checkpoint-2: no final adapter, no DONE marker.
    shutil.rmtree(run_dir / "final")
    (run_dir / "DONE").unlink()
    state_before = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    with caplog.at_level("WARNING"):
        second = run(_sft_cfg(base_overrides, "sft.max_steps=4", *common), run_dir=run_dir)
    assert second["global_step"] == 4
    # the optimizer the checkpoint holds runs step 3 at the old curve's rate (its end: 0); the new curve from 4
    rates = {h["step"]: h["learning_rate"] for h in json.loads((run_dir / "log_history.json").read_text())
             if "learning_rate" in h}
    assert rates[3] == 0 and rates[4] > 0, rates
    assert "so from step 4 the rate follows the new curve (step 3 still runs at the rate" in caplog.text
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come from the first job, 3-4 from the resumed one
    assert state["log_history"][0] == state_before["log_history"][0]
    # a budget changed on resume lays the learning-rate schedule out anew: said and on record
    changed = {"max_steps_before": 2, "max_steps_after": 4}
    assert {"step": 2, "schedule_changed": changed} in json.loads((run_dir / "log_history.json").read_text())
    final_meta = json.loads((run_dir / "final" / "flare_exp_checkpoint.json").read_text())
    assert final_meta["schedule_changed"] == [{"step": 2, "schedule_changed": changed}]
    assert second["schedule_changed"] == final_meta["schedule_changed"]  # and in sft_summary.json
    # in the trainer state of the checkpoints saved since: a second interruption and resume keeps it
    assert {"step": 2, "schedule_changed": changed} in state["log_history"]
    # a budget lowered below the newest checkpoint: the checkpoint at the budget is the end, not a longer run's
    shutil.rmtree(run_dir / "final")
    (run_dir / "DONE").unlink()
    third = run(_sft_cfg(base_overrides, "sft.max_steps=2", *common), run_dir=run_dir)
    assert third["global_step"] == 2
    assert (run_dir / "final" / "adapter_model.safetensors").read_bytes() == (
        run_dir / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    # the longer schedule's checkpoints moved to its attempt's record: none past this run's end stays beside final/
    assert not (run_dir / "checkpoint-4").exists() and not (run_dir / "checkpoint-3").exists()
    filed = max((run_dir / "attempts").iterdir(), key=lambda p: int(p.name))
    assert (filed / "checkpoint-4" / "trainer_state.json").is_file() and (filed / "config.yaml").is_file()


def test_a_resume_on_another_number_of_ranks_is_refused_naming_both(base_overrides, tmp_path):
    """A run started on 2 ranks and resumed on 1 (or the reverse) trained its remaining steps with half (twice)
    the samples per optimizer step, and its summary named only the new batch. Each checkpoint records what one
    step held; a resume that would hold another number is refused, saying how to continue."""
    from flare_exp.models.checkpoints import mark_complete
    from flare_exp.run.fingerprint import RunSettingsChangedError

    run_dir = tmp_path / "sft"
    common = ["sft.save_steps=2", "sft.eval_steps=0", "sft.per_device_train_batch_size=2",
              "sft.gradient_accumulation_steps=1"]
    run(_sft_cfg(base_overrides, "sft.max_steps=2", *common), run_dir=run_dir)
    meta_file = run_dir / "checkpoint-2" / "flare_exp_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    assert meta["step_shape"] == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "world_size": 1}
    shutil.rmtree(run_dir / "final")
    (run_dir / "DONE").unlink()
    meta["step_shape"]["world_size"] = 2  # as a 2-rank job's checkpoint
    meta_file.write_text(json.dumps(meta))
    mark_complete(run_dir / "checkpoint-2")
    with pytest.raises(RunSettingsChangedError, match=r"checkpoint-2 was trained with 4 samples per optimizer step "
                       r"\(2 per device x 1 accumulation x 2 rank\(s\)\); this launch gives 2 samples .* Resume it on 2 "
                       r"rank\(s\), as it started"):
        run(_sft_cfg(base_overrides, "sft.max_steps=4", *common), run_dir=run_dir)
    with pytest.raises(RunSettingsChangedError, match="Resume it on 2 rank"):  # at its budget: its summary too
        run(_sft_cfg(base_overrides, "sft.max_steps=2", *common), run_dir=run_dir)
    meta["step_shape"]["world_size"] = 1
    meta_file.write_text(json.dumps(meta))
    mark_complete(run_dir / "checkpoint-2")
    assert run(_sft_cfg(base_overrides, "sft.max_steps=2", *common), run_dir=run_dir)["global_step"] == 2


def test_resume_never_refuses_existing_checkpoints(base_overrides, tmp_path):
    run_dir = tmp_path / "sft"
    run(_sft_cfg(base_overrides, "sft.max_steps=2", "sft.save_steps=2", "sft.eval_steps=0"), run_dir=run_dir)
    (run_dir / "DONE").unlink()
    config = (run_dir / "config.yaml").read_text()
    from flare_exp.run.fingerprint import RunSettingsChangedError  # said in one line, as other refusals

    with pytest.raises(RunSettingsChangedError, match=r"\(checkpoint-2\) and resume=never: .* overwrite=true"):
        run(_sft_cfg(base_overrides, "sft.max_steps=2", "resume=never"), run_dir=run_dir)
    # refused before the run dir was touched (no model loaded, no FAILED, its record as it was)
    assert not (run_dir / "FAILED").exists() and (run_dir / "config.yaml").read_text() == config
    # a pipeline whose sft step left checkpoints: refused before its first step, its dirs untouched
    pipe = tmp_path / "pipe"
    shutil.copytree(run_dir, pipe / "sft")
    before = sorted(p.relative_to(pipe) for p in (pipe / "sft").rglob("*"))
    with pytest.raises(RunSettingsChangedError, match="resume=never"):
        run(compose_cfg([*base_overrides, "stage=pipeline", "stage.steps=[sft]", "sft.max_steps=2", "resume=never"]),
            run_dir=pipe)
    assert sorted(p.relative_to(pipe) for p in (pipe / "sft").rglob("*")) == before  # the step's dir untouched


def test_too_long_samples_are_skipped_or_refused(base_overrides, tmp_path):
    cfg = _sft_cfg(base_overrides, "sft.max_steps=1", "model.max_seq_length=60", "sft.eval_steps=0")
    summary = run(cfg, run_dir=tmp_path / "a")
    assert summary["skipped_too_long"] > 0
    assert json.loads((tmp_path / "a" / "too_long.json").read_text())["train"][0]["tokens"] > 60
    with pytest.raises(ValueError, match="model.max_seq_length=60"):
        run(_sft_cfg(base_overrides, "sft.max_steps=1", "model.max_seq_length=60", "sft.on_too_long=error"),
            run_dir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"^all \d+ training samples of .* are longer than model.max_seq_length=40, "
                                         r"e.g. .* none is left to train on"):  # was an IndexError in the tokenizer
        run(_sft_cfg(base_overrides, "sft.max_steps=1", "model.max_seq_length=40"), run_dir=tmp_path / "c")


def test_missing_model_names_the_key(base_overrides, tmp_path):
    cfg = compose_cfg(["stage=sft", *base_overrides, "experiment=flare", f"model.path={tmp_path / 'nope'}",
                       f"data.root={tmp_path}"])
    from flare_exp.models.loading import load_model

    with pytest.raises(FileNotFoundError, match=r"model.path=.*nope.*huggingface-cli download Qwen/Qwen3-VL-4B"):
        load_model(cfg.model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_unsloth_without_gpu_is_a_clear_error(base_overrides):
    from flare_exp.models.loading import load_model

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_model(compose_cfg([*base_overrides, "model.backend=unsloth"]).model)


def test_early_stopping_settings_are_checked(base_overrides, tmp_path):
    cfg = _sft_cfg(base_overrides, "sft.early_stopping_patience=2", "sft.save_steps=5", "sft.eval_steps=2")
    with pytest.raises(ValueError, match="multiple"):
        run(cfg, run_dir=tmp_path / "x")


def test_lora_switches_select_layers(tiny_model_dir):
    from omegaconf import OmegaConf
    from transformers import AutoModelForImageTextToText

    from flare_exp.config import LoraConfig
    from flare_exp.models.loading import lora_target_modules

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    cfg = OmegaConf.structured(LoraConfig)
    everything = lora_target_modules(model, cfg)
    assert any(".visual." in n for n in everything) and any("language_model" in n for n in everything)
    cfg.finetune_vision_layers = False
    cfg.finetune_mlp_modules = False
    language_attention = lora_target_modules(model, cfg)
    assert language_attention and all(".visual." not in n and "mlp" not in n for n in language_attention)


def test_overwrite_starts_fresh_instead_of_resuming_the_finished_run(base_overrides, tmp_path):
    from flare_exp.run.record import RunFinishedError

    run_dir = tmp_path / "sft"
    args = ["sft.max_steps=2", "sft.save_steps=2", "sft.eval_steps=0"]
    run(_sft_cfg(base_overrides, *args), run_dir=run_dir)
    with pytest.raises(RunFinishedError):
        run(_sft_cfg(base_overrides, *args), run_dir=run_dir)
    again = run(_sft_cfg(base_overrides, *args, "overwrite=true"), run_dir=run_dir)
    assert again["global_step"] == 2 and again["first_loss"] is not None  # trained again, from step 0


def test_sft_with_dataloader_workers(base_overrides, tmp_path):
    """Image loading and processing can move to DataLoader workers (the collator pickles)."""
    summary = run(_sft_cfg(base_overrides, "sft.max_steps=2", "sft.eval_steps=0", "sft.dataloader_num_workers=2"),
                  run_dir=tmp_path / "sft")
    assert summary["global_step"] == 2


def test_the_log_shows_how_long_training_waited_for_data(base_overrides, tmp_path, monkeypatch):
    import time

    from flare_exp.data.vision import SFTCollator

    original = SFTCollator.__call__

    def slow(self, records):
        time.sleep(0.3)  # a slow input pipeline, in the training process (no workers)
        return original(self, records)

    monkeypatch.setattr(SFTCollator, "__call__", slow)
    run(_sft_cfg(base_overrides, "sft.max_steps=3", "sft.eval_steps=0", "sft.dataloader_num_workers=0"),
        run_dir=tmp_path / "sft")
    history = [h for h in json.loads((tmp_path / "sft" / "log_history.json").read_text()) if "loss" in h]
    waits = [h["data_wait_seconds"] for h in history]
    assert len(waits) == 3 and waits[0] == 0 and min(waits[1:]) >= 0.3  # step 1 has no previous step to wait after


@pytest.mark.slow  # torch.compile of the blocks on the CPU
def test_compiled_blocks_train_to_the_same_losses(base_overrides, tmp_path, caplog):
    """Dynamo traces every LoRA block under gradient checkpointing, AOT autograd builds its backward; the
    aot_eager backend skips inductor's C++ code generation, which takes minutes on 2 CPU cores."""
    common = ("sft.max_steps=2", "sft.eval_steps=0", "model.gradient_checkpointing=true",
              "sft.compile_backend=aot_eager")
    caplog.set_level("INFO", logger="flare_exp.stages.sft")
    losses = {}
    for compiled in ("false", "true"):
        run(_sft_cfg(base_overrides, *common, f"sft.compile_layers={compiled}"), run_dir=tmp_path / compiled)
        history = json.loads((tmp_path / compiled / "log_history.json").read_text())
        losses[compiled] = [h["loss"] for h in history if "loss" in h]
    import re

    from torch._dynamo.utils import counters

    compiled = re.search(r"sft.compile_layers: (\d+) blocks compiled", caplog.text)
    assert compiled and int(compiled.group(1)) >= 4 and counters["stats"]["unique_graphs"] > 0
    assert len(losses["true"]) == 2 and losses["true"] == pytest.approx(losses["false"], abs=1e-4)


def test_compile_layers_default_and_failure(base_overrides, tmp_path, monkeypatch, caplog):
    """Off by default (card_preset turns it on on large cards); on a GPU, inductor's fused precision says what an
    H200 showed; a compilation failure names the setting that avoids it."""
    import types

    import torch._dynamo.exc
    from transformers import Trainer

    from flare_exp.stages.sft import compile_layers

    sft = compose_cfg(["stage=sft"]).sft
    assert sft.compile_layers is False and sft.compile_precision == "eager"

    def settings(on=True, precision="eager"):
        return types.SimpleNamespace(compile_layers=on, compile_backend="inductor", compile_precision=precision)

    assert compile_layers(settings(), "hf") and not compile_layers(settings(False), "hf")
    assert not compile_layers(settings(), "unsloth") and "Unsloth compiles its own blocks" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compile_layers(settings(), "hf") and "train to other losses" not in caplog.text
    assert compile_layers(settings(precision="fused"), "hf") and "train to other losses" in caplog.text
    monkeypatch.undo()

    def fails(*_, **__):
        raise torch._dynamo.exc.TorchRuntimeError("inductor could not build a kernel")

    monkeypatch.setattr(Trainer, "train", fails)
    with pytest.raises(RuntimeError, match="rerun with sft.compile_layers=false"):
        run(_sft_cfg(base_overrides, "sft.max_steps=1", "sft.compile_layers=true", "sft.compile_backend=eager"),
            run_dir=tmp_path / "compiled")
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError):  # not compiled: the error as it is
        run(_sft_cfg(base_overrides, "sft.max_steps=1", "overwrite=true"), run_dir=tmp_path / "plain")


def test_group_by_length_batches_similar_lengths(base_overrides, tmp_path, monkeypatch):
    """sft.group_by_length=true: the Trainer draws batches of similar token counts from the measured lengths
    (the demo mixes ~80-token one-view samples with longer two-view ones), and training runs."""
    import flare_exp.stages.sft as sft_stage
    from flare_exp.main import run

    batches = []
    original = sft_stage.SFTCollator.__call__
    monkeypatch.setattr(sft_stage.SFTCollator, "__call__",
                        lambda self, records: (batches.append([self.chat.sequence_length(r) for r in records]),
                                               original(self, records))[1])

    def padding(group: bool) -> float:
        batches.clear()
        run(compose_cfg(["stage=sft", *base_overrides, f"sft.group_by_length={str(group).lower()}",
                         "sft.max_steps=8", "sft.per_device_train_batch_size=4", "sft.eval_steps=0",
                         "sft.save_steps=100", f"run_name=group-{group}"]), run_dir=tmp_path / f"g{group}")
        train = [b for b in batches if len(b) == 4][:8]
        return sum(max(b) * len(b) - sum(b) for b in train) / sum(max(b) * len(b) for b in train)

    grouped, shuffled = padding(True), padding(False)
    assert grouped < shuffled / 2, (grouped, shuffled)


def test_out_of_gpu_memory_says_what_to_lower_and_the_rerun_resumes(base_overrides, tmp_path, monkeypatch):
    """An OOM in step 2 (after checkpoint-1) names the keys to lower and where a rerun continues; the rerun
    with the same run dir does continue from there."""
    from transformers import Trainer

    original = Trainer.training_step

    def small_gpu(self, *args, **kwargs):
        if self.state.global_step >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    cfg = _sft_cfg(base_overrides, "sft.max_steps=2", "sft.save_steps=1", "sft.gradient_accumulation_steps=1",
                   "model.gradient_checkpointing=false")
    monkeypatch.setattr(Trainer, "training_step", small_gpu)
    with pytest.raises(RuntimeError, match=r"sft: the GPU ran out of memory in step 2: set "
                                           r"model.gradient_checkpointing=true, and rerun with the same run_name: "
                                           r"it resumes from checkpoint-1 \(step 1 of 2\)\. Or lower "
                                           r"sft.per_device_train_batch_size=\d+ .*model.max_pixels.*new run_name="):
        run(cfg, run_dir=tmp_path / "sft")
    monkeypatch.setattr(Trainer, "training_step", original)
    assert run(cfg, run_dir=tmp_path / "sft")["global_step"] == 2
    # the failed attempt's record is kept beside the finished run's
    first = tmp_path / "sft" / "attempts" / "01"
    assert "ran out of memory in step 2" in (first / "FAILED").read_text()
    assert (first / "config.yaml").read_text() == (tmp_path / "sft" / "config.yaml").read_text()
    assert (first / "run_info.json").exists() and (tmp_path / "sft" / "DONE").exists()
    assert not (tmp_path / "sft" / "FAILED").exists()


def test_the_finishing_line_names_a_single_logged_loss_as_such():
    """A run shorter than sft.logging_steps logs its first step only: the line must not read "12.6 at step 1 ->
    12.6 at step 1" (as if training did nothing), but say it is the only loss logged and which key logs more."""
    from flare_exp.loss_summary import loss_line

    assert loss_line([{"loss": 12.6, "step": 1}], {"train_loss": 12.61}, 10) == (
        "loss 12.6 at step 1, the only one logged (sft.logging_steps=10); mean 12.6100")
    assert loss_line([{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 10}], {"train_loss": 2.5}, 10) == (
        "loss 3.0 at step 1 -> 2.0 at step 10, mean 2.5000")
    assert loss_line([], {"train_loss": 0.0}, 5) == "no loss logged (sft.logging_steps=5)"


def test_answer_logits_only_is_the_models_own_loss_and_gradients(base_overrides, demo_prepared):
    """sft.answer_logits_only (the default): the LM head runs at the scored positions only, and the loss and
    the LoRA gradients equal the model's own loss over every position, on a padded batch of four samples whose
    answers sit at different positions (one view and two, a report and a letter)."""
    from transformers import Trainer

    from flare_exp.models.loading import load_model
    from flare_exp.stages.sft import answer_logits_only

    cfg = _sft_cfg(base_overrides)
    loaded = load_model(cfg.model, training=True)
    model = loaded.model
    records = read_jsonl(demo_prepared / "train.jsonl")
    picked = [next(r for r in records if r["dataset"] == name)
              for name in ("IU_XRay", "periapical", "IU_XRay", "boneresorption")]
    batch = VisionChat(loaded.processor, demo_prepared.parent / "raw").sft_batch(picked)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1  # padded: answers end at different places

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    own_loss, own_grads = loss_and_grads(lambda: model(**batch).loss)
    trainer = object.__new__(answer_logits_only(Trainer))  # without a token count compute_loss needs no state
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    scored = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert outputs.logits.shape[1] == scored < batch["input_ids"].shape[1] // 2
    answer_loss, answer_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    assert torch.allclose(answer_loss, own_loss, rtol=1e-5), (answer_loss, own_loss)
    assert own_grads and all(torch.allclose(answer_grads[n], g, rtol=1e-4, atol=1e-7) for n, g in own_grads.items())
    assert any(g.abs().sum() > 0 for g in own_grads.values())


def test_the_stage_trains_and_evaluates_with_answer_logits_only(base_overrides, tmp_path, monkeypatch):
    """Through the stage (Trainer, collator, eval): the same training and eval losses with and without
    sft.answer_logits_only, and with it on, every loss the stage computes scores the answer positions only."""
    from transformers.loss import loss_utils

    original, scored_positions = loss_utils.ForCausalLMLoss, []

    def recording(logits, labels, vocab_size, *args, shift_labels=None, **kwargs):
        if shift_labels is not None:
            scored_positions.append(logits.shape[1])
        return original(logits, labels, vocab_size, *args, shift_labels=shift_labels, **kwargs)

    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", recording)
    losses = {}
    assert compose_cfg(["stage=sft"]).sft.answer_logits_only is True  # the default
    for answer_only in ("false", "true"):
        run(_sft_cfg(base_overrides, "sft.max_steps=2", "sft.eval_steps=2", "sft.max_eval_samples=4",
                     f"sft.answer_logits_only={answer_only}"), run_dir=tmp_path / answer_only)
        history = json.loads((tmp_path / answer_only / "log_history.json").read_text())
        losses[answer_only] = [h[key] for h in history for key in ("loss", "eval_loss") if key in h]
        if answer_only == "false":
            assert not scored_positions
    assert len(losses["true"]) == 3 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    # 2 steps + the eval batch; the demo's samples are 52-136 tokens long, of which the answers are a few
    assert len(scored_positions) == 3 and max(scored_positions) < 40, scored_positions



def test_answer_logits_only_under_gradient_accumulation(base_overrides, tmp_path, monkeypatch):
    """With sft.gradient_accumulation_steps > 1 (the real runs' 4) the answer-position loss is the mean over the
    labelled tokens of the whole accumulated batch, as one batch of the same samples gives it (2 x 2 samples
    against 1 x 4, same order), whether or not the model says its own loss takes a token count: transformers'
    Qwen3-VL says not (accepts_loss_kwargs=False; its own loss is then a mean of micro-batch means), Unsloth's
    compiled forward says it does."""
    import safetensors.torch
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    def train(answer_only: str, accepts_loss_kwargs: bool, batch: int, steps: int):
        monkeypatch.setattr(modeling_qwen3_vl.Qwen3VLForConditionalGeneration, "accepts_loss_kwargs",
                            accepts_loss_kwargs)
        run_dir = tmp_path / f"{answer_only}-{accepts_loss_kwargs}-{batch}x{steps}"
        run(_sft_cfg(base_overrides, "sft.max_steps=2", "sft.eval_steps=0", "sft.learning_rate=1e-3",
                     f"sft.gradient_accumulation_steps={steps}", f"sft.per_device_train_batch_size={batch}",
                     f"sft.answer_logits_only={answer_only}"),
            run_dir=run_dir)
        history = json.loads((run_dir / "log_history.json").read_text())
        losses = [x for h in history if "loss" in h for x in (h["loss"], h["grad_norm"])]
        return losses, safetensors.torch.load_file(run_dir / "final" / "adapter_model.safetensors")

    means_of_means, _ = train("false", False, batch=2, steps=2)  # the model's own loss under accumulation
    token_mean, one_batch = train("false", False, batch=4, steps=1)  # the mean over the step's labelled tokens
    assert len(token_mean) == 4 and means_of_means != pytest.approx(token_mean, rel=1e-4)
    for accepts_loss_kwargs in (False, True):
        losses, adapter = train("true", accepts_loss_kwargs, batch=2, steps=2)
        assert losses == pytest.approx(token_mean, rel=1e-4), accepts_loss_kwargs
        # Adam's steps are ~1e-3 here (the learning rate set above): 1e-5 is a hundredth of one
        assert all(torch.allclose(adapter[k], w, rtol=1e-4, atol=1e-5) for k, w in one_batch.items())


def test_cudnn_attention_switch(base_overrides):
    """model.cudnn_attention=false keeps SDPA off cuDNN's kernels for the whole process (every stage loads its
    model through load_model); the default leaves PyTorch's choice on."""
    from flare_exp.models.loading import load_model

    try:
        load_model(_sft_cfg(base_overrides, "model.cudnn_attention=false").model)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        load_model(_sft_cfg(base_overrides).model)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_the_run_mean_loss_covers_the_steps_before_a_resume():
    """sft_summary's train_loss: each logged loss weighs the steps of its window, the steps before a resume too
    (transformers' own figure divides this process's loss sum by the global step)."""
    from flare_exp.loss_summary import run_loss

    def run_mean_loss(*args, **kwargs):
        return run_loss(*args, **kwargs)[0]

    history = [{"loss": 1.0, "step": 2}, {"loss": 0.5, "step": 4}, {"loss": 0.25, "step": 5}]
    assert run_mean_loss(history, session_mean=0.05) == (2 * 1.0 + 2 * 0.5 + 1 * 0.25) / 5
    assert run_mean_loss([], session_mean=0.7) == 0.7
    # sft.logging_steps not dividing max_steps: steps 9-10 were never logged (4.9634 said against the Trainer's
    # 4.7471): this process's own loss sum brings them in
    logged = [{"loss": 6.3422, "step": 1}, {"loss": 5.5938, "step": 4}, {"loss": 4.1459, "step": 8}]
    assert abs(run_mean_loss(logged, 4.7471, global_step=10) - 4.7471) < 1e-9
    # resumed at checkpoint-4, logged at 6, stopped at 7: transformers' 0.8 / 7 is this process's sum over 7 steps
    resumed = [{"loss": 1.0, "step": 2}, {"loss": 0.5, "step": 4}, {"loss": 0.3, "step": 6}]
    assert abs(run_mean_loss(resumed, 0.8 / 7, global_step=7, start_step=4) - (2 + 1 + 0.6 + 0.2) / 7) < 1e-9
    # resumed at checkpoint-5 after a window logged at 4 (step 5's loss died with the killed process)
    gap = [{"loss": 0.5, "step": 4}, {"loss": 0.3, "step": 6}]
    assert abs(run_mean_loss(gap, 0.3 / 6, global_step=6, start_step=5) - (4 * 0.5 + 0.3) / 5) < 1e-9


def test_a_damaged_or_missing_final_adapter_is_named(base_overrides, sft_adapter, tmp_path):
    """final/ deleted from a finished run is not called an unfinished run; weights cut short by a copy are one
    line naming the adapter, not the loader's traceback."""
    from flare_exp.models.loading import load_model

    copy = tmp_path / "sft"
    shutil.copytree(sft_adapter, copy)
    weights = copy / "final" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:100])
    cfg = _sft_cfg(base_overrides)
    with pytest.raises(ValueError, match=rf"the LoRA adapter in {copy / 'final'} cannot be loaded \(.*cut short"):
        load_model(cfg.model, init_from=str(copy), training=False)
    from flare_exp.models.checkpoints import chosen_adapter

    for cut in (whole[:100], whole[:-100]):  # the header cut, or the tensors after it: found before any load
        weights.write_bytes(cut)
        with pytest.raises(ValueError, match=rf"infer.checkpoint={copy}: the LoRA adapter's weights {weights} "
                                             r"cannot be read \(.*\): cut short or damaged"):
            chosen_adapter("infer.checkpoint", copy, False)
    shutil.rmtree(copy / "final")
    from flare_exp.models.checkpoints import resolve_adapter

    with pytest.raises(FileNotFoundError, match="is a finished run whose final/ adapter is missing"):
        resolve_adapter(copy)


def test_an_accumulation_beyond_the_training_set_is_said_and_recorded_as_what_a_step_holds(caplog):
    """8 x 50 said 400 samples a step; the Trainer ends an accumulation with the epoch, so each held the 192
    samples there were."""
    import logging
    from types import SimpleNamespace

    from flare_exp.step_batch import effective_batch

    section = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=50)
    with caplog.at_level(logging.WARNING):
        assert effective_batch(section, 1, 192) == {"world_size": 1, "effective_batch": 192,
                                                    "effective_batch_configured": 400}
    assert "every step is one epoch of 192 samples (sft.gradient_accumulation_steps=24 or less" in caplog.text
    assert effective_batch(section, 1, 400) == {"world_size": 1, "effective_batch": 400}
    effective_batch(SimpleNamespace(per_device_train_batch_size=16, gradient_accumulation_steps=1), 1, 12)
    assert "sft.per_device_train_batch_size=12 or less holds one batch" in caplog.text  # accumulation 1 already
    assert effective_batch(section, 2) == {"world_size": 2, "effective_batch": 800}
    with caplog.at_level(logging.INFO):  # 10 samples in steps of 4: 4, 4 and 2 an epoch
        assert effective_batch(SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=2), 1, 10) \
            == {"world_size": 1, "effective_batch": 4, "epoch_last_step_samples": 2}
    assert "the training set's 10 samples do not divide into optimizer steps of 4: each epoch ends with a step of 2" \
        in caplog.text


def test_steps_set_for_a_resume_apply_from_the_checkpoint_on(caplog):
    """A resume took logging_steps / save_steps from the checkpoint's trainer state (transformers' way): the loss
    was logged every step and saved every 10 where the launch said 5 and 15, while config.yaml said 5 and 15."""
    import logging
    from types import SimpleNamespace

    from transformers.trainer_callback import TrainerState

    from flare_exp.training import AtResume

    state = TrainerState(global_step=20, max_steps=40, logging_steps=1, eval_steps=10, save_steps=10)
    args = SimpleNamespace(logging_steps=5, eval_steps=10, save_steps=15)
    with caplog.at_level(logging.INFO):
        AtResume().on_train_begin(args, state, None)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (5, 10, 15)
    assert "resumed at step 20 with this launch's logging_steps 1 -> 5, save_steps 10 -> 15" in caplog.text


def test_a_resumed_runs_mean_loss_says_the_steps_it_covers():
    """Killed after checkpoint-5 (logged at 1 and 3), resumed: steps 4-5's losses died with the stopped attempt.
    The card said transformers' train_loss (this process's sum over all 20 steps: 1.93 where the run's was 3.29),
    the summary a mean that passed over the two steps unsaid; now the mean of the 18 known steps, said as such."""
    from flare_exp.loss_summary import loss_fields, said

    history = [{"loss": 6.0, "step": 1}, {"loss": 5.0, "step": 3}] + [{"loss": 2.0, "step": s} for s in (6, 9, 12)]
    fields = loss_fields(history, session_mean=2.0 * 15 / 20, global_step=20, start_step=5)
    assert fields["train_loss_steps"] == 18 and abs(fields["train_loss"] - (6 + 2 * 5 + 15 * 2) / 18) < 1e-9
    assert said(fields).startswith(f"{fields['train_loss']:.4f} over 18 of 20 steps: the others were trained")
    # resumed twice (checkpoint-5, then checkpoint-16, logging every 3 steps): each resume's gap is known from the
    # history's resumed_at entries; only the last one's was (3.2583 said over 20 steps where 16 are known)
    twice = [{"loss": 6.0, "step": 1}, {"loss": 5.0, "step": 3}, {"resumed_at": 5, "step": 5}, {"loss": 4.0, "step": 6},
             {"loss": 3.0, "step": 9}, {"loss": 3.0, "step": 12}, {"loss": 3.0, "step": 15},
             {"resumed_at": 16, "step": 16}, {"loss": 2.0, "step": 18}]
    fields = loss_fields(twice, session_mean=2.0 * 4 / 20, global_step=20, start_step=16)
    assert fields["train_loss_steps"] == 1 + 2 + 1 + 3 * 3 + 2 + 2
    assert abs(fields["train_loss"] - (6 + 10 + 4 + 27 + 2 * 2 + 2 * 2) / 17) < 1e-9
    whole = loss_fields(history[:2], session_mean=(6 + 10) / 3, global_step=3)
    assert whole == {"train_loss": 16 / 3, "train_loss_steps": 3} and said(whole) == "5.3333"


def test_resume_never_names_every_checkpoint_it_refuses_over(tmp_path):
    from flare_exp.run.stage import resume_never_refusal

    ckpts = [tmp_path / f"checkpoint-{n}" for n in (2, 4, 6)]
    assert f"{tmp_path} already holds checkpoints (checkpoint-2, checkpoint-4, checkpoint-6) and resume=never" \
        in resume_never_refusal(tmp_path, ckpts)
    many = [tmp_path / f"checkpoint-{n}" for n in range(1, 11)]
    assert "(checkpoint-1, ... 8 more ..., checkpoint-10) and resume=never" in resume_never_refusal(tmp_path, many)
