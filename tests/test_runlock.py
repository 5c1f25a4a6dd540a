"""One writer per run dir: a second launch stops naming the holder; a dead holder's lock is taken over."""
import json
import os
import platform
import subprocess
import sys
import time

import pytest

from conftest import compose_cfg
from flare_exp.io import write_jsonl
from flare_exp.main import run
from flare_exp.runlock import RunLock, RunLockedError


def _fake_holder(run_dir, pid, host=None, age_s=0.0, job=None):
    lock = run_dir / ".lock"
    lock.mkdir(parents=True)
    owner = lock / "owner.json"
    owner.write_text(json.dumps({"host": host or platform.node(), "pid": pid, "started": "2026-12-01T10:00:00",
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
        _fake_holder(tmp_path / "eval", sleeper.pid)
        cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false"])
        with pytest.raises(RunLockedError, match=f"in use by another run: host {platform.node()}, pid {sleeper.pid}, "
                                                 "started 2026-12-01T10:00:00"):
            run(cfg, run_dir=tmp_path / "eval")
        assert not (tmp_path / "eval" / "metrics.json").exists() and not (tmp_path / "eval" / "config.yaml").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # its holder killed (-9): the next launch takes the lock over, says so, runs, and releases it
    run(cfg, run_dir=tmp_path / "eval")
    assert (tmp_path / "eval" / "DONE").exists() and not (tmp_path / "eval" / ".lock").exists()


def test_stale_locks_are_taken_over_and_fresh_ones_kept(tmp_path, caplog, monkeypatch):
    _fake_holder(tmp_path / "a", _dead_pid())
    with RunLock(tmp_path / "a"):
        assert json.loads((tmp_path / "a" / ".lock" / "owner.json").read_text())["pid"] == os.getpid()
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


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    owner = tmp_path / ".lock" / "owner.json"
    os.utime(owner, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert time.time() - owner.stat().st_mtime < 5
    lock.release()
    assert not (tmp_path / ".lock").exists()
