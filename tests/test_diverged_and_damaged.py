"""Training that diverges stops where it does (the Trainer logged loss 0 and grad_norm nan, saved NaN adapters and
ended DONE); an adapter of inf/NaN weights is refused where a stage loads it; a checkpoint whose bytes changed in
place since it was saved (same size: the size check passed) is passed over by a resume, said."""
import json
import logging
import shutil

import pytest
import torch

from conftest import compose_cfg
from flare_exp.main import run
from flare_exp.models.checkpoints import COMPLETE, incomplete, mark_complete, newest_complete


def test_a_learning_rate_far_too_high_stops_the_run_naming_the_step_and_the_key(base_overrides, tmp_path):
    from flare_exp.divergence import TrainingDivergedError

    run_dir = tmp_path / "sft"
    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=6", "sft.learning_rate=1e4", "sft.eval_steps=0",
                       "sft.warmup_ratio=0", "sft.save_steps=1", "sft.logging_steps=1"])
    with pytest.raises(TrainingDivergedError, match=r"sft diverged at step \d+: .* is inf or NaN.*sft.learning_rate "
                                                     r"\(now 10000\)"):
        run(cfg, run_dir=run_dir)
    assert not (run_dir / "final").exists() and not (run_dir / "DONE").exists() and (run_dir / "FAILED").exists()
    for checkpoint in run_dir.glob("checkpoint-*"):  # those saved are of finite weights
        from safetensors.torch import load_file

        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint


def test_an_adapter_of_nan_weights_is_refused_at_load(sft_adapter, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from flare_exp.models.loading import AdapterLoadError, adapter_loaded
    from transformers import AutoModelForImageTextToText

    adapter = tmp_path / "nan-adapter"
    shutil.copytree(sft_adapter / "final", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    with pytest.raises(AdapterLoadError, match=r"holds inf/NaN weights \(.*lm_head"):
        adapter_loaded(model, adapter, training=False)


def _checkpoint(run_dir, step):
    checkpoint = run_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
        (checkpoint / name).write_bytes(bytes(range(256)) * 4)
    mark_complete(checkpoint)
    return checkpoint


def test_a_checkpoint_damaged_in_place_is_passed_over_by_a_resume(tmp_path, caplog):
    older, newer = _checkpoint(tmp_path, 40), _checkpoint(tmp_path, 80)
    assert json.loads((newer / "flare_exp_complete.json").read_text())["sha256"]["optimizer.pt"]
    data = bytearray((newer / "optimizer.pt").read_bytes())
    data[100:164] = b"\x7f" * 64  # bit rot: the same size
    (newer / "optimizer.pt").write_bytes(bytes(data))
    assert incomplete(newer) is None  # listings check sizes only
    assert "optimizer.pt differs from what was saved" in incomplete(newer, verify=True)
    caplog.set_level(logging.WARNING)
    assert newest_complete(tmp_path) == older
    assert "skipping" in caplog.text and "checkpoint-80" in caplog.text and "optimizer.pt differs" in caplog.text
    # a marker written before the digests (sizes only) still counts as complete
    record = json.loads((older / "flare_exp_complete.json").read_text())
    del record["sha256"]
    (older / "flare_exp_complete.json").write_text(json.dumps(record))
    assert incomplete(older, verify=True) is None


def test_another_stage_under_an_unfinished_runs_name_is_refused(base_overrides, tmp_path, sft_adapter):
    """An infer (or eval, rl) launched under the name of a killed sft run took its dir over, finished DONE beside
    the sft's checkpoints, and the sft could no longer be resumed."""
    from flare_exp.run.record import RunSettingsChangedError

    run_dir = tmp_path / "sft-x"
    run(compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=2", "sft.save_steps=1", "sft.eval_steps=0"]),
        run_dir=run_dir)
    shutil.rmtree(run_dir / "final")  # killed after checkpoint-2
    (run_dir / "DONE").unlink()
    for stage in ("infer", "rl"):
        with pytest.raises(RunSettingsChangedError, match=rf"holds an unfinished sft run \(checkpoint-1, checkpoint-2\)"
                                                          rf"; this launch is stage={stage}"):
            run(compose_cfg([f"stage={stage}", *base_overrides, "infer.num_samples=2", f"rl.init_from={sft_adapter}"]),
                run_dir=run_dir)
        assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "DONE").exists()
    resumed = run(compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=2", "sft.save_steps=1",
                               "sft.eval_steps=0"]), run_dir=run_dir)
    assert resumed["global_step"] == 2 and (run_dir / "DONE").exists()


