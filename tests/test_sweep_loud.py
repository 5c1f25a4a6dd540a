"""Sweeps fail loudly and can be stopped: every job's settings checked before any launch, a line per finished
job, the failed ones named, SIGTERM reaching the workers, an Optuna search with failed trials ending non-zero."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from flare_exp import sweep_checks, sweep_stop, sweep_watch


def test_a_sweep_with_one_bad_job_launches_none_and_names_it(session_dir, tmp_path):
    """One subprocess sweep (prepare: the lightest stage to check): job #1's data.image_workers=-1 is refused
    before job #0 is launched."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "launch.py", "-m", f"paths.output_root={out}",
                           f"paths.cache_dir={session_dir / 'cache'}", "hydra/launcher=local", "run_name=two",
                           "stage=prepare", "data.image_workers=1,-1",
                           f"data.prepared_dir={tmp_path}/prepared-${{data.image_workers}}"],  # one each: not refused
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "1 of 2 jobs of the sweep have settings a run would refuse; no job was launched" in proc.stderr
    assert "job #1 (data.image_workers=-1)" in proc.stderr and "data.image_workers=-1: must be" in proc.stderr
    assert not out.exists()  # the sweep dir (and the folders above it) this refused launch made: gone again


def test_a_refused_sweep_removes_only_the_empty_dirs_it_made(tmp_path):
    """A sweep refused before any job (multirun.yaml put back, the sweep lock let go): the sweep dir and the
    folders above it that this launch made go while empty; a dir that was there, or that holds anything, stays."""
    from omegaconf import OmegaConf

    from flare_exp.sweep_dir import SweepRecord, lock_sweep

    def refused(sweep_dir):
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
        record = SweepRecord(config)  # as the launcher's setup takes it, before the lock
        lock_sweep(config)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "multirun.yaml").write_text("this sweep's\n")  # Hydra's sweeper writes it
        assert (sweep_dir / ".sweep.lock").exists()
        record.restore()

    refused(tmp_path / "out" / "sweeps" / "new")
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept" / "sweeps" / "there").mkdir(parents=True)
    refused(tmp_path / "kept" / "sweeps" / "there")
    assert sorted(p.name for p in (tmp_path / "kept" / "sweeps").iterdir()) == ["there"]
    assert not any((tmp_path / "kept" / "sweeps" / "there").iterdir())
    (tmp_path / "kept" / "sweeps" / "mine.txt").write_text("x")  # a dir above it that holds something
    refused(tmp_path / "kept" / "sweeps" / "other" / "deep")
    assert sorted(p.name for p in (tmp_path / "kept" / "sweeps").iterdir()) == ["mine.txt", "there"]


