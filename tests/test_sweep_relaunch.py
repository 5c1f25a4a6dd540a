"""A sweep relaunched into a sweep dir whose jobs hold runs made with other settings: refused before any job,
each such job named with its dir, what differs and the fix; the sweep dir's multirun.yaml still the one of the
jobs in it. And a job refused after launch shows no metric of the earlier run left in its dir."""
import json
import os
import subprocess
import sys

from conftest import REPO, compose_cfg

import pytest

from flare_exp import sweep_watch


def _overrides(session_dir, tmp_path):
    return [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}", "stage=sft",
            "run_name=again"]


def _earlier_run(job_dir, overrides, finished: bool) -> None:
    """What an earlier sweep's job left: its fingerprint, and DONE or a checkpoint to resume from."""
    from flare_exp.run.fingerprint import fingerprint

    job_dir.mkdir(parents=True)
    (job_dir / "fingerprint.json").write_text(json.dumps(fingerprint("sft", compose_cfg(overrides))))
    if finished:
        (job_dir / "DONE").write_text("{}")
    else:
        (job_dir / "checkpoint-1").mkdir()


@pytest.mark.slow
def test_a_relaunch_over_jobs_made_with_other_settings_is_refused_before_any_job_and_keeps_multirun_yaml(
        session_dir, tmp_path, tiny_model_dir, demo_prepared):
    """Jobs #0 (finished) and #1 (unfinished) hold runs made with seed=1; #2 one made with its own seed=4: the
    relaunch with seed=2,3,4 names #0 and #1 (dir, seed: 1 -> N, the fix), launches none, and leaves the earlier
    sweep's multirun.yaml as it was."""
    base = _overrides(session_dir, tmp_path)
    sweep = tmp_path / "out" / "sweeps" / "again"
    for n, (seed, finished) in enumerate([(1, True), (1, False), (4, False)]):
        _earlier_run(sweep / str(n), [*base, f"seed={seed}"], finished)
    record = sweep / "multirun.yaml"
    record.write_text("the earlier sweep's record\n")
    os.utime(record, (1_000_000_000, 1_000_000_000))
    proc = subprocess.run([sys.executable, "launch.py", "-m", *base, "hydra/launcher=local", "seed=2,3,4"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the dirs of 2 of 3 jobs hold runs that would refuse them; no job was launched" in proc.stderr, \
        proc.stderr[-3000:]
    (first,) = [line for line in proc.stderr.splitlines() if line.startswith("  job #0 (seed=2): ")]
    assert f"{sweep / '0'} holds a finished sft run made with other settings or inputs: seed: 1 -> 2." in first
    assert "another run_name=" in first and "overwrite=true" in first
    (second,) = [line for line in proc.stderr.splitlines() if line.startswith("  job #1 (seed=3): ")]
    assert f"{sweep / '1'} holds an unfinished sft run" in second and "seed: 1 -> 3" in second
    assert "job #2" not in proc.stderr  # its dir holds a run of its own settings: it resumes
    assert record.read_text() == "the earlier sweep's record\n" and record.stat().st_mtime == 1_000_000_000
    assert not (sweep / ".submitit").exists() and not (sweep / "0" / "FAILED").exists()


@pytest.mark.slow
def test_a_relaunch_with_resume_never_over_checkpoints_is_refused_before_any_job(session_dir, tmp_path, tiny_model_dir,
                                                                                 demo_prepared):
    """resume=never over a job's checkpoints (same settings): said before launch, not after the job has loaded
    its model (on a cluster: after its queue wait)."""
    base = _overrides(session_dir, tmp_path)
    sweep = tmp_path / "out" / "sweeps" / "again"
    for n, seed in enumerate((1, 2)):
        _earlier_run(sweep / str(n), [*base, f"seed={seed}"], False)
        (sweep / str(n) / "checkpoint-1" / "flare_exp_complete.json").write_text('{"files": {}}')  # whole
    proc = subprocess.run([sys.executable, "launch.py", "-m", *base, "hydra/launcher=local", "seed=1,2",
                           "resume=never"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the dirs of 2 of 2 jobs hold runs that would refuse them; no job was launched" in proc.stderr
    assert f"{sweep / '0'} already holds checkpoints (checkpoint-1) and resume=never" in proc.stderr


def test_a_job_refused_at_its_start_shows_no_metric_of_the_earlier_run_in_its_dir(tmp_path, capsys):
    """Job #0's dir holds an earlier run, finished with a metric; the job, refused before touching it, fails:
    its line has no metric, and the closing lines say where each failure's reason is (its line, or the
    traceback in the FAILED file the job wrote)."""
    from hydra.core.utils import JobReturn, JobStatus

    from flare_exp.run.lifecycle import run_with_markers
    from flare_exp.run.record import write_failed

    dirs = [tmp_path / "0", tmp_path / "1"]
    for d in dirs:
        (d / "eval").mkdir(parents=True)
    (dirs[0] / "eval" / "metrics.json").write_text(json.dumps(
        {"rl": {"official": {"multi_label": {"f1_score": 0.4815}}}}))
    run_with_markers(dirs[0], lambda: {"ok": 1})
    os.utime(dirs[0] / "DONE", (1_000_000_000, 1_000_000_000))  # an earlier launch's
    sweep_watch.FAILURES.clear()
    with sweep_watch.Progress(dirs, ["w=0.5", "w=1"], poll_s=60) as progress:
        try:
            raise ValueError("cut short")
        except ValueError as e:
            write_failed(dirs[1], e)
    returns = [JobReturn(), JobReturn()]
    for ret, why in zip(returns, ["RunSettingsChangedError: other settings", "ValueError: cut short"]):
        ret.status, ret._return_value = JobStatus.FAILED, RuntimeError(why)
    sweep_watch.record_results(progress, returns)
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if "#0 (w=0.5) FAILED" in l]
    assert "0.4815" not in line and "f1_score" not in line, line
    assert "traceback in each job's FAILED file" not in err
    assert "2 of 2 job(s) FAILED" in err
    assert "job #0 (w=0.5): RuntimeError: RunSettingsChangedError: other settings (no FAILED file" in err
    assert f"job #1 (w=1): RuntimeError: ValueError: cut short (traceback in {dirs[1] / 'FAILED'})" in err


@pytest.mark.slow
def test_jobs_refused_by_one_shared_prepared_dir_are_named_once_with_the_dir(session_dir, tmp_path):
    """A pipeline sweep whose prepare step shares one data.prepared_dir, which holds a finished prepare made with
    another data.demo.seed: every job is refused for that one dir. The refusal said "the dirs of 2 of 2 jobs hold
    runs made with other settings" and the same reason twice; now once, naming the dir and the jobs sharing it."""
    from flare_exp.run.fingerprint import fingerprint

    prepared = tmp_path / "prepared"
    base = [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}", "stage=pipeline",
            "stage.steps=[prepare]", f"data.prepared_dir={prepared}", "run_name=shared"]
    prepared.mkdir()
    (prepared / "fingerprint.json").write_text(json.dumps(fingerprint(
        "prepare", compose_cfg([*base, "data.demo.seed=1"]))))
    (prepared / "DONE").write_text("{}")
    proc = subprocess.run([sys.executable, "launch.py", "-m", *base, "hydra/launcher=local", "seed=2,3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "one dir shared by 2 of 2 jobs holds a run that would refuse them; no job " \
           "was launched" in err, err[-3000:]
    assert "the dirs of" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("  jobs ")]
    assert line.startswith(f"  jobs #0 (seed=2) and #1 (seed=3) share {prepared}: [prepare] {prepared} holds a "
                           "finished step made with other settings or inputs: data.demo.seed: 1 -> 0."), line
    assert "job #0" not in err and "job #1" not in err  # said once, not per job
    assert not (tmp_path / "out" / "sweeps" / "shared" / ".submitit").exists()


def test_a_shared_dir_is_said_once_beside_the_jobs_refused_in_their_own():
    """The refusal's lines and headline: jobs refused in their own dirs one line each; jobs sharing a dir one
    line naming them and the dir (each job's reason under it when they differ)."""
    from flare_exp.sweep_checks import held_headline, held_lines

    refused = {"/s/0/sft": [("#0 (a=1)", "/s/0/sft holds x")],
               "/p": [("#1 (a=2)", "/p holds y"), ("#2 (a=3)", "/p holds y")],
               "/q": [("#3 (a=4)", "/q holds z: 1 -> 4"), ("#4 (a=5)", "/q holds z: 1 -> 5")]}
    assert held_lines(refused) == [
        "  job #0 (a=1): /s/0/sft holds x",
        "  jobs #1 (a=2) and #2 (a=3) share /p: /p holds y",
        "  jobs #3 (a=4) and #4 (a=5) share /q:\n    - job #3 (a=4): /q holds z: 1 -> 4\n"
        "    - job #4 (a=5): /q holds z: 1 -> 5"]
    assert held_headline(refused, 6) == [
        "the dirs of 1 of 6 jobs hold runs and 2 dirs, each shared by several jobs (4 of 6), "
        "hold runs that would refuse them"]
    assert held_headline({"/p": refused["/p"]}, 2) == [
        "one dir shared by 2 of 2 jobs holds a run that would refuse them"]
    assert held_headline({}, 2) == []


@pytest.mark.slow
def test_the_same_pipeline_sweep_again_under_a_relative_output_root_reuses_its_jobs(session_dir, tmp_path,
                                                                                   tiny_model_dir, demo_prepared):
    """The README's demo sweep run twice (paths.output_root=outputs, relative): the second launch reuses every
    job's steps. The pre-launch check derived the steps' paths from the relative sweep dir while the jobs had
    recorded absolute ones, and refused every job."""
    command = [sys.executable, str(REPO / "launch.py"), "-m", f"paths.cache_dir={session_dir / 'cache'}",
               "paths.output_root=out", "stage=pipeline", "stage.steps=[sft,infer]", "stage.compare=[]",
               "run_name=twice", "sft.max_steps=1", "infer.num_samples=2", "infer.max_new_tokens=2", "seed=1"]
    for attempt in ("first", "again"):
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, (attempt, proc.stderr[-3000:])
    assert "held" not in proc.stderr and "would refuse" not in proc.stderr
    assert "[infer] already finished" in proc.stderr + proc.stdout  # its checkpoint: the sft step's dir


def test_a_second_sweep_into_a_sweep_dir_in_use_is_refused_before_it_writes_there(tmp_path):
    """The same -m command launched twice at once: the second is refused (exit 2, naming the first's pid) before
    Hydra writes its multirun.yaml or starts a job, so the first runs its jobs alone and ends 0; once the first
    is gone its lock is taken over and released at the end."""
    import time

    from test_runlock import _fake_holder

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                                 "prediction": "A"}) + "\n")
    argv = [sys.executable, "launch.py", "-m", "stage=eval", f"eval.predictions=[{preds}]", "eval.radgraph=false",
            f"paths.output_root={tmp_path / 'out'}", "run_name=sw", "seed=1,2"]
    sweep = tmp_path / "out" / "sweeps" / "sw"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.05)
        _fake_holder(sweep, sleeper.pid)
        os.rename(sweep / ".lock", sweep / ".sweep.lock")
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "another sweep is running in this sweep dir; nothing was launched" in proc.stderr
        assert f"pid {sleeper.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(p.name for p in sweep.iterdir()) == [".sweep.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (sweep / "0" / "DONE").exists() and (sweep / "1" / "DONE").exists()
    assert not (sweep / ".sweep.lock").exists()
    # the same sweep again (after a kill, say): its finished jobs are kept, not failures
    (sweep / "1" / "DONE").unlink()  # as if killed before its end: it runs again
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "#0 (seed=1) DONE (finished before this launch: kept)" in proc.stderr and "FAILED" not in proc.stderr
    assert (sweep / "1" / "DONE").exists()