def test_a_pipeline_and_a_single_stage_do_not_take_each_others_run_dirs(base_overrides, tmp_path):
    """A pipeline under a finished sft's name filed the sft's record away and finished beside its final/ and
    checkpoints (no overwrite=true); under a killed one it took the dir over; a single stage under a killed
    pipeline's name did the same to the pipeline's steps."""
    from flare_exp.run.record import RunFinishedError, RunSettingsChangedError

    sft = ["stage=sft", *base_overrides, "sft.max_steps=2", "sft.save_steps=1", "sft.eval_steps=0"]
    pipeline = ["stage=pipeline", *base_overrides, "stage.steps=[infer,eval]", "stage.compare=[]",
                "infer.num_samples=2", "infer.max_new_tokens=2", "eval.radgraph=false"]
    finished = tmp_path / "fin"
    run(compose_cfg(sft), run_dir=finished)
    with pytest.raises(RunFinishedError, match=r"already holds a finished sft run .*this launch is stage=pipeline"):
        run(compose_cfg(pipeline), run_dir=finished)
    assert (finished / "DONE").exists() and (finished / "final").is_dir() and not (finished / "infer").exists()
    killed = tmp_path / "killed"
    run(compose_cfg(sft), run_dir=killed)
    shutil.rmtree(killed / "final")
    (killed / "DONE").unlink()
    with pytest.raises(RunSettingsChangedError, match=r"holds an unfinished sft run .*this launch is stage=pipeline"):
        run(compose_cfg(pipeline), run_dir=killed)
    run(compose_cfg([*pipeline, "overwrite=true"]), run_dir=finished)  # the sft moves whole to attempts/
    filed = finished / "attempts" / "01"
    assert (filed / "final").is_dir() and (filed / "checkpoint-2").is_dir() and not (finished / "final").exists()
    assert (finished / "eval" / "DONE").exists()
    # a pipeline killed in its sft step: a single stage under its name is refused, naming the pipeline
    (finished / "DONE").unlink()
    shutil.copytree(filed / "checkpoint-2", finished / "sft" / "checkpoint-2")
    with pytest.raises(RunSettingsChangedError, match=r"holds an unfinished pipeline run \(.*sft.*\); this launch "
                                                      r"is stage=infer"):
        run(compose_cfg(["stage=infer", *base_overrides, "infer.num_samples=2"]), run_dir=finished)


def test_a_final_adapter_damaged_in_place_is_refused_where_it_is_used(base_overrides, tmp_path):
    """final/ had no digests (checkpoints did): exponent bits flipped in a copy's weights (same size, finite
    values) were used silently, F1 0.72 -> 0.18."""
    from flare_exp.models.checkpoints import chosen_adapter

    run_dir = tmp_path / "sft"
    run(compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=1", "sft.eval_steps=0"]), run_dir=run_dir)
    assert chosen_adapter("infer.checkpoint", run_dir, False) == run_dir / "final"
    weights = run_dir / "final" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:-100] = bytes(b ^ 0x40 for b in data[-200:-100])
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"infer.checkpoint=.*final is not as its training saved it: "
                                         r"adapter_model.safetensors differs from what was saved"):
        chosen_adapter("infer.checkpoint", run_dir, False)


