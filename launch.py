"""flare-exp entry point: ``python launch.py [stage=...] [model=...] [data=...] [reward=...] [key=value ...]``.

Kept thin on purpose: submitit pickles this task function for cluster jobs, so everything heavy is imported
inside it, from the flare_exp package.
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import flare_exp.config  # noqa: F401  (registers the structured-config schema)
import flare_exp.run.names  # noqa: F401  (registers the run_name resolver that places the run dir)
import flare_exp.run.stage  # noqa: F401  (registers the stage_help resolver: the stages on the help page)
# the command line's checks before Hydra composes (CONF_DIR, composed, own_message: read by the tests too)
from flare_exp.command_line import (CONF_DIR, check_command_line, composed, flags_first,  # noqa: F401
                                    own_message, refuse, speaker)

# What bad input raises (a missing file, a wrong key or value, a finished run, a missing package): our messages
# name the key and the fix, so a single run prints just the message. Anything else keeps Hydra's traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError)


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's preemption or time limit, `kill`) and SIGHUP (the terminal closed) stop a single run
    as Ctrl-C does: the run dir gets its FAILED marker (stopped from outside) instead of the process vanishing
    without one. A SIGHUP ignored already (started under nohup) stays ignored."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, stop)


def resumes_from(cfg) -> str:
    """What the same command does after a stop (flare_exp.resume.after_a_stop), for this launch's run dir."""
    from hydra.core.hydra_config import HydraConfig

    from flare_exp.resume import after_a_stop

    return after_a_stop(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flare_exp.main import run
    from flare_exp.run.fingerprint import RunSettingsChangedError
    from flare_exp.run.lock import RunLockedError, RunLockLostError
    from flare_exp.run.record import RunFinishedError

    # sweeps keep the exception (the job fails and the sweep report says so), as does HYDRA_FULL_ERROR=1
    single = HydraConfig.get().mode == RunMode.RUN
    said_in_one_line = single and os.environ.get("HYDRA_FULL_ERROR") != "1"
    if single:  # a sweep's jobs: submitit's workers handle their own signals, the watched launcher its own (StopInProcess)
        stop_on_sigterm()
    else:
        from flare_exp.sweep_stop import hear_the_sweeps_stop

        hear_the_sweeps_stop()
    try:
        return run(cfg)
    except (*INPUT_ERRORS, RunFinishedError, RunLockedError, RunSettingsChangedError, MemoryError) as e:
        if not said_in_one_line:
            raise
        if isinstance(e, RunLockLostError):
            refuse(e, "nothing more was written into that run dir, no FAILED either: it is the other run's now")
        if cfg.stage.name == "runs":  # a view: no run dir, no FAILED
            refuse(e, "HYDRA_FULL_ERROR=1 shows the traceback; this view wrote nothing")
        refuse(e)
    except RuntimeError as e:  # a rank of a data-parallel job died: this one's collective broke (FAILED says so)
        from flare_exp.runtime import lost_peer, ranks

        if not said_in_one_line or not lost_peer(e):
            raise
        failed = Path(HydraConfig.get().runtime.output_dir) / "FAILED"
        print(f"\nflare-exp: rank {ranks()[0]} lost another rank of this job ({str(e).splitlines()[0][:120]}): that "
              "rank ended first; its own message above says why, or, where it has none, it was killed or crashed "
              "without a word (out of memory, SIGKILL, a node lost; torchrun's summary names it)."
              + (f" The run dir says FAILED; the same command {resumes_from(cfg)}." if failed.exists() else ""),
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGINT, SIGTERM or SIGHUP: the run dir says FAILED (stopped from outside)
        if not said_in_one_line:
            raise
        by = str(e) if str(e) in ("SIGTERM", "SIGHUP") else "Ctrl-C / SIGINT"
        resumes = resumes_from(cfg)
        then = (f"the same command {resumes}" if not cfg.overwrite or os.environ.get("SLURM_JOB_ID") else
                f"the same command without overwrite=true {resumes} (with it, this attempt moves to attempts/ and "
                "it starts afresh)")  # a requeued SLURM job continues its own attempt, overwrite or not
        print(f"\n{speaker()}: stopped ({by}). The run dir says FAILED (stopped from outside); {then}.", file=sys.stderr)
        sys.exit({"SIGTERM": 143, "SIGHUP": 129}.get(by, 130))


if __name__ == "__main__":
    sys.argv[1:] = flags_first(sys.argv[1:])  # `a=1 -m b=2` as `-m a=1 b=2` (Hydra's parser wants flags first)
    check_command_line(sys.argv[1:])
    main()
