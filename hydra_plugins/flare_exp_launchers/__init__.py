"""flare-exp's sweep launchers (hydra/launcher=local, slurm): Hydra's submitit launchers, made loud."""