def test_weights_that_stop_moving_are_said_once_and_kept_in_the_summary(base_overrides, tmp_path, caplog):
    """A learning rate far too high but finite (300-1000) saturated the model: "loss 6.389 | grad_norm 0" in every
    logged step to the end, and the run ended DONE with nothing said. Now a warning names the step and the key,
    once, and sft_summary.json keeps it; the run still finishes (its numbers are finite: the user decides)."""
    from flare_exp.divergence import WarnWhenStuck

    run_dir = tmp_path / "sft"
    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=10", "sft.learning_rate=500", "sft.eval_steps=0",
                       "sft.save_steps=100", "sft.logging_steps=1"])
    with caplog.at_level(logging.WARNING):
        run(cfg, run_dir=run_dir)
    said = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    assert len(said) == 1 and "sft.learning_rate (now 500)" in said[0], said
    summary = json.loads((run_dir / "sft_summary.json").read_text())
    assert summary["no_learning_signal"]["since_step"] >= 1 and (run_dir / "DONE").exists()

    class Args:
        learning_rate = 1e-4

    class State:
        global_step = 0

    for logs in ({"loss": 2.0, "grad_norm": 0.3}, {"loss": 0.0, "grad_norm": 0.0}, {"loss": 1e-5, "grad_norm": 0.0}):
        watch = WarnWhenStuck("sft", window=3)  # learning, or a loss fitted to 0: not stuck
        for step in range(6):
            State.global_step = step
            watch.on_log(Args(), State(), None, logs=logs)
        assert watch.finding is None, logs
    watch = WarnWhenStuck("rl", window=3)
    for step, grad in enumerate([0.0, 0.0, 0.5, 0.0, 0.0, 0.0]):  # a moving step in between starts the count again
        State.global_step = step + 1
        watch.on_log(Args(), State(), None, logs={"loss": 3.0, "grad_norm": grad})
    assert watch.finding["since_step"] == 4 and watch.finding["step"] == 6


def _files(directory):
    """Every file under ``directory`` and its bytes: what a move must keep."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _killed_run(stage, overrides, run_dir, max_steps):
    """A training run that saved a checkpoint at every step and was killed before final/ (no DONE)."""
    cfg = compose_cfg([f"stage={stage}", *overrides, f"{stage}.max_steps={max_steps}", f"{stage}.save_steps=1",
                       f"{stage}.save_total_limit=null"])
    run(cfg, run_dir=run_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "DONE").unlink()
    return cfg


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_damaged_checkpoints_are_filed_away_whole_and_the_resume_goes_on_before_them(stage, base_overrides, request,
                                                                                     tmp_path, caplog):
    """A checkpoint with trainer_state.json deleted (or its adapter cut to half) was skipped by the resume but left
    in place: the new run's own checkpoint-N was saved over it, and the damaged one, maybe repairable, was lost.
    Each skipped one now moves whole to the earlier attempt's record, said with where, before training goes on."""
    run_dir = tmp_path / stage
    small = {"sft": ["sft.eval_steps=0"], "rl": [f"rl.init_from={request.getfixturevalue('sft_adapter')}",
                                                 "rl.per_device_train_batch_size=4", "rl.num_generations=2",
                                                 "rl.max_completion_length=8"]}
    cfg = _killed_run(stage, [*base_overrides, *small[stage]], run_dir, max_steps=3)
    (run_dir / "checkpoint-3" / "trainer_state.json").unlink()
    weights = run_dir / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    damaged = {n: _files(run_dir / n) for n in ("checkpoint-2", "checkpoint-3")}
    caplog.set_level(logging.INFO)
    summary = run(cfg, run_dir=run_dir)
    assert summary["global_step"] == 3
    filed = run_dir / "attempts" / "01"  # beside the config of the attempt that saved them
    assert (filed / "config.yaml").is_file()
    for name, files in damaged.items():
        assert _files(filed / name) == files, name  # every byte kept, nothing added
        assert f"skipping {run_dir / name}: " in caplog.text and f"; moved to {filed / name} " in caplog.text
    assert "trainer_state.json is missing" in caplog.text and "adapter_model.safetensors has" in caplog.text
    assert f"resume=auto: continuing from {run_dir / 'checkpoint-1'}" in caplog.text
    for step in (2, 3):  # saved again by this attempt, whole
        assert incomplete(run_dir / f"checkpoint-{step}", verify=True) is None
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert {"resumed_at": 1, "step": 1} in state["log_history"]


