"""flare-exp entry point: ``python launch.py [stage=...] [model=...] [data=...] [reward=...] [key=value ...]``.

Kept thin on purpose: submitit pickles this task function for cluster jobs, so everything heavy is imported
inside it, from the flare_exp package.
"""
import hydra
from omegaconf import DictConfig

import flare_exp.config  # noqa: F401  (registers the structured-config schema)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from flare_exp.main import run

    return run(cfg)


if __name__ == "__main__":
    main()