def test_a_range_error_in_a_jobs_own_group_file_names_the_file(session_dir, tmp_path):
    """A sweep over the user's experiment files (--config-dir): the job whose file sets a value out of range hears
    the file, as a single run does (the per-job list named the key alone)."""
    conf = tmp_path / "cd"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "good.yaml").write_text("# @package _global_\ndefaults: [demo]\ndata:\n  image_workers: 1\n")
    (conf / "experiment" / "bad.yaml").write_text("# @package _global_\ndefaults: [demo]\ndata:\n  image_workers: -1\n")
    proc = subprocess.run([sys.executable, "launch.py", "--config-dir", str(conf), "-m", "experiment=good,bad",
                           f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={session_dir / 'cache'}",
                           "stage=prepare"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "1 of 2 jobs of the sweep have settings a run would refuse" in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "data.image_workers=-1" in line]
    assert line.endswith(f", set in {conf / 'experiment' / 'bad.yaml'}"), line


def test_a_line_per_finished_job_and_the_failures_named(tmp_path, capsys):
    from hydra.core.utils import JobReturn, JobStatus

    from flare_exp.run.lifecycle import run_with_markers
    from flare_exp.run.record import write_failed

    dirs = [tmp_path / "0", tmp_path / "1"]
    for d in dirs:
        d.mkdir()
    sweep_watch.FAILURES.clear()
    with sweep_watch.Progress(dirs, ["a=1", "a=2"], poll_s=0.05) as progress:
        run_with_markers(dirs[0], lambda: {"ok": 1})
        progress.poll()
        first = capsys.readouterr().err
        write_failed(dirs[1], ValueError("rl.num_generations=3: not divisible"))
    ok, bad = JobReturn(), JobReturn()
    ok.status, bad.status, bad._return_value = JobStatus.COMPLETED, JobStatus.FAILED, ValueError("not divisible")
    sweep_watch.record_results(progress, [ok, bad])
    err = first + capsys.readouterr().err
    assert "1/2 #0 (a=1) DONE in 0 s | 1 left, ETA" in err
    assert "2/2 #1 (a=2) FAILED" in err and "all finished" in err
    assert "1 of 2 job(s) FAILED" in err and "job #1 (a=2): ValueError: not divisible" in err
    assert list(sweep_watch.FAILURES) == [str(dirs[1])]


def test_a_job_refused_before_its_dir_says_whose_failed_is_there(tmp_path, capsys):
    """A job refused before it touched its dir (resume=never over an earlier attempt's checkpoints) wrote no
    FAILED: the earlier attempt's FAILED there is named as such, not denied."""
    from hydra.core.utils import JobReturn, JobStatus

    dirs = [tmp_path / "0", tmp_path / "1"]
    for d in dirs:
        d.mkdir()
    (dirs[1] / "FAILED").write_text("stopped from outside (KeyboardInterrupt): ...\n")  # the earlier attempt's
    os.utime(dirs[1] / "FAILED", (time.time() - 3600, time.time() - 3600))
    sweep_watch.FAILURES.clear()
    with sweep_watch.Progress(dirs, ["a=1", "a=2"], poll_s=60) as progress:
        rets = [JobReturn(), JobReturn()]
        for ret in rets:
            ret.status, ret._return_value = JobStatus.FAILED, ValueError("resume=never: refused")
        failed = sweep_watch.record_results(progress, rets)
    assert failed[0].endswith("(no FAILED file: stopped before touching its dir, which holds what it held)")
    assert failed[1].endswith("(its FAILED is an earlier attempt's: stopped before touching its dir, which holds "
                              "what it held)")


def test_a_job_with_a_child_of_its_own_gets_the_stop(tmp_path):
    """controller -> job -> the job's own child (a DataLoader worker): the stop went to the tree's leaves, so a job
    that had a child at that moment was passed over and finished DONE after the sweep said its workers stopped."""
    job = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as launch.py's jobs (hear_the_sweeps_stop)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                                  "signal.SIG_IGN); time.sleep(30)"])
        open({str(tmp_path / 'ready')!r}, "w").write("its child started")
        try:
            time.sleep(8)  # its work, which ends DONE unless stopped
            open({str(tmp_path / 'stopped')!r}, "w").write("finished after the stop")
        except KeyboardInterrupt:
            open({str(tmp_path / 'stopped')!r}, "w").write("job")
        child.kill()
    """)
    controller = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {job!r}])"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from flare_exp import sweep_stop
        controller = subprocess.Popen([sys.executable, "-c", {controller!r}])
        deadline = time.time() + 40  # the job and its child running (a loaded machine starts them slowly)
        while not os.path.exists({str(tmp_path / 'ready')!r}) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        sweep_stop.stop_workers(grace_s=6.0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "stopped").read_text() == "job"


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])  # SIGHUP: its terminal closed
def test_sigterm_stops_workers_that_ignore_it(tmp_path, name, code):
    """A worker ignoring SIGTERM and SIGINT (as submitit's do SIGTERM): the sweep process, sent SIGTERM (or
    SIGHUP: the workers outlived a closed terminal), stops it and exits 128 + the signal; nothing is left
    running."""
    script = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from flare_exp import sweep_stop
        worker = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                   "[signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)]; "
                                   "time.sleep(600)"])
        open({str(tmp_path / 'pid')!r}, "w").write(str(worker.pid))
        time.sleep(0.5)
        with sweep_stop.ForwardStops(grace_s=1.0):
            os.kill(os.getpid(), signal.{name})
            time.sleep(60)
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        pid = int((tmp_path / "pid").read_text())
        assert proc.returncode == code, proc.stderr
        assert f"{name}: 1 worker process(es) stopped" in proc.stderr
        assert not sweep_stop._alive([pid])
    finally:  # a failing run leaves no worker behind
        if (tmp_path / "pid").exists() and sweep_stop._alive([int((tmp_path / "pid").read_text())]):
            os.kill(int((tmp_path / "pid").read_text()), 9)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_to_a_sweep_running_its_job_in_process_leaves_failed_in_the_job_dir_and_says_so(tmp_path, name,
                                                                                                code):
    """hydra/launcher=watched (the default for -m) runs each job in the sweep's process: SIGTERM used to end it
    on the spot, the running job's dir left without a marker. Now it stops as Ctrl-C does: FAILED (stopped from
    outside), one line naming the unfinished job, exit 143."""
    job = tmp_path / "0"
    job.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from flare_exp import sweep_stop
        from flare_exp.run.lifecycle import run_with_markers
        with sweep_stop.StopInProcess([Path({str(job)!r})]):
            run_with_markers(Path({str(job)!r}), lambda: (os.kill(os.getpid(), signal.{name}), time.sleep(60)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert (job / "FAILED").read_text().startswith(f"stopped from outside (KeyboardInterrupt: {name})")
    assert f"[flare-exp sweep] {name}: the sweep stopped; 1 job(s) not finished (#0: " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sweep_whose_jobs_an_earlier_launchs_workers_still_run_is_refused_naming_them(tmp_path, capsys):
    """A local sweep's launcher killed with kill -9: its workers live on and hold their jobs. The same command
    took the sweep over, launched every job, each refused on its lock, and said '4 of 4 job(s) failed' while the
    workers went on to finish them. It is refused before any job, naming the workers."""
    job = tmp_path / "sweep" / "1" / "rl"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from flare_exp.run.lock import RunLock
        RunLock(Path({str(job)!r})).acquire()
        open({str(tmp_path / 'held')!r}, "w").write("held")
        time.sleep(60)
    """)
    from omegaconf import OmegaConf

    from flare_exp.sweep_dir import lock_sweep, unlock_sweep

    worker = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(100):
            if (tmp_path / "held").exists():
                break
            time.sleep(0.1)
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep"), "subdir": "${hydra.job.num}"}}})
        with pytest.raises(SystemExit) as stopped:
            lock_sweep(config)
        assert stopped.value.code == 2
        said = capsys.readouterr().err
        assert f"1 of its job(s) are still being run by an earlier launch (pids {worker.pid}; e.g. {job})" in said
        assert "nothing was launched" in said
        worker.kill()
        worker.wait()
        lock_sweep(config)  # its workers gone: the sweep goes on
        unlock_sweep(tmp_path / "sweep")
    finally:
        if worker.poll() is None:
            worker.kill()