def test_a_checkpoint_cut_short_leaves_no_stray_file_in_the_one_saved_again(base_overrides, tmp_path, caplog):
    """A checkpoint-N/ cut short while saving (no marker) holding a file the Trainer does not write was passed
    over, and the resumed run saved its own step N into the same dir: the stray file was then listed in the new
    flare_exp_complete.json as the checkpoint's own. The cut-short dir now moves aside first, stray file kept."""
    run_dir = tmp_path / "sft"
    cfg = _killed_run("sft", [*base_overrides, "sft.eval_steps=0"], run_dir, max_steps=2)
    cut = run_dir / "checkpoint-2"
    (cut / COMPLETE).unlink()
    (cut / "junk.bin").write_bytes(b"\x00stale\xff" * 100)
    left = _files(cut)
    caplog.set_level(logging.WARNING)
    assert run(cfg, run_dir=run_dir)["global_step"] == 2
    filed = run_dir / "attempts" / "01" / "checkpoint-2"
    assert f"skipping {cut}: no {COMPLETE} (cut short while saving); moved to {filed} " in caplog.text
    assert _files(filed) == left
    assert not (cut / "junk.bin").exists() and incomplete(cut, verify=True) is None
    assert "junk.bin" not in json.loads((cut / COMPLETE).read_text())["files"]


def test_with_no_whole_checkpoint_left_the_resume_files_them_all_and_starts_at_step_0(tmp_path, caplog):
    """No complete checkpoint: an unattended requeue is not refused, it trains from step 0, and every checkpoint
    it passed over is kept in attempts/NN/ (a name taken there already: a new NN), none left to be saved over."""
    from flare_exp.resume import resume_checkpoint

    older, newer = _checkpoint(tmp_path, 40), _checkpoint(tmp_path, 80)
    (newer / "trainer_state.json").unlink()
    (older / "adapter_model.safetensors").write_bytes(b"\x01" * 512)  # cut to half
    before = {c.name: _files(c) for c in (older, newer)}
    (tmp_path / "attempts" / "01" / "checkpoint-80").mkdir(parents=True)  # an earlier attempt's, filed already
    caplog.set_level(logging.WARNING)
    assert resume_checkpoint("auto", tmp_path) is None
    filed = tmp_path / "attempts" / "02"
    assert {name: _files(filed / name) for name in before} == before
    assert not older.exists() and not newer.exists()
    assert (f"skipping {older}: adapter_model.safetensors has 512 bytes, 1024 were written; moved to "
            f"{filed / older.name}") in caplog.text
    assert "(2 skipped, each moved aside as said above): training starts again from step 0" in caplog.text
    # resume=never and resume=<path> keep the namespace clear too: nothing past the step they start from stays
    cut = _checkpoint(tmp_path, 80)
    (cut / COMPLETE).unlink()
    assert resume_checkpoint("never", tmp_path) is None and not cut.exists()
    taken, after = _checkpoint(tmp_path, 40), _checkpoint(tmp_path, 80)
    (taken / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    mark_complete(taken)
    assert resume_checkpoint(str(taken), tmp_path) == str(taken) and not after.exists() and taken.is_dir()
    assert f"skipping {after}: newer than {taken} (step 40), which resume= continues from; moved to" in caplog.text
