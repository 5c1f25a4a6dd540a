"""flare-exp entry point: ``python launch.py [stage=...] [model=...] [data=...] [reward=...] [key=value ...]``.

Kept thin on purpose: submitit pickles this task function for cluster jobs, so everything heavy is imported
inside it, from the flare_exp package.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

import flare_exp.config  # noqa: F401  (registers the structured-config schema)
import flare_exp.run.names  # noqa: F401  (registers the run_name resolver that places the run dir)

# What bad input raises (a missing file, a wrong key or value, a finished run, a missing package): our messages
# name the key and the fix, so a single run prints just the message. Anything else keeps Hydra's traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flare_exp.main import run
    from flare_exp.run.fingerprint import RunSettingsChangedError
    from flare_exp.run.lock import RunLockedError
    from flare_exp.run.record import RunFinishedError

    try:
        return run(cfg)
    except (*INPUT_ERRORS, RunFinishedError, RunLockedError, RunSettingsChangedError) as e:
        if HydraConfig.get().mode != RunMode.RUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # sweeps: the job fails and the sweep report says so
        print(f"\nflare-exp: {type(e).__name__}: {e}\n(HYDRA_FULL_ERROR=1 shows the traceback; a stage that "
              "had started also wrote it to FAILED in its run dir)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
