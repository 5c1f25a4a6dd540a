"""One writer per run dir: a second launch stops naming the holder; a dead holder's lock is taken over."""
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose_cfg
from flare_exp.io import write_jsonl
from flare_exp.main import run
from flare_exp.run import lock as run_lock
from flare_exp.run.lock import RunLock, RunLockedError


def _fake_holder(run_dir, pid, host=None, age_s=0.0, job=None, started=None):
    """An owner file as the holder ``pid`` would have written it (taken now, unless ``started`` says when)."""
    import datetime

    lock = run_dir / ".lock"
    lock.mkdir(parents=True)
    owner = lock / "owner.1.json"
    when = datetime.datetime.fromisoformat(started) if started else datetime.datetime.now()
    owner.write_text(json.dumps({"host": host or platform.node(), "pid": pid,
                                 "started": when.isoformat(timespec="seconds"), "started_epoch": when.timestamp(),
                                 "slurm_job_id": job}))
    if age_s:
        os.utime(owner, (time.time() - age_s, time.time() - age_s))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_stops_the_second_launch(base_overrides, tmp_path):
    preds = tmp_path / "p.jsonl"
    write_jsonl(preds, [{"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                         "prediction": "A", "model": "m"}])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        _fake_holder(tmp_path / "eval", sleeper.pid, started="2099-12-01T10:00:00")
        cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false"])
        with pytest.raises(RunLockedError, match=f"in use by another run: host {platform.node()}, pid {sleeper.pid}, "
                                                 "started 2099-12-01T10:00:00"):
            run(cfg, run_dir=tmp_path / "eval")
        assert not (tmp_path / "eval" / "metrics.json").exists() and not (tmp_path / "eval" / "config.yaml").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # its holder killed (-9): the next launch takes the lock over, says so, runs, and releases it
    run(cfg, run_dir=tmp_path / "eval")
    assert (tmp_path / "eval" / "DONE").exists() and not (tmp_path / "eval" / ".lock").exists()


def test_a_prepare_into_another_dir_under_a_record_in_use_is_refused(base_overrides, tmp_path):
    """prepare writes into data.prepared_dir and records the launch in Hydra's run dir: two prepares into two
    prepared dirs under one run_name would write one record at once, so the record is locked too."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_holder(tmp_path / "record", sleeper.pid)
        cfg = compose_cfg(["stage=prepare", *base_overrides, f"data.prepared_dir={tmp_path / 'mine'}"])
        with pytest.raises(RunLockedError, match=rf"{tmp_path / 'record'} is in use by another run: .* pid {sleeper.pid}"):
            run(cfg, run_dir=tmp_path / "record")
        assert not (tmp_path / "mine" / ".lock").exists() and not (tmp_path / "mine" / "DONE").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    run(cfg, run_dir=tmp_path / "record")
    assert (tmp_path / "record" / "DONE").exists() and not (tmp_path / "record" / ".lock").exists()


def test_a_prepare_into_another_dir_under_a_finished_prepares_record_is_refused(base_overrides, tmp_path,
                                                                                 demo_prepared):
    """One run_name, two prepared dirs: the second prepare filed the first's finished record away (stage=runs then
    listed only the second, and counted the prepares as attempts of one run). Refused, naming both dirs;
    overwrite=true files it; the same dir again is the finished run's refusal as before."""
    from flare_exp.run.record import RunFinishedError

    first = compose_cfg(["stage=prepare", *base_overrides, f"data.prepared_dir={tmp_path / 'a'}"])
    run(first, run_dir=tmp_path / "record")
    record = {name: (tmp_path / "record" / name).read_bytes() for name in ("DONE", "config.yaml", "run_info.json")}
    other = ["stage=prepare", *base_overrides, f"data.prepared_dir={tmp_path / 'b'}"]
    with pytest.raises(RunFinishedError, match=rf"holds the record of a finished prepare into {tmp_path / 'a'}; "
                                               rf"this prepare writes into {tmp_path / 'b'}"):
        run(compose_cfg(other), run_dir=tmp_path / "record")
    assert record == {name: (tmp_path / "record" / name).read_bytes() for name in record}
    assert not any((tmp_path / "b").iterdir())  # at most its lock's dir, empty
    assert not (tmp_path / "record" / "attempts").exists()
    with pytest.raises(RunFinishedError, match="already holds a finished prepare run"):
        run(first, run_dir=tmp_path / "record")
    run(compose_cfg([*other, "overwrite=true"]), run_dir=tmp_path / "record")
    assert (tmp_path / "b" / "DONE").exists() and (tmp_path / "record" / "attempts" / "01" / "DONE").exists()
    # another stage's finished record (an eval's here) under the run_name: refused too, naming its stage
    from flare_exp.io import read_jsonl, write_jsonl

    predictions = tmp_path / "p.jsonl"
    row = next(r for r in read_jsonl(demo_prepared / "val.jsonl") if r["task_type"] == "classification")
    write_jsonl(predictions, [{**row, "prediction": row["answer"]}])
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{predictions}]", "eval.radgraph=false"]),
        run_dir=tmp_path / "an-eval")
    with pytest.raises(RunFinishedError, match=rf"{tmp_path / 'an-eval'} holds a finished eval run; this prepare"):
        run(compose_cfg(other), run_dir=tmp_path / "an-eval")
    assert (tmp_path / "an-eval" / "metrics.json").exists() and not (tmp_path / "an-eval" / "attempts").exists()
    # an infer under the finished prepare's record names the record's stage (it said "a finished infer run")
    with pytest.raises(RunFinishedError, match="already holds a finished prepare run .*this launch is stage=infer"):
        run(compose_cfg(["stage=infer", *base_overrides]), run_dir=tmp_path / "record")
    # an infer under a finished record whose config.yaml does not read: not called an infer's
    broken = tmp_path / "broken-record"
    shutil.copytree(tmp_path / "record", broken, ignore=shutil.ignore_patterns("attempts"))
    (broken / "config.yaml").write_text("stage: [unclosed\n")
    with pytest.raises(RunFinishedError, match="holds a finished run whose config.yaml does not read"):
        run(compose_cfg(["stage=infer", *base_overrides]), run_dir=broken)
    # a prepare under an unfinished infer that left predictions: refused naming it (it marked that dir DONE as a
    # prepare's, and the infer could not be resumed)
    unfinished = tmp_path / "unfinished-infer"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("stage:\n  name: infer\n")
    (unfinished / "predictions.jsonl").write_text(json.dumps({"id": "x", "prediction": "y"}) + "\n")
    from flare_exp.run.fingerprint import RunSettingsChangedError

    with pytest.raises(RunSettingsChangedError, match="unfinished infer run"):
        run(compose_cfg(other), run_dir=unfinished)
    assert not (unfinished / "DONE").exists() and not (unfinished / "attempts").exists()
    # a hand-broken config.yaml: which run the record is of is not known, so it is not filed away unasked
    (tmp_path / "an-eval" / "config.yaml").write_text("stage:\n  name: eval\ndata: [unclosed\n")
    with pytest.raises(RunFinishedError, match="holds a finished run whose config.yaml does not read"):
        run(compose_cfg(other), run_dir=tmp_path / "an-eval")
    assert not (tmp_path / "an-eval" / "attempts").exists()