def test_an_optuna_search_with_failed_trials_ends_non_zero_naming_them():
    import optuna

    from flare_exp.optuna_search import SearchFailedError, raise_for_failed_trials

    study = optuna.create_study()
    good, bad = study.ask(), study.ask()
    study.tell(good, 1.0)
    bad.set_user_attr("failure", "ValueError: rl.num_generations=3: not divisible")
    study.tell(bad, state=optuna.trial.TrialState.FAIL)
    raise_for_failed_trials(study, [good.number])  # this search's trials all completed
    with pytest.raises(SearchFailedError, match=r"(?s)1 of 2 trial\(s\) failed.*trial 1: ValueError: rl.num_gen"):
        raise_for_failed_trials(study, [good.number, bad.number])


def test_the_stop_message_counts_what_the_job_dirs_say(tmp_path):
    """A stop just after the last job finished cut nothing short, and says so; otherwise it names the unfinished
    jobs (FAILED or never started) apart from the finished ones."""
    dirs = [tmp_path / str(i) for i in range(3)]
    for d in dirs:
        d.mkdir()
        (d / "DONE").write_text("")
    assert sweep_stop.jobs_after_stop(dirs) == "all 3 job(s) had finished (DONE) before the stop: nothing was cut short"
    (dirs[1] / "DONE").unlink()
    (dirs[1] / "FAILED").write_text("stopped from outside")
    (dirs[2] / "DONE").unlink()
    said = sweep_stop.jobs_after_stop(dirs)
    assert said.startswith("2 job(s) not finished (#1, #2: ") and "1 finished (DONE)" in said, said
    # an Optuna search's rerun retries its stopped trials as new ones from their first step (it said "resumes from
    # checkpoint-24", which a new trial does not)
    said = sweep_stop.jobs_after_stop(dirs, trials=True)
    assert "retries the stopped ones as new trials" in said and "resumes" not in said, said