def test_a_relaunched_sweep_says_its_kept_jobs_first_with_the_overrides_they_were_made_with(tmp_path):
    """Job #0 finished with seed=1, job #1 was killed: the relaunch (seed=4,5; seed decides nothing of an eval)
    says #0 kept once, before #1 runs (it was said only when the whole sweep ended), with the seed its run was
    made with beside this launch's."""
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                                 "prediction": "A"}) + "\n")
    argv = [sys.executable, "launch.py", "-m", "stage=eval", f"eval.predictions=[{preds}]", "eval.radgraph=false",
            f"paths.output_root={tmp_path / 'out'}", "run_name=kept"]
    sweep = tmp_path / "out" / "sweeps" / "kept"
    first = subprocess.run([*argv, "seed=1,2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (sweep / "1" / "DONE").unlink()  # as if killed before its end
    proc = subprocess.run([*argv, "seed=4,5"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # Hydra's log lines in order
    assert proc.returncode == 0, proc.stdout[-2000:]
    lines = proc.stdout.splitlines()
    kept = [i for i, line in enumerate(lines) if line.startswith("[flare-exp sweep] ") and "#0 (" in line]
    assert len(kept) == 1, lines
    assert lines[kept[0]].startswith("[flare-exp sweep] 1/2 #0 (seed=4; the kept run was made with seed=1) DONE "
                                     "(finished before this launch: kept) in "), lines
    assert "| 1 left" in lines[kept[0]] and "ETA" not in lines[kept[0]]  # no rate from a job this launch kept
    (launching,) = [i for i, line in enumerate(lines) if "Launching 2 jobs" in line]  # Hydra's, as the jobs start
    assert kept[0] < launching
    assert any("#1 (seed=5) DONE in" in line for line in lines[launching:])
    assert "seed=1" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()  # the kept run's record stays
    assert any("1 job(s) launched, 1 kept from an earlier launch:" in line for line in lines), lines
    # a third launch, one job, the swept key spelled ++: job #1 is the earlier launch's now, and said so by the
    # report (the launch's own record, not its spelling: "++seed=4" and "seed=4" are one setting)
    third = subprocess.run([*argv, "++seed=4", "overwrite=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    launched = json.loads((sweep / ".launch.json").read_text())["jobs"]
    assert list(launched) == ["0"] and "++seed=4" in launched["0"]["overrides"] and not launched["0"]["kept"]
    from flare_exp.reports.sweep_jobs import collect

    jobs = {j["job"]: j for j in collect(sweep)}
    assert not jobs["0"].get("earlier_launch") and jobs["1"]["earlier_launch"]
    assert "not one of the latest launch's 1 job(s)" in jobs["1"]["error"]
    assert jobs["0"]["overrides"]["seed"] == "4" and "++seed" not in jobs["0"]["overrides"]