def test_a_refusal_names_only_the_setting_that_places_the_locked_dir(tmp_path, capsys):
    """Every refusal said "choose another run_name= (for prepare's dir, another data.prepared_dir=)": a sweep's,
    a search's, an sft run's too. Now the one setting whose other value is another dir: prepare's prepared dir
    data.prepared_dir, its record, a run's dir and a sweep's run_name, a journal named on purpose its storage."""
    from omegaconf import OmegaConf

    from flare_exp import sweep_dir
    from flare_exp.optuna_search import search_lock
    from flare_exp.run.lifecycle import Run

    def refusal(held: str, stage: str, out_dir: str, run_dir: str | None = None) -> str:
        """A run of ``stage`` into ``out_dir`` (its record in ``run_dir``) while another holds ``held``."""
        out_dir, run_dir = tmp_path / out_dir, tmp_path / (run_dir or out_dir)
        with RunLock(tmp_path / held), pytest.raises(RunLockedError) as refused:
            with Run(compose_cfg([f"stage={stage}", f"data.prepared_dir={out_dir}"]), stage, out_dir, run_dir):
                pass
        return str(refused.value)

    said = [("data.prepared_dir", refusal("prep", "prepare", "prep", "rec")),
            ("run_name", refusal("rec", "prepare", "other", "rec")),  # prepare's record: Hydra's run dir
            ("run_name", refusal("sft", "sft", "sft"))]
    with search_lock(str(tmp_path / "study.journal"), tmp_path / "a"), pytest.raises(RunLockedError) as refused:
        search_lock(str(tmp_path / "study.journal"), tmp_path / "b").acquire()
    said.append(("hydra.sweeper.storage", str(refused.value)))
    config = OmegaConf.create({"paths": {"output_root": str(tmp_path)}, "run_name": "sweep",  # conf/config.yaml's
                               "hydra": {"sweep": {"dir": "${paths.output_root}/sweeps/${run_name:${run_name}}"}}})
    with RunLock(tmp_path / "sweeps" / "sweep", name=sweep_dir.SWEEP_LOCK), pytest.raises(SystemExit):
        sweep_dir.lock_sweep(config)
    said.append(("run_name", capsys.readouterr().err))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})  # hydra.sweep.dir=...
    with RunLock(tmp_path / "sweep", name=sweep_dir.SWEEP_LOCK), pytest.raises(SystemExit):
        sweep_dir.lock_sweep(config)
    said.append(("hydra.sweep.dir", capsys.readouterr().err))
    for setting, message in said:
        assert f"Wait for it, or choose another {setting}=. (A lock" in message, message
        assert "prepared_dir" not in message or setting == "data.prepared_dir", message