def test_a_stopped_jobs_line_gives_no_eta(tmp_path, capsys):
    """The rate so far says nothing of when a stopped sweep ends: a job stopped from outside (its FAILED says so,
    a rank's too) had an ETA on its line; now the jobs left are counted alone. A job that failed keeps it."""
    from flare_exp.run.record import write_failed

    dirs = [tmp_path / str(i) for i in range(4)]
    for d in dirs:
        d.mkdir()
    with sweep_watch.Progress(dirs, ["a=1", "a=2", "a=3", "a=4"], poll_s=60) as progress:
        for job, error, rank in ((dirs[0], KeyboardInterrupt("SIGTERM"), None), (dirs[1], SystemExit(143), 1),
                                 (dirs[2], ValueError("not divisible"), None), (dirs[3], SystemExit(143), None)):
            try:
                raise error
            except BaseException as e:  # noqa: BLE001  (as the run's lifecycle writes it)
                write_failed(job, e, rank=rank)
        progress.poll()
    lines = [line for line in capsys.readouterr().err.splitlines() if " FAILED in " in line]
    assert ": stopped from outside (KeyboardInterrupt: SIGTERM)" in lines[0] and lines[0].endswith(" | 3 left")
    assert ": rank 1: stopped from outside (SystemExit: 143)" in lines[1] and lines[1].endswith(" | 2 left")
    assert ": ValueError: not divisible | 1 left, ETA ~" in lines[2], lines
    assert lines[3].endswith(" | all ended"), lines  # the last one stopped: not "all finished"


def test_jobs_that_would_prepare_different_data_into_one_dir_are_named():
    """A pipeline sweep over a data.* key with one data.prepared_dir: the second job would stop at its start
    (the dir holds the first one's data), after the sweep launched; now refused before any job."""
    from conftest import compose_cfg

    def target(*overrides):
        return sweep_checks.prepare_target(compose_cfg(["stage=pipeline", "stage.steps=[prepare,sft]",
                                                       "data.prepared_dir=/tmp/one", *overrides]))

    two, one = target("data.datasets=[IU_XRay,chestdr]"), target("data.datasets=[IU_XRay]")
    assert sweep_checks.prepare_target(compose_cfg(["stage=infer"])) is None  # prepares nothing
    (clash,) = sweep_checks.shared_prepare_conflicts([two, None, one, two], first_idx=4)
    assert clash.startswith("  jobs #4 and #6 would prepare different data into one data.prepared_dir=/tmp/one")
    assert "data.datasets: ['IU_XRay', 'chestdr'] -> ['IU_XRay']" in clash
    assert sweep_checks.shared_prepare_conflicts(
        [two, target("data.datasets=[IU_XRay,chestdr]", "sft.max_steps=3"), two], first_idx=0) == []  # sft only


def test_stage_prepare_jobs_sharing_one_prepared_dir_are_refused_before_any_runs():
    """A stage=prepare sweep whose jobs share one data.prepared_dir: the first finished it and the others were
    refused one by one as finished runs. Now refused before any job, naming the dir, the jobs by the overrides
    that differ and the way out; a pipeline's jobs reuse the dir (nothing said), jobs with their own dirs pass."""
    from conftest import compose_cfg

    def target(*overrides):
        return sweep_checks.prepare_target(compose_cfg(["stage=prepare", "data.prepared_dir=/tmp/one", *overrides]))

    same = [target("seed=1"), target("seed=2"), None, target("seed=3")]
    (line,) = sweep_checks.shared_prepare_runs(same, ["seed=1", "seed=2", "stage=infer", "seed=3"], first_idx=2)
    assert line.startswith("  jobs #2 (seed=1), #3 (seed=2) and #5 (seed=3) would each run stage=prepare into one "
                           "data.prepared_dir=/tmp/one"), line
    assert "the same data: drop the sweep" in line and "give each job its own data.prepared_dir" in line
    (line,) = sweep_checks.shared_prepare_runs([target(), target("data.datasets=[IU_XRay]")], ["a", "b"], 0)
    assert "different data (data.datasets: " in line and "drop the sweep" not in line
    assert sweep_checks.shared_prepare_conflicts(same, first_idx=0) == []  # said once, by shared_prepare_runs
    assert sweep_checks.shared_prepare_runs([target("data.prepared_dir=/tmp/a"), target("data.prepared_dir=/tmp/b")],
                                            ["a", "b"], 0) == []
    pipeline = sweep_checks.prepare_target(compose_cfg(["stage=pipeline", "data.prepared_dir=/tmp/one"]))
    assert sweep_checks.shared_prepare_runs([pipeline, pipeline], ["a", "b"], 0) == []


