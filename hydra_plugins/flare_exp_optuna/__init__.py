"""flare-exp\x27s Hydra plugins: the Optuna sweeper (hydra/sweeper=optuna)."""