@contextlib.contextmanager
def launched_with(tmp_path, overrides, mode=None):
    """HydraConfig set as a launched job's (``overrides`` composed over conf/), as the refusals read it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.output_root={tmp_path}", *overrides],
                      return_hydra_config=True)
    cfg.hydra.mode = mode or RunMode.RUN  # as Hydra's launch sets it
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = saved


def test_a_refusal_of_a_dir_placed_by_hydra_run_dir_names_hydra_run_dir(tmp_path):
    """hydra.run.dir=/scratch/x (not run_name) placed the run dir another process holds: the refusal said
    "choose another run_name=", which does not move it. Now hydra.run.dir= (hydra.sweep.dir= for a sweep's
    job); a dir run_name places, or one outside Hydra's (a prepared dir), is said as before."""
    from hydra.types import RunMode

    def refusal(*overrides, held="mine", mode=RunMode.RUN) -> str:
        with launched_with(tmp_path, overrides, mode), RunLock(tmp_path / held), \
                pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path / held).acquire()
        return str(refused.value)

    assert "or choose another hydra.run.dir=. (A lock" in refusal(f"hydra.run.dir={tmp_path / 'mine'}")
    assert "or choose another run_name=. (A lock" in refusal("run_name=mine", held="runs/mine")
    assert "or choose another run_name=. (A lock" in refusal(f"hydra.run.dir={tmp_path / 'mine'}", held="other")
    assert "or choose another hydra.sweep.dir=. (A lock" in refusal(f"hydra.sweep.dir={tmp_path / 'sw'}",
                                                                    held="sw/0", mode=RunMode.MULTIRUN)
    from flare_exp.run.names import placed_by

    assert placed_by(tmp_path / "mine") == "run_name"  # no Hydra config set: a run started from Python


def test_a_finished_run_in_a_dir_placed_by_hydra_run_dir_names_hydra_run_dir(tmp_path):
    """A finished run (or unreadable fingerprint) in a dir hydra.run.dir placed: 'choose another hydra.run.dir=',
    as the lock refusal says it; a prepared dir still names data.prepared_dir."""
    from flare_exp.run.layout import DONE, FINGERPRINT
    from flare_exp.run.lifecycle import start_attempt
    from flare_exp.run.record import RunFinishedError, RunSettingsChangedError
    from flare_exp.run.fingerprint import recorded_fingerprint

    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / DONE).write_text("{}")
    (run_dir / FINGERPRINT).write_text("{cut short")
    with launched_with(tmp_path, [f"hydra.run.dir={run_dir}", "stage=sft"]) as cfg:
        with pytest.raises(RunFinishedError, match=r"or choose another hydra\.run\.dir=\.$"):
            start_attempt("sft", cfg, run_dir)
        with pytest.raises(RunSettingsChangedError, match=r"or choose another hydra\.run\.dir=\.$"):
            recorded_fingerprint(run_dir)
        with pytest.raises(RunFinishedError, match=r"another data\.prepared_dir= \(prepare writes there"):
            start_attempt("prepare", cfg, run_dir)