@pytest.mark.slow
def test_a_local_sweep_whose_worker_is_killed_reports_every_job_and_names_the_dead_one(session_dir, tmp_path):
    """hydra/launcher=local: job #0's worker dies without Python's clean-up (SIGKILL, as kill -9 or the OOM killer
    send). Hydra's launch raised submitit's UncompletedJobError there: the worker's stderr as a traceback, no
    line for job #1, no summary. Now job #1's line, a FAILED line for #0 saying its worker was killed, the
    summary and the sweep_report command; exit 1."""
    script = tmp_path / "sweep_k9.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import hydra
        import launch  # the schema and resolvers launch.py registers

        @hydra.main(version_base="1.3", config_path=str(launch.CONF_DIR), config_name="config")
        def task(cfg):  # pickled by value (defined in __main__): the worker runs this, not launch.main
            if cfg.seed == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return {{"seed": cfg.seed}}

        task()
    """))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "-m", "hydra/launcher=local", "stage=prepare",
                           "run_name=k9", f"paths.output_root={out}", f"paths.cache_dir={session_dir / 'cache'}",
                           "seed=1,2", f"data.prepared_dir={tmp_path}/prepared-${{seed}}"],  # one each: not refused
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "UncompletedJobError" not in err, err[-3000:]
    assert "#0 (seed=1) FAILED in " in err and f": {sweep_watch.WORKER_DIED} | " in err, err[-3000:]
    assert "#1 (seed=2) DONE in " in err
    sweep = out / "sweeps" / "k9"
    assert "1 of 2 job(s) FAILED:\n" in err
    (summary,) = [line for line in err.splitlines() if line.startswith("  job #0 (seed=1): ")]
    assert f"{sweep_watch.WORKER_DIED} (no FAILED file: killed mid-run" in summary
    assert f"its worker's log: {sweep / '.submitit'}" in summary and summary.endswith("_0_log.err)"), summary
    assert f"Report: python launch.py stage=sweep_report sweep_report.sweep_dir={sweep}" in err


def test_a_dead_worker_is_a_failed_job_and_a_python_failure_still_raises():
    """What the watched submitit launchers collect per job: a result as it is; a worker that left no result
    (submitit's UncompletedJobError) a failed JobReturn; a failure with a traceback outside Hydra's run_job
    (FailedJobError) raised as before, its traceback not hidden."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import FailedJobError, UncompletedJobError

    class Job:
        def __init__(self, outcome):
            self.outcome, self.state = outcome, "OUT_OF_MEMORY"

        def results(self):
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return [self.outcome]

    done = JobReturn(status=JobStatus.COMPLETED)
    assert sweep_watch.job_return(Job(done)) is done
    dead = sweep_watch.job_return(Job(UncompletedJobError("Job 1 has not produced any output\n" + "log\n" * 200)),
                                  ["seed=1"])
    assert dead.status == JobStatus.FAILED and dead.overrides == ["seed=1"]
    assert isinstance(dead._return_value, sweep_watch.WorkerDiedError) and dead._return_value.state == "OUT_OF_MEMORY"
    assert str(dead._return_value) == sweep_watch.WORKER_DIED
    with pytest.raises(FailedJobError, match="failed during processing"):
        sweep_watch.job_return(Job(FailedJobError("Job (task=0) failed during processing with trace: ...")))


def test_the_stop_message_says_per_job_what_rerunning_does_from_its_own_run_dir(tmp_path):
    """A stopped sweep said "rerunning the same command resumes the unfinished ones", of a job that had saved no
    checkpoint too: now each unfinished job gets a single run's stop wording (resume.after_a_stop) for its own
    run dir and config: step 0 with why, or the checkpoint its resume takes; a job never started runs."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from flare_exp.models.checkpoints import TRAINING_STATE, mark_complete

    dirs = [tmp_path / str(i) for i in range(4)]
    for d, max_steps in zip(dirs, (1, 400, 400, 400)):
        d.mkdir()
        OmegaConf.save(compose_cfg(["stage=sft", f"sft.max_steps={max_steps}", "sft.save_steps=50"]), d / "config.yaml")
    (dirs[0] / "DONE").write_text("")
    (dirs[1] / "FAILED").write_text("stopped from outside")
    (dirs[2] / "FAILED").write_text("stopped from outside")
    checkpoint = dirs[2] / "checkpoint-50"
    checkpoint.mkdir()
    for name in TRAINING_STATE:
        (checkpoint / name).write_text("x")
    mark_complete(checkpoint)
    (dirs[3] / "config.yaml").unlink()  # never started
    said = sweep_stop.jobs_after_stop(dirs)
    assert said.startswith("3 job(s) not finished (#1, #2, #3: ") and "1 finished (DONE)" in said, said
    assert "resumes the unfinished" not in said
    assert ("#1: starts it again from step 0 (no checkpoint was saved yet: one is saved every sft.save_steps=50 "
            "steps)") in said, said
    assert "#2: resumes from checkpoint-50 (step 50 of 400)" in said, said
    assert "#3: runs it (it had not started)" in said, said
    assert "#0" not in said.split("per job: ")[1]


def test_a_stopped_jobs_failed_line_says_what_a_rerun_does_from_its_run_dir(tmp_path, capsys):
    """The sweep's line for a job stopped mid-run is its FAILED's first line: it said "a requeued job or a rerun
    with the same run_name resumes", of a job that had saved no checkpoint too; now after_a_stop's wording for
    the job's own run dir and config."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from flare_exp.resume import after_a_stop_in
    from flare_exp.run.record import write_failed

    job = tmp_path / "1"
    job.mkdir()
    OmegaConf.save(compose_cfg(["stage=sft", "sft.max_steps=400", "sft.save_steps=50"]), job / "config.yaml")
    (job / "checkpoint-50").mkdir()  # cut short while saving: no flare_exp_complete.json
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        write_failed(job, e, after_a_stop=after_a_stop_in)  # as the run's lifecycle passes it
    first = (job / "FAILED").read_text().splitlines()[0]
    assert first == ("stopped from outside (KeyboardInterrupt): preempted, timed out or cancelled; a requeued job or "
                     "a rerun with the same run_name starts it again from step 0 (checkpoint-50 is incomplete: no "
                     "flare_exp_complete.json (cut short while saving))"), first
    with sweep_watch.Progress([job], ["sft.max_steps=400"], poll_s=60) as progress:
        progress.finished(0, "FAILED")  # the sweep's line: the whole sentence, not the runs table's 200 characters
    err = capsys.readouterr().err
    assert f": {first} | all ended" in err, err


def test_a_missing_choice_all_jobs_share_is_named_once(capsys):
    """-m model=tiny_typo experiment=demo,nonexist: each experiment choice was composed with its own overrides,
    so model=tiny_typo came once as one choice's problem and again in the other's "2 choices ..." list. Now
    once, in one list with experiment=nonexist."""
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["-m", "stage=prepare", "model=tiny_typo", "seed=1,2", "experiment=demo,nonexist"])
    err = capsys.readouterr().err
    assert err.count("model=tiny_typo on the command line: no model/tiny_typo.yaml") == 1, err
    assert "2 choices on the command line do not exist:" in err and "problems with the settings" not in err, err
    assert "- experiment=nonexist (in experiment=demo,nonexist) on the command line: no experiment/nonexist.yaml" \
        in err, err


