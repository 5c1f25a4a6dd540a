"""A run dir from open to close. ``main.run`` opens a ``Run`` and hands it the stage's work; a pipeline opens
one per step. The stage itself never touches the lock, the attempt or the markers:

- open: the lock (one writer per run dir; run.lock), then the attempt: a finished run is refused unless
  overwrite (the earlier attempt then moves to attempts/NN/), an unfinished one is resumed only with the same
  fingerprint (run.fingerprint), the adapter it starts from is the one meant (models.checkpoints), and its
  config, run info and fingerprint are recorded (run.record). The config recorded is the one that runs (a
  stage's settings sized by the card applied; run_info.json's ``applied`` says what they changed from the
  configured values); the fingerprint holds the configured values, so a rerun of the same command resumes on
  another card;
- execute: the old markers cleared, the work run, DONE (its summary) or FAILED (the traceback) left;
- close: the lock released.

In a data-parallel job rank 0 does all of that while the other ranks wait for it, run the same work, and leave
FAILED naming themselves if they fail.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

from flare_exp.io import remove_leftover_temporaries, write_json
from flare_exp.logs import run_summary
from flare_exp.models.checkpoints import adapter_identity
from flare_exp.run.fingerprint import (MISSING_FINGERPRINT, RunSettingsChangedError, check_other_stage, check_resume,
                                       finished_differences, fingerprint, held_stage, left_by, listed,
                                       other_stage_refusal, starting_adapter)
from flare_exp.run.lock import RunLock, check_still_held, lock_lost
from flare_exp.run.layout import ATTEMPTS, CONFIG, DONE, FAILED, FINGERPRINT, REPORT_HTML, RUN_INFO, SWEEP_TABLE
from flare_exp.run.record import (RunFinishedError, archive_attempt, attempt_files, finish_interrupted_move,
                                  keep_hydra_record, next_attempt_dir, restore_hydra_record, this_jobs_attempt,
                                  write_failed, write_run_metadata)
from flare_exp.run.stage import declared_stages
from flare_exp.runtime import barrier

log = logging.getLogger(__name__)


class Run:
    """``with Run(cfg, stage, out_dir) as run: run.execute(work)``: ``work(cfg, out_dir)`` inside the run's
    lock, attempt and markers. ``run_dir``: Hydra's run dir when the outputs live elsewhere (prepare's prepared
    dir), which gets the config and the markers too. ``rank``: this process's rank (only rank 0 locks, records
    and marks); ``locked=False`` for a pipeline's step, inside the pipeline's own lock. ``cfg`` is the configured
    config; ``self.cfg`` the one the stage runs with (its ``applied_config``), ``self.applied`` what that changed."""

    def __init__(self, cfg, stage: str, out_dir: Path, run_dir: Path | None = None, rank: int = 0,
                 locked: bool = True):
        self.stage, self.out_dir, self.run_dir, self.rank = stage, out_dir, run_dir or out_dir, rank
        self.declared = declared_stages().get(stage)
        self.view = self.declared is None or self.declared.record != "attempt"  # a pipeline's steps: their own
        self.configured, self.cfg, self.applied = cfg, cfg, None
        self.locked = locked and rank == 0
        self.own_run = locked  # not a pipeline's step (the pipeline checked its steps before it started)
        self.lock: RunLock | None = None
        self.record_lock: RunLock | None = None
        self.filed: Path | None = None  # a finished pipeline's record, filed at the start, put back if it only reuses

    def __enter__(self) -> "Run":
        try:
            if self.locked:
                self.lock = RunLock(self.out_dir, placed_by=dir_setting(self.stage)).acquire()
                if self.run_dir != self.out_dir:  # its record too: two prepares into two dirs under one run_name
                    self.record_lock = RunLock(self.run_dir).acquire()
            if self.locked:
                for dest in finish_interrupted_move(self.out_dir):
                    log.warning("%s: an earlier overwrite=true's move of an attempt into %s was cut short: "
                                "the rest moved there too", self.out_dir, dest)
            if self.stage == "pipeline" and self.own_run and self.rank == 0:  # a single stage's run there
                take_over_check(self.configured, self.out_dir)
            if self.run_dir != self.out_dir and self.rank == 0:
                record_of_other_output(self.configured, self.run_dir, self.out_dir)
            if self.declared is not None and self.own_run:  # nothing touched yet: a refusal leaves the dir as it was
                self.declared.refuse_before_start(self.configured, self.out_dir)
            if not self.view:  # every rank runs with the same applied settings
                self.cfg, self.applied = self.declared.applied(self.configured)
            if self.rank == 0:
                self.filed = file_finished_record(self.out_dir) if self.view and self.own_run else None
                self._start()
        except BaseException as e:
            if self.own_run and self.rank == 0:  # refused: the run dir's record of its own launch stays
                restore_hydra_record(self.run_dir)
                if isinstance(e, RunSettingsChangedError) and not (self.run_dir / RUN_INFO).exists():
                    write_failed(self.run_dir, e)  # a fresh dir (a pipeline refused for a step elsewhere) says why
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for lock in (self.record_lock, self.lock):
            if lock is not None:
                lock.release()

    def _start(self) -> None:
        removed = remove_leftover_temporaries(self.out_dir) if self.own_run else 0  # this lock's dir alone
        if removed:
            log.info("%s: %d temporary file(s) of writes an earlier attempt's stop cut short removed", self.out_dir,
                     removed)
        if self.view:  # a finished pipeline's record is kept by execute(), once it knows whether anything ran
            write_run_metadata(self.out_dir, self.cfg, keep_previous=self.filed is None)
        else:
            start_attempt(self.stage, self.configured, self.out_dir, ran=self.cfg, applied=self.applied)
        if self.out_dir != self.run_dir:  # Hydra's run dir records this attempt: an earlier one's marker is filed
            write_run_metadata(self.run_dir, self.cfg)
            (self.run_dir / DONE).unlink(missing_ok=True)
        if self.own_run:
            keep_hydra_record(self.run_dir)

    def _keep_finished_record(self, reused: bool) -> None:
        """A finished pipeline run again had its record (DONE with the results and the duration, config, run info)
        filed into attempts/NN/ at the start, so a kill or a failure loses nothing: when every step was reused it
        goes back in place (as it was, times included) as the run that made the outputs; else it stays filed."""
        if self.filed is None:
            return
        (self.filed / FILED_AT_RERUN).unlink(missing_ok=True)
        if not reused:
            log.info("%s was finished before: its record is kept in %s", self.out_dir, self.filed)
            return
        for path in list(self.filed.iterdir()):
            os.replace(path, self.out_dir / path.name)
        self.filed.rmdir()
        try:
            self.filed.parent.rmdir()  # attempts/, when it held only this
        except OSError:
            pass

    def execute(self, work):
        """``work(cfg, out_dir)`` between the markers (None on a rank > 0: rank 0 alone works). The ranks start
        together once rank 0 has cleared the old markers, and end together. A stage that applied settings sized
        by the card gets what they changed too (``applied=``)."""
        if work is not None and self.applied is not None:
            work = functools.partial(work, applied=self.applied)
        if self.rank != 0:
            return follow_rank_0(self.out_dir, self.rank, work, self.cfg, self.out_dir)
        if self.locked:  # a run of its own (not a pipeline's step): say what runs where
            log.info("stage=%s model=%s (%s) data=%s -> %s", self.stage, self.cfg.model.name,
                     self.cfg.model.backend, self.cfg.data.name, self.out_dir)
        try:
            result = run_with_markers(self.out_dir, work, self.cfg, self.out_dir, after_clearing=barrier)
        except BaseException:
            self._keep_finished_record(reused=False)
            if self.out_dir != self.run_dir and (self.out_dir / FAILED).is_file():  # as DONE below: the same end
                shutil.copy2(self.out_dir / FAILED, self.run_dir / FAILED)
            raise
        self._keep_finished_record(reused=only_reused(result))
        if self.out_dir != self.run_dir:  # Hydra's run dir records the same run: the outputs' DONE, as it is
            (self.run_dir / FAILED).unlink(missing_ok=True)
            write_json(self.run_dir / DONE, json.loads((self.out_dir / DONE).read_text()))
        barrier()  # the outputs are complete before any rank goes on (a pipeline's next step reads them)
        if self.locked:  # the same lines whether the steps ran now or were reused
            report = report_of(self.stage, self.out_dir, result)
            summary = run_summary(report.parent) if report and report.name == REPORT_HTML else ""
            outputs = report.parent if self.stage == "sweep_report" else self.out_dir  # it writes in the sweep
            print(f"\n[flare-exp] stage={self.stage} finished. Outputs: {outputs}"
                  + (f"\n\n{summary}\n" if summary else "") + (f"\nReport: {report}" if report else ""))
        return result


def take_over_check(cfg, run_dir: Path) -> None:
    """A pipeline launched under the name of a single stage's run: a finished one is refused as any finished run
    is (it filed the run's record away and finished beside its final/ and checkpoints), an unfinished one that
    left outputs as check_other_stage refuses it; with overwrite=true that run moves whole to attempts/NN/."""
    held = held_stage(run_dir)
    if held is None or held == "pipeline" or not run_dir.is_dir():
        return
    finished, left = (run_dir / DONE).exists(), left_by(held, run_dir)
    if not finished and not left:
        return
    if cfg.overwrite:
        log.info("overwrite=true: the %s run in %s moved to %s; the pipeline starts afresh there", held, run_dir,
                 archive_attempt(run_dir))
    elif finished:
        raise RunFinishedError(
            f"{run_dir} already holds a finished {held} run ({DONE} marker present) (this launch is stage=pipeline: "
            "another run_name= keeps both). Nothing of it was changed. Pass overwrite=true to redo it there (the "
            "finished run moves to attempts/NN/), or choose another run_name=.")
    else:
        raise other_stage_refusal("pipeline", held, run_dir, left)


def record_of_other_output(cfg, run_dir: Path, out_dir: Path) -> None:
    """A run dir that only records a run writing elsewhere (prepare: into data.prepared_dir) and holds a
    finished run's record, another stage's or a prepare's of another output dir, or an unfinished run of another
    stage that left outputs to continue from, is refused (it was filed away and its run dropped from stage=runs'
    listing, as if the two were attempts of one run; a finished pipeline then read as a prepare; an unfinished
    infer then marked DONE as a prepare); overwrite=true files it as before."""
    if cfg.overwrite:
        return
    if not (run_dir / DONE).exists():  # an unfinished run of another stage that left outputs to continue from
        check_other_stage("prepare", run_dir)
        return
    from omegaconf import OmegaConf

    from flare_exp.runtime import abspath

    try:
        config = OmegaConf.load(run_dir / CONFIG)
        stage, recorded = OmegaConf.select(config, "stage.name"), OmegaConf.select(config, "data.prepared_dir")
    except Exception as e:  # noqa: BLE001  (missing, cut or hand-broken: which run it records is not known)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFinishedError(
            f"{run_dir} holds a finished run whose {CONFIG} does not read ({why}): which run it records is not "
            f"known, and this prepare (writing into {out_dir}) would file its record away. Nothing was changed. "
            f"Choose another run_name= for the prepare, or pass overwrite=true to file that record in "
            f"{run_dir / ATTEMPTS}/NN/.") from None
    if stage != "prepare":  # the checks on prepare's own dir never look here: a finished run's record is refused
        raise RunFinishedError(
            f"{run_dir} holds a finished {stage or 'unknown stage'} run; this prepare (writing into {out_dir}) would "
            "file its record away. Nothing was changed. Choose another run_name= for the prepare, or pass "
            f"overwrite=true to file that record in {run_dir / ATTEMPTS}/NN/.")
    if recorded is None or Path(abspath(recorded)).resolve() == out_dir.resolve():
        return
    raise RunFinishedError(
        f"{run_dir} holds the record of a finished prepare into {recorded}; this prepare writes into {out_dir}. "
        "Nothing was changed. Choose another run_name= to keep both records, or pass overwrite=true to file the "
        f"earlier record in {run_dir / ATTEMPTS}/NN/ (the data in {recorded} stays as it is).")


FILED_AT_RERUN = ".filed_at_rerun"  # in attempts/NN: a finished record filed by a rerun that has not ended yet


def file_finished_record(run_dir: Path) -> Path | None:
    """A finished run's record (DONE, config, run info) moved into attempts/NN/ (its dir), None when unfinished;
    a record an earlier rerun filed and could not put back (killed: kill -9, a node lost) is taken up again."""
    if not (run_dir / DONE).exists():
        return left_filed(run_dir)
    dest = next_attempt_dir(run_dir)
    (dest / FILED_AT_RERUN).touch()  # first: a kill from here on leaves it marked
    for name in (DONE, CONFIG, RUN_INFO):
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    return dest


def left_filed(run_dir: Path) -> Path | None:
    """The newest attempts/NN, when a rerun filed the finished record there and was killed before it put it
    back or kept it (its mark is still there), the run dir has no marker of its own, and no step finished
    since the filing (the record still describes the outputs)."""
    if (run_dir / FAILED).exists() or not (run_dir / ATTEMPTS).is_dir():
        return None
    numbered = [p for p in (run_dir / ATTEMPTS).iterdir() if p.name.isdigit()]
    newest = max(numbered, key=lambda p: int(p.name), default=None)
    if newest is None or not (newest / FILED_AT_RERUN).exists() or not (newest / DONE).exists():
        return None
    filed_at = (newest / FILED_AT_RERUN).stat().st_mtime
    if any(done.stat().st_mtime > filed_at for done in run_dir.glob(f"*/{DONE}")):
        return None
    log.info("%s: the finished record a killed rerun filed in %s is taken up again", run_dir, newest)
    return newest


def only_reused(result) -> bool:
    """A pipeline's result whose every step was a finished one reused (nothing trained, predicted or scored)."""
    steps = result.get("results") if isinstance(result, dict) else None
    return bool(steps) and all(isinstance(r, dict) and set(r) == {"reused"} for r in steps.values())


def report_of(stage: str, out_dir: Path, result) -> Path | None:
    """The page a finished run's reader opens first: eval's report (a pipeline's eval step), a sweep's table."""
    if stage == "sweep_report":
        return Path(result["report_dir"]) / SWEEP_TABLE
    eval_dir = {"eval": out_dir, "pipeline": out_dir / "eval"}.get(stage)
    return eval_dir / REPORT_HTML if eval_dir and (eval_dir / REPORT_HTML).exists() else None


def dir_setting(stage: str, run_dir: Path | None = None) -> str:
    """The setting whose other value gives a stage another output dir: prepare writes into data.prepared_dir
    whatever the run_name (stages/prepare.output_dir), every other stage into its run dir, which run_name
    places, or hydra.run.dir / hydra.sweep.dir where the launch gave one of its own (names.placed_by)."""
    if stage == "prepare":
        return "data.prepared_dir"
    from flare_exp.run.names import placed_by

    return placed_by(run_dir) if run_dir is not None else "run_name"


def reusable(stage: str, cfg, out_dir: Path) -> bool:
    """A pipeline's step already finished with this very fingerprint (deciding settings, input sha256, the
    adapter it started from): reuse it. Finished with another one: stop, naming what changed (its outputs do
    not follow this config). Unfinished, or overwrite=true: run it."""
    if not (out_dir / DONE).exists() or cfg.overwrite and not this_jobs_attempt(out_dir):
        return False  # (a step this SLURM job finished before its requeue is not redone)
    changed = finished_differences(stage, out_dir, cfg)
    if changed and all(c.startswith(MISSING_FINGERPRINT) for c in changed):  # nothing can reuse it: say what can
        raise RunSettingsChangedError(
            f"[{stage}] {out_dir} is finished, but {changed[0]} with this run's. Move {out_dir} aside (or delete "
            "it) to redo this step alone, or pass overwrite=true to redo the steps (earlier outputs move to "
            "attempts/NN/).")
    if changed:
        raise RunSettingsChangedError(
            f"[{stage}] {out_dir} holds a finished step made with other settings or inputs: {listed(changed)}. "
            "Rerun with the earlier ones to reuse it, pass overwrite=true to redo the steps (earlier outputs move "
            f"to attempts/NN/), or choose another {dir_setting(stage, out_dir)}= to keep both.")
    return True


def follow_rank_0(run_dir: Path, rank: int, fn=None, *args):
    """A rank > 0 of a data-parallel job: wait until rank 0 has checked the run dir (and moved an earlier
    attempt away), run ``fn(*args)`` (None: nothing, rank 0 alone works), leave FAILED naming this rank if it
    fails, then wait until every rank is done."""
    barrier()
    try:
        result = fn(*args) if fn is not None else None
    except BaseException as e:
        write_failed(run_dir, e, rank=rank, after_a_stop=_resume_wording())
        raise
    barrier()
    return result


def _resume_wording():
    from flare_exp.resume import after_a_stop_in  # the resume rules are built on run/: imported when a run fails

    return after_a_stop_in


def run_with_markers(run_dir: Path, fn, *args, after_clearing=None, **kwargs):
    """Run ``fn`` and leave DONE (with its result summary) or FAILED (with the traceback) in ``run_dir``.
    ``after_clearing`` runs once the old markers are gone (a data-parallel job's ranks start there)."""
    for name in (DONE, FAILED):
        (run_dir / name).unlink(missing_ok=True)
    if after_clearing is not None:
        after_clearing()
    start = time.time()
    try:
        result = fn(*args, **kwargs)
        check_still_held()  # stopped past the takeover wait: the run dir is another's now, DONE is not ours to write
    except BaseException as e:
        if not lock_lost():  # nor FAILED: the process that took the lock over writes the markers
            write_failed(run_dir, e, after_a_stop=_resume_wording())
        raise
    write_json(run_dir / DONE, {"seconds": round(time.time() - start, 2),
                                "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                                "result": result if isinstance(result, (dict, list, str, int, float)) else None})
    return result


def start_attempt(stage: str, cfg, run_dir: Path, ran=None, applied: dict | None = None) -> None:
    """Before a stage writes anything in run_dir: refuse a finished run (unless overwrite), archive the earlier
    attempt (overwrite) or check that a resume continues the same run, then record this attempt: the config
    that runs (``ran``, default ``cfg``) and what the card's sizing changed (``applied``); the fingerprint is
    the configured ``cfg``'s."""
    if (run_dir / DONE).exists() and not cfg.overwrite:
        held = held_stage(run_dir)  # config.yaml's first: a prepare writes no fingerprint
        setting = dir_setting(stage, run_dir)
        what = (f"a finished {held} run" if held else
                f"a finished run whose {CONFIG} does not read (of which stage is not known)")
        other = f" (this launch is stage={stage}: another {setting}= keeps both)" if held != stage else ""
        raise RunFinishedError(
            f"{run_dir} already holds {what} ({DONE} marker present){other}. Nothing of it was changed. Pass "
            "overwrite=true to redo it there (the finished run moves to attempts/NN/), or choose another "
            f"{setting}={' (prepare writes there, whatever the run_name)' if stage == 'prepare' else ''}.")
    new = fingerprint(stage, cfg)
    requeued = cfg.overwrite and not (run_dir / DONE).exists() and this_jobs_attempt(run_dir)
    if cfg.overwrite and attempt_files(run_dir) and not requeued:
        dest = archive_attempt(run_dir)
        log.info("overwrite=true: the earlier attempt in %s moved to %s; starting afresh", run_dir, dest)
    else:
        if requeued:
            log.info("overwrite=true: the unfinished attempt in %s is this SLURM job's own (requeued): continuing it",
                     run_dir)
        check_other_stage(stage, run_dir)
        check_resume(stage, run_dir, new, cfg)
    write_run_metadata(run_dir, cfg if ran is None else ran, adapter=adapter_identity(starting_adapter(stage, cfg)),
                       **({"applied": applied} if applied is not None else {}))
    write_json(run_dir / FINGERPRINT, new)  # what a resume, and a pipeline reusing the finished step, compare