def test_stale_locks_are_taken_over_and_fresh_ones_kept(tmp_path, caplog, monkeypatch):
    _fake_holder(tmp_path / "a", _dead_pid())
    with RunLock(tmp_path / "a"):
        assert json.loads((tmp_path / "a" / ".lock" / "owner.2.json").read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and "is gone" in caplog.text
    _fake_holder(tmp_path / "b", 1, host="node-17", age_s=10)  # another node, heartbeat fresh: alive
    with pytest.raises(RunLockedError, match="node-17"):
        RunLock(tmp_path / "b").acquire()
    _fake_holder(tmp_path / "c", 1, host="node-17", age_s=3600)  # that node went away
    RunLock(tmp_path / "c").acquire().release()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job on another node: its earlier attempt's lock
    _fake_holder(tmp_path / "d", 1, host="node-17", age_s=5, job="4242")
    RunLock(tmp_path / "d").acquire().release()
    assert "earlier attempt of SLURM job 4242" in caplog.text


def test_a_live_pid_that_is_not_the_holder_does_not_keep_its_lock(tmp_path, caplog):
    """After a container restart or a reboot the dead holder's pid belongs to another process (pid 1, even the
    launch itself): a process that started after the lock was taken, this very process, or a pid whose holder
    has not beaten for hours is no holder; a live holder whose heartbeat is fresh keeps its lock."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        _fake_holder(tmp_path / "reused", sleeper.pid, started="2026-01-01T00:00:00")  # its process is younger
        RunLock(tmp_path / "reused").acquire().release()
        assert "another process now (started after the lock was taken" in caplog.text
        _fake_holder(tmp_path / "silent", sleeper.pid, age_s=3 * 3600, started="2099-01-01T00:00:00")
        RunLock(tmp_path / "silent").acquire().release()
        assert "the lock's heartbeat is 10800 s old" in caplog.text
        _fake_holder(tmp_path / "alive", sleeper.pid, age_s=600, started="2099-01-01T00:00:00")
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path / "alive").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    _fake_holder(tmp_path / "mine", os.getpid(), started="2099-01-01T00:00:00")
    RunLock(tmp_path / "mine").acquire().release()
    assert "this very process, which does not hold it" in caplog.text



def test_a_live_holder_in_another_time_zone_keeps_its_lock(tmp_path, monkeypatch):
    """The lock's start is compared with the holder process's start as seconds since the epoch: a holder whose
    local time reads hours behind (another TZ) is not taken for a younger process; an owner file without that
    time is not judged by it."""
    import datetime

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        lock = tmp_path / "tz" / ".lock"
        lock.mkdir(parents=True)
        west = (datetime.datetime.now() - datetime.timedelta(hours=5)).isoformat(timespec="seconds")
        (lock / "owner.1.json").write_text(json.dumps({"host": platform.node(), "pid": sleeper.pid, "started": west,
                                                       "started_epoch": time.time()}))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path / "tz").acquire()
        (lock / "owner.1.json").write_text(json.dumps({"host": platform.node(), "pid": sleeper.pid, "started": west}))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):  # recorded before: no epoch, not judged
            RunLock(tmp_path / "tz").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    owner = tmp_path / ".lock" / "owner.1.json"
    os.utime(owner, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert time.time() - owner.stat().st_mtime < 5
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_two_relaunches_after_a_dead_holder_take_the_lock_once(tmp_path, monkeypatch):
    """Both judge the dead holder's lock stale; the first takes it over; the second's takeover fails and it stops
    naming the first (it must not remove the first's fresh lock and take it too)."""
    _fake_holder(tmp_path, _dead_pid())
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    judge = RunLock._stale

    def first_takes_over_meanwhile(self, holder):
        why = judge(self, holder)
        if self is second and not first.held():
            first.acquire()
        return why

    monkeypatch.setattr(RunLock, "_stale", first_takes_over_meanwhile)
    with pytest.raises(RunLockedError, match=f"in use by another run: host {platform.node()}, pid {os.getpid()}"):
        second.acquire()
    assert first.held() and not second.held()
    first.release()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_dir_made_but_not_yet_written_goes_to_the_first_claim(tmp_path):
    """Its maker is alive but has not claimed it: a launch that claims first holds the run, and the maker's
    claim then stops naming that holder."""
    (tmp_path / ".lock").mkdir()
    maker, other = RunLock(tmp_path), RunLock(tmp_path)
    other.acquire()
    with pytest.raises(RunLockedError, match="in use by another run"):
        maker.acquire()
    assert other.held()
    other.release()


def test_another_users_live_process_holds_its_lock(tmp_path, monkeypatch):
    """The pid check cannot signal another user's process (PermissionError): that holder is alive."""
    holder_pid = _dead_pid()
    _fake_holder(tmp_path, holder_pid)

    def kill(pid, sig):
        if pid == holder_pid:
            raise PermissionError(1, "Operation not permitted")
        return os.kill(pid, sig)

    monkeypatch.setattr(run_lock.os, "kill", kill)
    with pytest.raises(RunLockedError, match=f"pid {holder_pid}"):
        RunLock(tmp_path).acquire()
    monkeypatch.undo()  # now the check sees the pid is gone
    RunLock(tmp_path).acquire().release()


def test_the_heartbeat_stops_with_the_release_and_an_old_one_is_stale_only_after_the_limit(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    owner = lock.owner_file
    lock.release()
    time.sleep(0.2)
    assert not owner.exists() and not (tmp_path / ".lock").exists()  # no beat brings it back
    _fake_holder(tmp_path / "x", 1, host="node-9", age_s=290)
    with pytest.raises(RunLockedError, match="node-9"):
        RunLock(tmp_path / "x", stale_after_s=300).acquire()
    taken = RunLock(tmp_path / "x", stale_after_s=280).acquire()
    assert taken.held()
    taken.release()


def test_a_whole_tree_another_process_built_is_kept(tmp_path):
    """Parallel sweep jobs build the same fixture (tiny RadGraph, tiny model, demo tree): the one that finishes
    second keeps the first's whole tree instead of deleting it under a job already reading it (a job's RadGraph
    once failed with "No such file or directory: 'weights.th'"); a half-written tree is still replaced."""
    from flare_exp.io import atomic_dir

    target = tmp_path / "radgraph-xl"
    whole = lambda d: (d / "weights.th").exists()  # noqa: E731
    with atomic_dir(target, ".radgraph-", complete=whole) as tmp:
        (tmp / "weights.th").write_text("ours")
        target.mkdir()  # meanwhile another job renamed its whole tree there
        (target / "weights.th").write_text("theirs")
    assert (target / "weights.th").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["radgraph-xl"]  # ours dropped

    (target / "weights.th").unlink()  # half-written (a crash): replaced
    with atomic_dir(target, ".radgraph-", complete=whole) as tmp:
        (tmp / "weights.th").write_text("ours")
    assert (target / "weights.th").read_text() == "ours"
    with atomic_dir(target) as tmp:  # no way to tell a whole tree: replaced, as before
        (tmp / "weights.th").write_text("new")
    assert (target / "weights.th").read_text() == "new"


def _build_then_read(model_dir: str, start: float) -> str:
    import time
    from pathlib import Path

    from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph

    time.sleep(max(0.0, start - time.time()))
    build_tiny_radgraph(model_dir)
    for _ in range(20):  # as a job's scorer reads it, while the others may still be finishing theirs
        (Path(model_dir) / "radgraph-xl" / "weights.th").read_bytes()
        time.sleep(0.05)
    return "ok"


def test_parallel_builders_of_the_tiny_radgraph(tmp_path):
    import concurrent.futures
    import multiprocessing
    import time

    start = time.time() + 3
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_build_then_read, [str(tmp_path)] * 2, [start] * 2))
    assert results == ["ok"] * 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".radgraph-")]