def test_a_batch_refused_after_earlier_batches_ran_says_so(session_dir, tmp_path):
    """With hydra.sweeper.max_batch_size each batch is checked as it comes: a refused second batch said "no job
    was launched" (and "1 of 1 jobs of the sweep") after job #0 had run."""
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                                 "prediction": "A"}) + "\n")
    proc = subprocess.run([sys.executable, "launch.py", "-m", "stage=eval", "eval.radgraph=false",
                           f"eval.predictions=[{preds}],[{tmp_path / 'missing.jsonl'}]", "run_name=batches",
                           f"paths.output_root={tmp_path / 'out'}", "hydra.sweeper.max_batch_size=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 of 1 jobs of this batch have settings a run would refuse; no job of this batch (#1-#1) was launched; " \
           "the 1 job(s) of the batches before it ran" in proc.stderr, proc.stderr[-2000:]


def test_a_local_job_handed_sigint_ignored_hears_the_stop(monkeypatch):
    """A sweep started in the background from a script hands its jobs SIGINT ignored: a local job takes it back
    (stop_workers stops jobs with SIGINT); a process that is no local job keeps what it was given."""
    import signal

    from flare_exp.sweep_stop import hear_the_sweeps_stop

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
        assert not hear_the_sweeps_stop() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "12345")
        assert hear_the_sweeps_stop() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert not hear_the_sweeps_stop()  # already heard: nothing to change
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_custom_subdir_is_where_the_checks_and_the_watch_look(tmp_path):
    """hydra.sweep.subdir=seed_${seed}: the launcher looked for job dirs named 0, 1 (its checks at dirs no job
    writes, its watch at markers never written: a line per job only at the end, without the metric). Now each
    job's dir is resolved as Hydra's run_job names it."""
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                                 "prediction": "A"}) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "launch.py", "-m", "stage=eval", "eval.radgraph=false", "seed=1,2",
                           f"eval.predictions=[{preds}]", "run_name=named", f"paths.output_root={out}",
                           "hydra.sweep.subdir=seed_${seed}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[flare-exp sweep] ") and "/2 #" in line]
    assert len(lines) == 2 and all("classification.balanced_accuracy=1.0000" in line for line in lines), lines
    assert "#0 (seed=1) DONE" in lines[0] and "#1 (seed=2) DONE" in lines[1], lines
    assert (out / "sweeps" / "named" / "seed_1" / "DONE").is_file() and not (out / "sweeps" / "named" / "0").exists()
    assert "is not where stage=runs looks" not in proc.stderr  # listed: stage=runs and the sweep report find them
    from conftest import compose_cfg
    from flare_exp.catalog import listing
    from flare_exp.main import run
    from flare_exp.run.layout import sweep_job_dirs

    header, rows = listing(out)
    listed = {r[0]: dict(zip(header, r)) for r in rows}
    assert listed["sweeps/named/seed_2"]["status"] == "DONE", listed
    nested = out / "sweeps" / "named" / "key=[" / "a" / "b]"  # a path in an override value nests the dir
    shutil.copytree(out / "sweeps" / "named" / "seed_2", nested)
    (out / "sweeps" / "named" / "report" / ".hydra").mkdir(parents=True)  # the report's dir is no job
    assert [p.relative_to(out / "sweeps" / "named") for p in sweep_job_dirs(out / "sweeps" / "named")] == [
        Path("key=[/a/b]"), Path("seed_1"), Path("seed_2")]
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={out / 'sweeps' / 'named'}"]),
        run_dir=tmp_path / "report")
    ranked = (out / "sweeps" / "named" / "report" / "sweep.csv").read_text()
    assert "seed_1" in ranked and "seed_2" in ranked and "key=[/a/b]" in ranked, ranked


