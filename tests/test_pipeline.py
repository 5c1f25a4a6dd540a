"""The main job, `python launch.py` (the demo pipeline: prepare -> sft -> rl -> infer -> eval), end to end with
the real stage code on the tiny model; a rerun reuses every finished step and files no attempt; a rerun with
other settings or inputs stops naming them."""
import json
import sys

import pytest

from conftest import REPO, compose_cfg
from flare_exp.run.fingerprint import RunSettingsChangedError


@pytest.mark.slow  # a whole launch
def test_the_readme_demo_command_runs_the_pipeline_end_to_end_and_again(session_dir, tmp_path, tiny_model_dir,
                                                                         demo_prepared, caplog):
    """The README's `python launch.py` as a user runs it (a process of its own), then reruns in this process on
    its run dir: the same settings reuse every step, a killed rerun keeps the finished record."""
    from flare_exp.main import run
    from test_readme import readme_commands, run_command

    assert "python launch.py" in readme_commands()
    base_overrides = [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path}"]
    proc = run_command("python launch.py", base_overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo-pipeline"
    log = proc.stdout + proc.stderr
    assert f"Report: {run_dir / 'eval' / 'report.html'}" in log and (run_dir / "eval" / "report.html").exists()
    # quiet logs: readable step lines, no raw log dicts, the known-harmless library messages filtered by text
    assert "step 1/" in log and "{'loss'" not in log and "{'eval_loss'" not in log
    assert "To copy construct from a tensor" not in log and "Using device:" not in log
    steps = ["prepare", "sft", "rl", "infer-base", "infer-sft", "infer", "eval"]  # stage.compare=[base,sft]
    assert list(json.loads((run_dir / "DONE").read_text())["result"]["steps"]) == steps
    for step in steps[1:]:
        assert (run_dir / step / "DONE").exists(), step
    assert (run_dir / "infer" / "predictions.xlsx").exists()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {"report_generation", "classification", "multi_label", "regression"} <= {
        task for entry in metrics.values() for task in entry["by_task"]}
    assert (run_dir / "DONE").exists() and not (run_dir / "attempts").exists()
    assert json.loads((run_dir / "run_info.json").read_text())["packages"]["hydra-core"] == "1.3.8"
    _sft_beats_base(metrics, json.loads((run_dir / "eval" / "significance.json").read_text()))

    caplog.set_level("INFO", logger="flare_exp.stages.pipeline")
    record = {name: (run_dir / name).read_bytes() for name in ("DONE", "config.yaml", "run_info.json")}
    again = run(compose_cfg([*base_overrides, "infer.batch_size=4"]), run_dir=run_dir)  # a speed setting only
    assert all(again["results"][step] == {"reused": str(run_dir / step)} for step in steps[1:])
    import torch

    assert torch.get_num_threads() == 1  # model=tiny: model.cpu_threads=1 (a second thread only spins)
    assert not (run_dir / "attempts").exists()  # same settings, nothing failed: nothing new to keep
    # nothing ran: the record is still the run that made the outputs (its results, duration, config)
    assert record == {name: (run_dir / name).read_bytes() for name in record}
    # a step redone and then killed: the finished record is on file in attempts/NN, not lost
    import shutil

    from flare_exp.stages import pipeline as pipeline_stage

    shutil.rmtree(run_dir / "eval")
    real_step = pipeline_stage.run_step

    def killed(step, *args, **kwargs):
        if step == "eval":
            raise KeyboardInterrupt("SIGTERM")
        return real_step(step, *args, **kwargs)

    pipeline_stage.run_step = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            run(compose_cfg(base_overrides), run_dir=run_dir)
    finally:
        pipeline_stage.run_step = real_step
    assert record == {name: (run_dir / "attempts" / "01" / name).read_bytes() for name in record}
    run(compose_cfg(base_overrides), run_dir=run_dir)  # finished again (the killed attempt on file too)
    assert (run_dir / "DONE").exists()
    shutil.rmtree(run_dir / "attempts")
    # a rerun killed (kill -9) in the moment it had filed the record, before it put it back: the next rerun that
    # only reuses takes it up and puts it back, as it was
    from flare_exp.run.lifecycle import file_finished_record

    record = {name: (run_dir / name).read_bytes() for name in record}
    file_finished_record(run_dir)
    (run_dir / "config.yaml").write_text("the killed rerun's")
    run(compose_cfg(base_overrides), run_dir=run_dir)
    assert record == {name: (run_dir / name).read_bytes() for name in record}
    assert not (run_dir / "attempts").exists()

    assert "other settings" not in caplog.text
    # a step's config.yaml edited by hand since: the listing says so (a pipeline's own records no fingerprint)
    from omegaconf import OmegaConf

    from flare_exp.catalog import run_summary

    assert "edited since" not in (run_summary(run_dir)["note"] or "")
    saved = OmegaConf.load(run_dir / "rl" / "config.yaml")
    saved.rl.learning_rate = 0.5
    OmegaConf.save(saved, run_dir / "rl" / "config.yaml")
    assert "rl/config.yaml edited since: rl.learning_rate: " in run_summary(run_dir)["note"]
    first_config = (run_dir / "config.yaml").read_text()
    # the finished infer step did not decode with the new setting: it is not reused, and the run stops naming it
    with pytest.raises(RunSettingsChangedError, match=r"\[infer\] \S+ holds a finished step made with other "
                                                      r"settings or inputs: infer.max_new_tokens: \d+ -> 5\. "):
        run(compose_cfg([*base_overrides, "infer.max_new_tokens=5"]), run_dir=run_dir)
    # refused before the pipeline's dir was touched: still the finished run it was (its DONE, its config)
    assert (run_dir / "config.yaml").read_text() == first_config and (run_dir / "DONE").exists()
    assert not (run_dir / "FAILED").exists() and not (run_dir / "attempts").exists()
    assert (run_dir / "infer" / "DONE").exists() and (run_dir / "eval" / "DONE").exists()  # nothing was redone


def _sft_beats_base(metrics: dict, significance: dict) -> None:
    """The demo shows learning: its data answer from the image, so sft is above base on an official metric, rl
    moves an official metric again, and eval compared base, sft and rl."""
    official = {label.split("/")[-1]: entry["official"] for label, entry in metrics.items()}
    assert list(official) == ["base", "sft", "rl"]
    gains = {task: official["sft"][task][metric] - official["base"][task][metric]
             for task, metric in (("classification", "balanced_accuracy"), ("multi_label", "f1_score"))}
    assert max(gains.values()) > 0.2, gains
    # and GRPO moves it again: the demo's rl budget changes the greedy answers enough to show in an official number
    moved = {task: (official["sft"][task][metric], official["rl"][task][metric]) for task, metric in (
        ("classification", "balanced_accuracy"), ("multi_label", "f1_score"), ("regression", "mean_absolute_error"))}
    assert any(sft != rl for sft, rl in moved.values()), moved
    assert {(t["run_a"].split("/")[-1], t["run_b"].split("/")[-1]) for t in significance["tests"]} == {
        ("base", "sft"), ("base", "rl"), ("sft", "rl")}


def test_a_finished_step_is_reused_only_with_the_same_inputs(base_overrides, demo_prepared, tmp_path):
    import shutil

    from flare_exp.run.lifecycle import reusable, start_attempt

    train = tmp_path / "train.jsonl"
    shutil.copy(demo_prepared / "train.jsonl", train)
    cfg = compose_cfg(["stage=sft", *base_overrides, f"sft.train_file={train}"])
    step_dir = tmp_path / "pipe" / "sft"
    start_attempt("sft", cfg, step_dir)
    (step_dir / "DONE").write_text("{}")
    assert reusable("sft", cfg, step_dir)  # same settings, same bytes: reused
    train.write_text("".join(line + "\n" for line in train.read_text().splitlines()[:-1]))  # one record less
    with pytest.raises(RunSettingsChangedError, match=r"\[sft\] .* sft\.train_file sha256: [0-9a-f]{12} -> "):
        reusable("sft", cfg, step_dir)


def test_a_shared_prepare_another_job_holds_is_waited_for_then_reused(base_overrides, tmp_path, caplog):
    """The jobs of a sweep share prepare's dir (data.prepared_dir, outside each pipeline's own): a job that finds
    another one holding it waits, then reuses what it made; before, the jobs prepared over each other at the
    same time, each filing the others' attempts. A job that runs the step takes the dir's lock and gives it back."""
    import threading
    import time

    from flare_exp.main import run
    from flare_exp.run.layout import LOCK
    from flare_exp.run.lock import RunLock

    prepared = tmp_path / "prepared"
    pipeline = [*base_overrides, f"data.prepared_dir={prepared}", "stage=pipeline", "stage.steps=[prepare]"]
    first = run(compose_cfg(pipeline), run_dir=tmp_path / "job0")  # runs the step: takes and releases the lock
    assert first["results"]["prepare"]["records"] and not (prepared / LOCK).exists()
    other = RunLock(prepared).acquire()  # another job holds it (a live process: this one)
    threading.Timer(3.0, other.release).start()
    caplog.set_level("INFO", logger="flare_exp.run.lock")
    start = time.monotonic()
    again = run(compose_cfg(pipeline), run_dir=tmp_path / "job1")
    assert time.monotonic() - start >= 2.5
    assert again["results"]["prepare"] == {"reused": str(prepared)}
    assert f"[prepare]: waiting for the run that holds {prepared}" in caplog.text
    assert not (prepared / "attempts").exists()


def test_overwrite_in_a_sweep_redoes_a_shared_prepare_once(base_overrides, tmp_path, monkeypatch):
    """overwrite=true on a sweep's jobs: the first job redoes the shared prepare dir, the others reuse what it
    made (before, every job redid it, one after another under its lock); outside a sweep it is redone each time."""
    import time

    from flare_exp.main import run
    from flare_exp.stages import pipeline as pipeline_stage

    prepared = tmp_path / "prepared"
    steps = [*base_overrides, f"data.prepared_dir={prepared}", "stage=pipeline", "stage.steps=[prepare]"]
    run(compose_cfg(steps), run_dir=tmp_path / "before")
    time.sleep(0.05)
    start = time.time()  # the sweep began after the first DONE
    monkeypatch.setattr(pipeline_stage, "sweep_started", lambda: start)
    redo = [*steps, "overwrite=true"]
    first = run(compose_cfg(redo), run_dir=tmp_path / "job0")
    assert first["results"]["prepare"].get("records") and len(list((prepared / "attempts").iterdir())) == 1
    second = run(compose_cfg(redo), run_dir=tmp_path / "job1")
    assert second["results"]["prepare"] == {"reused": str(prepared)}
    monkeypatch.setattr(pipeline_stage, "sweep_started", lambda: None)  # a single run: overwrite redoes it
    third = run(compose_cfg(redo), run_dir=tmp_path / "single")
    assert third["results"]["prepare"].get("records") and len(list((prepared / "attempts").iterdir())) == 2


def test_a_finished_prepare_is_not_reused_after_the_download_changed(base_overrides, tmp_path, monkeypatch):
    """FLARE's corrected annotations unpacked into the same data.root: the pipeline's finished prepare (and so
    everything trained on it) is not reused, naming the file; an image copied again with new times but the same
    bytes is the same download."""
    import os
    import shutil

    from flare_exp.main import run

    cfg = compose_cfg(base_overrides)
    root = tmp_path / "flare"
    shutil.copytree(cfg.data.root, root)
    steps = [*base_overrides, f"data.root={root}", f"data.prepared_dir={tmp_path / 'prepared'}", "stage=pipeline",
             "stage.steps=[prepare]"]
    run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    image = next(root.rglob("*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched: same bytes
    from flare_exp.data import prepare_inputs

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as patched:  # a read-only prepared dir: the refresh is skipped, the reuse goes on
        patched.setattr(prepare_inputs, "write_json", read_only)
        assert run(compose_cfg(steps), run_dir=tmp_path / "pipe")["results"]["prepare"] == {
            "reused": str(tmp_path / "prepared")}
    assert run(compose_cfg(steps), run_dir=tmp_path / "pipe")["results"]["prepare"] == {
        "reused": str(tmp_path / "prepared")}
    recorded = json.loads((tmp_path / "prepared" / "inputs.json").read_text())["times"][str(root)]
    now = image.stat()  # compared by bytes once, then by its new times
    assert recorded[image.relative_to(root).as_posix()] == [now.st_mtime_ns, now.st_ctime_ns]
    questions = sorted(root.rglob("*_questions_train.json"))[0]
    questions.write_text(questions.read_text().replace('"Answer": "', '"Answer": "corrected ', 1))
    image.write_bytes(image.read_bytes() + b"\0")
    name = questions.relative_to(root).as_posix()
    with pytest.raises(RunSettingsChangedError, match=rf"\[prepare\] .* data.root file {name}: changed \(sha256 "
                                                      rf"[0-9a-f]{{12}} -> [0-9a-f]{{12}}\); data.root file \S+\.png: changed"):
        run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    result = run(compose_cfg([*steps, "overwrite=true"]), run_dir=tmp_path / "pipe")
    assert result["results"]["prepare"]["records"]  # redone from the download as it is now


def test_a_prepare_input_missing_or_broken_then_supplied_stops_the_reuse(base_overrides, tmp_path, caplog):
    """Images still downloading at the first prepare: a missing one supplied later, or a cut one replaced, is a
    changed input. A prepared dir without a readable record of its inputs is reused with a warning saying
    nothing was compared (a prepare from before they were recorded, or the record cut short or hand-broken)."""
    import shutil

    from flare_exp.main import run

    cfg = compose_cfg(base_overrides)
    root, prepared = tmp_path / "flare", tmp_path / "prepared"
    shutil.copytree(cfg.data.root, root)
    images = sorted(p for p in root.rglob("*.png") if "dental" in str(p))
    kept = tmp_path / "kept.png"
    shutil.copy(images[0], kept)
    images[0].unlink()  # not there yet
    images[1].write_bytes(images[1].read_bytes()[:200])  # cut short
    steps = [*base_overrides, f"data.root={root}", f"data.prepared_dir={prepared}", "stage=pipeline",
             "stage.steps=[prepare]"]
    run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    shutil.copy(kept, images[0])
    shutil.copy(kept, images[1])
    missing, cut = (p.relative_to(root).as_posix() for p in images[:2])
    with pytest.raises(RunSettingsChangedError) as refused:
        run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    assert f"data.root file {cut}: changed" in str(refused.value)
    assert f"{missing}: added (missing at the prepare)" in str(refused.value)
    assert "another data.prepared_dir= to keep both" in str(refused.value)
    with pytest.raises(RunSettingsChangedError):  # another run_name, the same prepared dir: a fresh dir says why
        run(compose_cfg(steps), run_dir=tmp_path / "fresh")
    from flare_exp.catalog import run_summary

    assert run_summary(tmp_path / "fresh")["status"] == "stopped by settings"
    summary = json.loads((prepared / "summary.json").read_text())
    for record in ("", '{"question_files": {}, "ima', "[]"):  # this version wrote one: deleted or cut since
        (prepared / "inputs.json").write_text(record)
        with pytest.raises(RunSettingsChangedError, match="inputs.json in .* missing or unreadable, though the "
                                                          "prepare wrote it"):
            run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    del summary["inputs"]  # a prepare made before inputs were recorded: reused, said once per dir
    (prepared / "summary.json").write_text(json.dumps(summary))
    from flare_exp.data import prepare_inputs

    prepare_inputs.SAID.clear()
    caplog.clear()
    again = run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    assert again["results"]["prepare"] == {"reused": str(prepared)}
    assert caplog.text.count("data.root's files were not compared with what made it") == 1


def test_data_moved_elsewhere_is_the_same_data_and_an_edit_there_is_not(base_overrides, tmp_path):
    """The download copied to another place (a node's scratch, another mount) with the same images is the same
    input: a prepare step is reused and a training run resumes; an image that differs at the new place, or
    records not from the prepared dir whose images were recorded, still stop it, saying why. The prepared dir
    itself may move too (it is prepare's own dir)."""
    import shutil

    from flare_exp.main import run
    from flare_exp.run.fingerprint import check_resume, finished_differences, fingerprint

    cfg = compose_cfg(base_overrides)
    root, moved, prepared = tmp_path / "flare", tmp_path / "scratch" / "flare", tmp_path / "prepared"
    shutil.copytree(cfg.data.root, root)
    steps = [*base_overrides, f"data.root={root}", f"data.prepared_dir={prepared}", "stage=pipeline",
             "stage.steps=[prepare]"]
    run(compose_cfg(steps), run_dir=tmp_path / "pipe")
    shutil.copytree(root, moved)  # new times, same bytes
    shutil.rmtree(root)
    at = [*base_overrides, f"data.root={moved}", f"data.prepared_dir={prepared}"]
    assert run(compose_cfg([*at, "stage=pipeline", "stage.steps=[prepare]"]),
               run_dir=tmp_path / "pipe")["results"]["prepare"] == {"reused": str(prepared)}
    shutil.copytree(prepared, tmp_path / "prepared2")
    recorded = json.loads((tmp_path / "prepared2" / "fingerprint.json").read_text())
    recorded["settings"]["data.prepared_dir"] = str(prepared)  # as versions that still compared it recorded it
    (tmp_path / "prepared2" / "fingerprint.json").write_text(json.dumps(recorded))
    assert finished_differences("prepare", tmp_path / "prepared2",
                                compose_cfg([*at, f"data.prepared_dir={tmp_path / 'prepared2'}"])) == []

    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    old = compose_cfg([*base_overrides, "stage=sft", f"data.root={root}", f"data.prepared_dir={prepared}"])
    recorded = fingerprint("sft", old)
    (sft_dir / "fingerprint.json").write_text(json.dumps(recorded))
    (sft_dir / "checkpoint-1").mkdir()
    new = compose_cfg([*at, "stage=sft"])
    check_resume("sft", sft_dir, fingerprint("sft", new), new)  # moved: resumes
    with pytest.raises(RunSettingsChangedError, match="data.root: .*"):
        check_resume("sft", sft_dir, fingerprint("sft", new))  # nothing to compare the images with
    unused = sorted(moved.rglob("testing/**/*.png"))[0]  # no record of sft's uses it: its change is no matter
    unused.write_bytes(unused.read_bytes() + b"\0")
    check_resume("sft", sft_dir, fingerprint("sft", new), new)
    image = sorted(moved.rglob("training/**/*.png"))[3]
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(RunSettingsChangedError,
                       match=rf"data.root: {root} -> {moved} \(1 of the \d+ images prepare recorded that these "
                             rf"records use differ there, e.g. {image.relative_to(moved).as_posix()}: changed\)"):
        check_resume("sft", sft_dir, fingerprint("sft", new), new)
    elsewhere = tmp_path / "train.jsonl"
    shutil.copy(prepared / "train.jsonl", elsewhere)
    other = compose_cfg([*at, "stage=sft", f"sft.train_file={elsewhere}"])
    changed = finished_differences("sft", sft_dir, other)
    assert any(c.startswith("data.root: ") and "sft.train_file is not a file of data.prepared_dir" in c
               for c in changed), changed


def test_a_prepared_split_edited_since_is_not_the_prepares_output(base_overrides, tmp_path):
    """A finished prepare whose train.jsonl was edited by hand (an answer changed, a line deleted) is not reused
    as "the same settings and inputs": its summary would count other records than the file holds."""
    from flare_exp.main import run
    from flare_exp.run.lifecycle import reusable

    prepared = tmp_path / "prepared"
    pipeline = [*base_overrides, f"data.prepared_dir={prepared}", "stage=pipeline", "stage.steps=[prepare]"]
    run(compose_cfg(pipeline), run_dir=tmp_path / "job0")
    cfg = compose_cfg([*base_overrides, f"data.prepared_dir={prepared}", "stage=prepare"])
    assert reusable("prepare", cfg, prepared)
    lines = (prepared / "train.jsonl").read_text().splitlines()
    (prepared / "train.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))
    with pytest.raises(RunSettingsChangedError, match=r"\[prepare\] .* prepared file train.jsonl: edited since the "
                                                      r"prepare wrote it \(sha256 [0-9a-f]{12} -> "):
        reusable("prepare", cfg, prepared)


def test_an_overwrite_files_every_earlier_step_before_the_first_runs(base_overrides, tmp_path, monkeypatch):
    """overwrite=true stopped in its first step: the earlier attempt's finished steps are not left beside it
    (listed with their metric, taken as its predictions): each step of the pipeline's dir moved its earlier
    attempt to its attempts/ before the first step ran. A requeue of the SLURM job that made them keeps them."""
    import flare_exp.stages.pipeline as pipeline

    out = tmp_path / "pipe"
    cfg = compose_cfg([*base_overrides, "stage=pipeline", "stage.steps=[prepare,sft,infer,eval]", "overwrite=true",
                       f"data.prepared_dir={tmp_path / 'shared'}"])
    for step in ("sft", "infer", "eval"):  # the earlier attempt, finished
        (out / step).mkdir(parents=True)
        (out / step / "DONE").write_text("{}")
        (out / step / "run_info.json").write_text(json.dumps({"slurm_job_id": "41"}))
    (out / "eval" / "metrics.json").write_text("{}")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "DONE").write_text("{}")  # prepare's dir, outside: its own rule decides

    def stopped(*args):
        raise KeyboardInterrupt("SIGTERM")
    monkeypatch.setattr(pipeline, "_run_or_reuse", stopped)
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the job that made them, requeued: kept
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, out)
    assert all((out / step / "DONE").exists() for step in ("sft", "infer", "eval"))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, out)
    for step in ("sft", "infer", "eval"):
        assert not (out / step / "DONE").exists() and (out / step / "attempts" / "01" / "DONE").exists()
    assert not (out / "eval" / "metrics.json").exists()
    assert (tmp_path / "shared" / "DONE").exists()


def test_a_stopped_pipeline_says_what_its_stopped_training_step_does_again(tmp_path):
    """A pipeline stopped in its sft step before the first checkpoint: the same command starts that step again
    from step 0, said with the step and its save_steps (it said "resumes the stopped one"); with a checkpoint the
    step resumes from it; finished steps before it are named as reused."""
    from flare_exp.resume import after_a_stop

    run_dir, prepared = tmp_path / "run", tmp_path / "prepared"
    cfg = compose_cfg(["stage=pipeline", "stage.steps=[prepare,sft,infer]", "sft.save_steps=500",
                       "sft.max_steps=1500", f"data.prepared_dir={prepared}"])
    assert after_a_stop(cfg, run_dir) == (
        "runs the pipeline again; its stopped prepare step runs again")
    prepared.mkdir()
    (prepared / "DONE").write_text("{}")
    assert after_a_stop(cfg, run_dir) == (
        "reuses the finished steps (prepare); its stopped sft step starts again from step 0 (no checkpoint was "
        "saved yet: one is saved every sft.save_steps=500 steps)")
    _checkpoint(run_dir / "sft" / "checkpoint-500")
    assert after_a_stop(cfg, run_dir) == (
        "reuses the finished steps (prepare); its stopped sft step resumes from checkpoint-500 (step 500 of 1500)")
    (run_dir / "sft" / "DONE").write_text("{}")
    assert after_a_stop(cfg, run_dir) == (
        "reuses the finished steps (prepare, sft); its stopped infer step resumes after the predictions already "
        "written")
    rl = compose_cfg(["stage=pipeline", "stage.steps=[rl]", "rl.save_steps=7"])
    assert after_a_stop(rl, run_dir) == ("runs the pipeline again; its stopped rl step starts again from step 0 (no "
                                         "checkpoint was saved yet: one is saved every rl.save_steps=7 steps)")
    assert after_a_stop(compose_cfg(["stage=sft", "sft.save_steps=500"]), run_dir / "single") == (
        "starts it again from step 0 (no checkpoint was saved yet: one is saved every sft.save_steps=500 steps)")


def _checkpoint(path, complete=True):
    """A Trainer checkpoint made by hand: its training state, and (``complete``) the marker written last."""
    from flare_exp.models.checkpoints import TRAINING_STATE, mark_complete

    path.mkdir(parents=True)
    for name in (*TRAINING_STATE, "adapter_model.safetensors"):
        (path / name).write_text("x")
    if complete:
        mark_complete(path)
    return path


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_a_stopped_run_names_the_checkpoint_its_resume_takes(stage, tmp_path):
    """The stop's message named no checkpoint ("resumes from the last checkpoint"): now the one resume=auto takes
    (models.checkpoints.newest_complete), with its step of the budget; an incomplete newer one (stopped while
    saving) is passed over, as the resume passes it."""
    from flare_exp.resume import after_a_stop

    run_dir = tmp_path / "run"
    cfg = compose_cfg([f"stage={stage}", f"{stage}.max_steps=300", f"{stage}.save_steps=3"])
    _checkpoint(run_dir / "checkpoint-3")
    assert after_a_stop(cfg, run_dir) == "resumes from checkpoint-3 (step 3 of 300)"
    _checkpoint(run_dir / "checkpoint-6", complete=False)
    assert after_a_stop(cfg, run_dir) == "resumes from checkpoint-3 (step 3 of 300)"
    _checkpoint(run_dir / "checkpoint-300")
    assert after_a_stop(cfg, run_dir) == ("saves final/ from checkpoint-300 (step 300 of 300: its training had "
                                          "reached max_steps)")
    lowered = compose_cfg([f"stage={stage}", f"{stage}.max_steps=5"])  # the budget lowered: past it, passed over
    assert after_a_stop(lowered, run_dir) == "resumes from checkpoint-3 (step 3 of 5)"


def test_out_of_memory_names_the_checkpoint_its_resume_takes(tmp_path):
    """The out-of-memory error says what a rerun does next, as a stop's message does: the newest complete
    checkpoint within max_steps (one past a budget lowered since is passed over), step 0 and why, a refusal
    under resume=never, the checkpoint resume= names (it said "continues ... (resume=auto)" whatever resume=
    was). That is said of the remedies that keep the run (speed settings); those that change what it trains
    (the batch split, the image size) would be refused under the same run_name: a new one is asked for."""
    from flare_exp.training import out_of_memory_error

    run_dir = tmp_path / "run"
    for step in (3, 9):
        _checkpoint(run_dir / f"checkpoint-{step}")
    remedies = ["set model.gradient_checkpointing=true", "lower sft.per_device_train_batch_size=4",
                "lower model.max_pixels (fewer image tokens per view)"]

    def said(*overrides, given=remedies):
        return str(out_of_memory_error(compose_cfg(["stage=sft", *overrides]), "sft", 5, run_dir, given))

    assert said("sft.max_steps=6") == (
        "sft: the GPU ran out of memory in step 5: set model.gradient_checkpointing=true, and rerun with the same "
        "run_name: it resumes from checkpoint-3 (step 3 of 6). Or lower sft.per_device_train_batch_size=4; or lower "
        "model.max_pixels (fewer image tokens per view): that changes what the run trains, so give it a new "
        "run_name= (it starts from step 0; overwrite=true replaces this run)."), said("sft.max_steps=6")
    assert "it starts again from step 0 (checkpoint-9 is past sft.max_steps=2" in said("sft.max_steps=2")
    assert "it resumes from checkpoint-9 (step 9 of 20)" in said("sft.max_steps=20")
    assert "it is refused (resume=never and 2 checkpoints, the newest checkpoint-9, are there): pass " \
           "resume=auto to continue from it" in said("sft.max_steps=20", "resume=never")
    named = said("sft.max_steps=20", f"resume={run_dir / 'checkpoint-3'}")
    assert f"it resumes from {run_dir / 'checkpoint-3'} again (resume= names it); pass resume=auto to continue " \
           "from checkpoint-9" in named, named
    dotted = said("sft.max_steps=20", f"resume={run_dir}/../run/checkpoint-9")  # the newest one, spelled with ..
    assert "(resume= names it)." in dotted and "pass resume=auto" not in dotted, dotted
    only_changing = said("sft.max_steps=20", given=remedies[1:])
    assert "rerun" not in only_changing and "give it a new run_name=" in only_changing


def test_a_stopped_run_whose_only_checkpoint_is_incomplete_starts_again_from_step_0(tmp_path):
    """A checkpoint cut short while saving (no flare_exp_complete.json) is no resume: the message said
    "resumes"; it says step 0 and why, for a run and for a pipeline's training step."""
    from flare_exp.resume import after_a_stop

    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoint-40", complete=False)
    assert after_a_stop(compose_cfg(["stage=sft"]), run_dir) == (
        "starts it again from step 0 (checkpoint-40 is incomplete: no flare_exp_complete.json (cut short while "
        "saving))")
    _checkpoint(tmp_path / "pipe" / "rl" / "checkpoint-40", complete=False)
    pipeline = compose_cfg(["stage=pipeline", "stage.steps=[rl]", "rl.max_steps=100"])
    assert after_a_stop(pipeline, tmp_path / "pipe") == (
        "runs the pipeline again; its stopped rl step starts again from step 0 (checkpoint-40 is incomplete: no "
        "flare_exp_complete.json (cut short while saving))")


def test_a_stopped_run_with_resume_never_says_the_same_command_is_refused(tmp_path):
    """resume=never on a run dir holding checkpoints is refused at the start (Stage.refuse_resume_never): the
    stop's message promised a resume; it says the refusal and the ways on. Without a checkpoint it starts again."""
    from flare_exp.resume import after_a_stop

    run_dir = tmp_path / "run"
    never = compose_cfg(["stage=sft", "resume=never", "sft.save_steps=2"])
    assert after_a_stop(never, run_dir).startswith("starts it again from step 0 (no checkpoint was saved yet")
    _checkpoint(run_dir / "checkpoint-2")
    assert after_a_stop(never, run_dir) == (
        "is refused (resume=never and checkpoint-2 is there): pass resume=auto to continue from it, or "
        "overwrite=true to start afresh")
    _checkpoint(tmp_path / "pipe" / "sft" / "checkpoint-2")
    assert after_a_stop(compose_cfg(["stage=pipeline", "stage.steps=[sft]", "resume=never"]), tmp_path / "pipe") == (
        "runs the pipeline again; its stopped sft step is refused (resume=never and checkpoint-2 is there): pass "
        "resume=auto to continue from it, or overwrite=true to start afresh")


def test_step_lists_that_make_no_sense_are_refused_and_the_predicting_model_is_not_compared_with_itself(caplog,
                                                                                                         capsys,
                                                                                                         tmp_path):
    """[eval,infer] ran eval first and failed on an empty eval.predictions; [] finished DONE having done nothing;
    [sft,sft] ran sft once; stage.compare naming the model infer predicts with inferred it twice and compared it
    with itself (two more tests in the correction's family)."""
    import logging

    from flare_exp.stages.pipeline import check_steps, compared_sources, planned_steps, say_what_is_compared

    for steps, said in (("[eval,infer]", r"stage.steps=\[eval,infer\] is out of order: .* write stage.steps=\[infer,eval\]"),
                        ("[]", "stage.steps is empty"), ("[sft,sft,infer]", "names sft more than once")):
        with pytest.raises(ValueError, match=said):
            check_steps(compose_cfg(["stage=pipeline", f"stage.steps={steps}"]))
    sys.path.insert(0, str(REPO))
    import launch

    for steps in ("[eval,infer]", "[]", "[sft,sft]", "[foo]"):  # said before Hydra makes a run dir (it left one)
        with pytest.raises(SystemExit):
            launch.check_command_line(["stage=pipeline", f"stage.steps={steps}"])
        err = capsys.readouterr().err
        assert "stage.steps" in err and "nothing was run or written" in err, err
    caplog.set_level(logging.INFO, logger="flare_exp")
    without_rl = compose_cfg(["stage=pipeline", "stage.steps=[prepare,sft,infer,eval]", "stage.compare=[base,sft]"])
    assert compared_sources(without_rl) == ["base"]
    say_what_is_compared(without_rl)
    assert "sft is the model infer predicts with in this pipeline: not compared with itself" in caplog.text
    # rl from an sft run given by hand: that run is the sft model to compare (it was dropped, with an INFO line)
    given = compose_cfg(["stage=pipeline", "stage.steps=[rl,infer,eval]", "stage.compare=[base,sft]",
                         "rl.init_from=/runs/sft"])
    assert compared_sources(given) == ["base", "sft"]
    planned = {name: c.infer.checkpoint for name, _, c, _ in planned_steps(given, tmp_path) if name.startswith("infer")}
    assert planned == {"infer-base": None, "infer-sft": "/runs/sft", "infer": str(tmp_path / "rl")}
    # infer predicting with an adapter given by hand: base beside it is a move to show (it was dropped as "the
    # model infer predicts with"); a model named twice is refused
    given_adapter = compose_cfg(["stage=pipeline", "stage.steps=[prepare,infer,eval]", "stage.compare=[base]",
                                 "infer.checkpoint=/runs/sft"])
    assert compared_sources(given_adapter) == ["base"]
    with pytest.raises(ValueError, match="stage.compare names base more than once"):
        check_steps(compose_cfg(["stage=pipeline", "stage.compare=[base,base]"]))
    # infer.checkpoint naming an sft run: sft is the model infer predicts with, not a step the pipeline lacks
    sft_run = tmp_path / "an-sft-run"
    (sft_run / "final").mkdir(parents=True)
    (sft_run / "final" / "adapter_config.json").write_text("{}")
    for name, text in (("run_info.json", "{}"), ("DONE", ""), ("config.yaml", "stage:\n  name: sft\n")):
        (sft_run / name).write_text(text)
    caplog.clear()
    say_what_is_compared(compose_cfg(["stage=pipeline", "stage.steps=[infer,eval]", "stage.compare=[sft]",
                                      f"infer.checkpoint={sft_run}"]))
    assert f"sft is the model infer predicts with in this pipeline (infer.checkpoint={sft_run} is an sft run)" \
        in caplog.text and "WARNING" not in caplog.text, caplog.text
    caplog.clear()
    say_what_is_compared(compose_cfg(["stage=pipeline", "stage.steps=[rl,infer,eval]", "stage.compare=[sft]"]))
    assert "WARNING" in caplog.text and "sft is not compared" in caplog.text and "rl.init_from" in caplog.text
    whole = compose_cfg(["stage=pipeline", "stage.steps=[prepare,sft,rl,infer,eval]", "stage.compare=[base,sft,rl]"])
    assert compared_sources(whole) == ["base", "sft"]
    assert compared_sources(compose_cfg(["stage=pipeline", "stage.steps=[prepare,infer,eval]",
                                         "stage.compare=[base]"])) == []  # nothing trained: no move to show