def _take_over(run_dir, pid: int = 1, host: str = "node-after-suspend"):
    """Another launch takes the lock over, as it would once this process has been stopped past the wait."""
    lock = run_dir / ".lock"
    number = max(int(p.name.split(".")[1]) for p in lock.glob("owner.*.json")) + 1
    (lock / f"owner.{number}.json").write_text(json.dumps(
        {"host": host, "pid": pid, "started": "2026-12-05T11:00:00", "started_epoch": time.time(), "token": "other"}))


def test_a_holder_stopped_past_the_takeover_writes_no_more(tmp_path, caplog):
    from flare_exp.run.lock import RunLockLostError, check_still_held, lock_lost

    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    check_still_held()  # its own: nothing to say
    _take_over(tmp_path)
    with pytest.raises(RunLockLostError, match="taken over while it was stopped.*host node-after-suspend, pid 1"):
        check_still_held()
    assert lock_lost()
    time.sleep(0.3)  # the heartbeat says it too, once, and stops touching its owner file
    assert caplog.text.count("taken over while it was stopped") == 1
    lock.release()  # the lock is the other launch's: left as it is
    assert (tmp_path / ".lock" / "owner.2.json").exists() and not lock_lost()


def test_a_run_whose_lock_was_taken_over_leaves_no_marker(base_overrides, tmp_path, monkeypatch):
    """eval ran while stopped past the wait (the takeover is made as its markers are cleared): it stops before
    DONE, and writes no FAILED either; the run dir and its lock are the other launch's."""
    import flare_exp.run.lifecycle as lifecycle
    from flare_exp.run.lock import RunLockLostError

    preds = tmp_path / "p.jsonl"
    write_jsonl(preds, [{"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                         "prediction": "A", "model": "m"}])
    monkeypatch.setattr(lifecycle, "barrier", lambda: _take_over(tmp_path / "eval"))
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false"])
    with pytest.raises(RunLockLostError, match="keeps one writer"):
        run(cfg, run_dir=tmp_path / "eval")
    assert not (tmp_path / "eval" / "DONE").exists() and not (tmp_path / "eval" / "FAILED").exists()
    assert (tmp_path / "eval" / ".lock" / "owner.2.json").exists()


def test_a_trainer_whose_lock_was_taken_over_saves_no_checkpoint(tmp_path):
    from types import SimpleNamespace

    from flare_exp.run.lock import RunLockLostError
    from flare_exp.training import CheckpointMeta

    meta = CheckpointMeta(tmp_path / "base", compose_cfg([]), [])
    lock = RunLock(tmp_path).acquire()
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    meta.on_step_end(None, state, None)  # its own: the step ends, the Trainer's save may follow
    _take_over(tmp_path)
    with pytest.raises(RunLockLostError):
        meta.on_step_end(None, state, None)
    lock.release()


def test_a_lock_released_and_claimed_again_under_the_same_name_is_not_the_stopped_holders(tmp_path):
    """A stopped holder's lock taken over by a launch that then ended (released: the lock dir gone) and claimed by
    a third launch as owner.1.json again: the name is the stopped holder's, the token is not."""
    import shutil

    from flare_exp.run.lock import RunLockLostError

    stopped = RunLock(tmp_path).acquire()
    _take_over(tmp_path)
    shutil.rmtree(tmp_path / ".lock")  # the launch that took it over was refused, and released it
    third = RunLock(tmp_path).acquire()
    assert third.owner_file == stopped.owner_file
    with pytest.raises(RunLockLostError):
        stopped.check_held()
    third.check_held()
    third.release()


def test_the_heartbeat_ends_a_process_whose_lock_was_taken_over(tmp_path):
    """The process was stopped inside a save (its main thread writing); once it goes on, its heartbeat ends it at
    once (exit 75), before the save goes far, and its last words are not in the run dir's own log file."""
    script = f"""
import logging, sys, time
from pathlib import Path
from flare_exp.run.lock import RunLock
run_dir = Path({str(tmp_path)!r})
handler = logging.FileHandler(run_dir / "launch.log")
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
lock = RunLock(run_dir, heartbeat_s=0.05).acquire()
print("ready", flush=True)
with open(run_dir / "save.bin", "a") as save:
    for _ in range(2000):
        save.write("x"); save.flush(); time.sleep(0.005)
print("finished the save", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.stdout.readline().strip() == "ready"
    _take_over(tmp_path)
    taken = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "finished the save" not in out
    assert time.monotonic() - taken < 5
    assert "taken over while it was stopped" in err and "taken over" not in (tmp_path / "launch.log").read_text()
    assert len((tmp_path / "save.bin").read_text()) < 2000


def test_a_stopped_holder_on_this_host_keeps_its_lock_and_is_named_stopped(tmp_path, monkeypatch):
    """A holder stopped (SIGSTOP, a suspended job) for hours is silent but alive: taking its lock over would leave
    two writers once it is continued, so the launch is refused, saying it is stopped and how to go on."""
    import signal

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        os.kill(sleeper.pid, signal.SIGSTOP)
        time.sleep(0.1)
        _fake_holder(tmp_path, sleeper.pid, age_s=3 * 3600, started="2099-01-01T00:00:00")
        with pytest.raises(RunLockedError, match=rf"pid {sleeper.pid}, started .*, stopped now \(SIGSTOP.*kill -CONT "
                                                 rf"{sleeper.pid}\)"):
            RunLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "4243")  # the same job's earlier attempt on this node, still there
        _fake_holder(tmp_path / "job", sleeper.pid, age_s=3 * 3600, started="2099-01-01T00:00:00", job="4243")
        with pytest.raises(RunLockedError, match="stopped now"):
            RunLock(tmp_path / "job").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_atomic_write_lands_in_a_dir_whose_lock_was_taken_over(tmp_path):
    """Every atomic write (file or tree) checks the lock of the run dir it lands in, just before it lands: after
    the takeover nothing more replaces a file of the run dir or adds one, its temporary file is gone, and writes
    elsewhere (another run's dir, a shared cache) go on."""
    from flare_exp.io import atomic_dir, write_json, write_text
    from flare_exp.run.lock import RunLockLostError

    run_dir, elsewhere = tmp_path / "run", tmp_path / "cache"
    lock = RunLock(run_dir).acquire()
    write_text(run_dir / "sub" / "a.txt", "mine")  # its own: lands
    _take_over(run_dir)
    with pytest.raises(RunLockLostError, match="keeps one writer"):
        write_text(run_dir / "sub" / "a.txt", "late")
    with pytest.raises(RunLockLostError):
        write_json(run_dir / "summary.json", {"late": True})
    with pytest.raises(RunLockLostError):
        with atomic_dir(run_dir / "final") as tmp:
            (tmp / "adapter.safetensors").write_text("late")
    assert (run_dir / "sub" / "a.txt").read_text() == "mine"
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final").exists()
    assert sorted(p.name for p in (run_dir / "sub").iterdir()) == ["a.txt"]  # no temporary file left
    with pytest.raises(RunLockLostError):  # refused before it makes a folder there
        write_text(run_dir / "new" / "deeper" / "d.txt", "late")
    assert not (run_dir / "new").exists()
    write_text(elsewhere / "b.txt", "shared")
    (tmp_path / "link").symlink_to(run_dir)
    with pytest.raises(RunLockLostError):  # the run dir by another spelling
        write_text(tmp_path / "link" / "c.txt", "late")
    lock.release()


def test_a_split_a_live_prepare_has_not_written_yet_says_to_wait_for_it(base_overrides, tmp_path):
    """sft launched while another launch's prepare still holds data.prepared_dir: the missing split is named as
    being made, not as a prepare nobody ran."""
    from flare_exp.checks import input_problems

    prepared = tmp_path / "prepared"
    cfg = compose_cfg(["stage=sft", *base_overrides, f"data.prepared_dir={prepared}"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        _fake_holder(prepared, sleeper.pid)
        said = " ".join(map(str, input_problems(cfg)))
        assert f"{prepared} is being written by a run that has not finished" in said
        assert f"pid {sleeper.pid}" in said and "Run stage=prepare first" not in said
    finally:
        sleeper.kill()
        sleeper.wait()
    said = " ".join(map(str, input_problems(cfg)))  # its holder gone: what to run
    assert "being written" not in said and "train_file" in said


def test_a_refusal_says_how_to_free_a_lock_no_flare_exp_run_holds(tmp_path):
    """A live pid in an owner file without started_epoch (a dir copied by hand, a pid another program has now)
    cannot be told from a live run: the refusal said only "Wait for it, or choose another run_name=". It also
    says how to check the pid and the exact lock directory to remove once no run writes there."""
    lock = tmp_path / "copied" / ".lock"
    lock.mkdir(parents=True)
    (lock / "owner.1.json").write_text(json.dumps({"host": platform.node(), "pid": 1, "started": "2020-01-01"}))
    with pytest.raises(RunLockedError) as refused:
        RunLock(tmp_path / "copied").acquire()
    message = str(refused.value)
    assert "Wait for it, or choose another run_name=. (A lock" in message, message
    assert f"If pid 1 on host {platform.node()} is no flare-exp run" in message, message
    assert "ps -o args= -p 1" in message, message
    assert f"remove the lock directory {lock} (rm -r {lock})" in message, message
    assert f"once sure no run writes into {tmp_path / 'copied'}" in message, message


@pytest.mark.parametrize("text", ['{"host": "vm", "pid": 12', "garbage\x00", "[1, 2]", "null"])
def test_an_unreadable_owner_file_is_taken_over_with_a_warning(tmp_path, caplog, text):
    """A torn or garbage owner file names no holder: its lock was taken over without a word (a dead pid's takeover
    is logged). Now a WARNING names the file and why; a JSON that is no object counts as unreadable too (it
    stopped the launch with a TypeError)."""
    lock = tmp_path / ".lock"
    lock.mkdir()
    (lock / "owner.1.json").write_text(text)
    with caplog.at_level("WARNING", logger="flare_exp.run.lock"):
        RunLock(tmp_path).acquire().release()
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "taking over the lock" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    said = warned[0].getMessage()
    assert f"its owner file {lock / 'owner.1.json'} cannot be read" in said, said
    assert "torn or written by hand" in said, said


@pytest.mark.parametrize("pid", ['"abc"', "true", "1.5", "null"])
def test_an_owner_file_whose_pid_is_no_number_is_taken_over_with_a_warning(tmp_path, caplog, pid):
    """An owner file edited by hand to a pid that is no whole number names no process on this host: taken over
    with a WARNING saying so (int("abc") stopped the launch with a ValueError)."""
    lock = tmp_path / ".lock"
    lock.mkdir()
    (lock / "owner.1.json").write_text(f'{{"host": "{platform.node()}", "pid": {pid}, "started": "2026-01-01"}}')
    with caplog.at_level("WARNING", logger="flare_exp.run.lock"):
        RunLock(tmp_path).acquire().release()
    assert "its owner file names no process (pid" in caplog.text, caplog.text


def test_the_accepted_launchs_own_record_is_kept_though_a_refused_one_wrote_over_it(tmp_path):
    """Two launches of one new run name 0.02 s apart: Hydra wrote the second's record (.hydra/) over the first's
    before the first was accepted and copied it to .hydra/accepted/, so both held the refused launch's settings
    (infer.checkpoint=sft where rl ran). The accepted launch's record comes from its own memory now."""
    from omegaconf import OmegaConf, read_write

    from flare_exp.run.record import keep_hydra_record, remember_launch, restore_hydra_record

    run_dir = tmp_path / "runs" / "same"
    with launched_with(tmp_path, ["run_name=same", "infer.checkpoint=/m/rl"]) as cfg:
        from hydra.core.hydra_config import HydraConfig

        with read_write(cfg.hydra):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        remember_launch(task)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("- infer.checkpoint=/m/sft\n")  # the other launch's
        keep_hydra_record(run_dir)
    for record in (run_dir / ".hydra", run_dir / ".hydra" / "accepted"):
        assert "infer.checkpoint=/m/rl" in (record / "overrides.yaml").read_text()
        assert "checkpoint: /m/rl" in (record / "config.yaml").read_text()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- infer.checkpoint=/m/sft\n")  # refused later: put back
    restore_hydra_record(run_dir)
    assert "infer.checkpoint=/m/rl" in (run_dir / ".hydra" / "overrides.yaml").read_text()