class _Loader:
    """Hydra's config loader for job_dirs: the sweep's config with a job's ``seed=`` override."""

    def load_sweep_config(self, master, overrides):
        from omegaconf import OmegaConf

        cfg = master.copy()
        cfg.merge_with(OmegaConf.from_dotlist(list(overrides)))
        return cfg


@pytest.mark.parametrize("subdir,ids_known,said", [
    ("same", True, "gives several jobs one dir, where each would refuse or take over the other's run:"),
    ("${hydra.job.id}", False, "names each job's dir by its submitit job id, which only the submission decides"),
    ("${nothing_here}", True, "does not resolve for job #3"),
    ("../out_${seed}", True, "puts job #3's dir at"),  # outside the sweep dir: another sweep's, unreported
])
def test_job_dirs_a_sweep_cannot_keep_apart_are_refused_before_any_job(tmp_path, capsys, subdir, ids_known, said):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from flare_exp.sweep_dir import job_dirs

    from hydra.conf import HydraConf

    master = OmegaConf.create({"seed": 0, "hydra": OmegaConf.structured(HydraConf)})
    master.hydra.sweep.dir, master.hydra.sweep.subdir = str(tmp_path), subdir
    context = SimpleNamespace(config_loader=_Loader())
    with pytest.raises(SystemExit) as stop:
        job_dirs(context, master, [["seed=1"], ["seed=2"]], 3, ids_known=ids_known)
    assert stop.value.code == 2 and said in capsys.readouterr().err
    master.hydra.sweep.subdir = "s${seed}_${hydra.job.id}"  # told apart; the basic launcher's ids are the numbers
    assert job_dirs(context, master, [["seed=1"], ["seed=2"]], 3, ids_known=True) == [tmp_path / "s1_3",
                                                                                         tmp_path / "s2_4"]
