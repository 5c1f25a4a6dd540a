"""Hydra's Sweeper plugin for ``hydra/sweeper=optuna`` (conf/hydra/sweeper/optuna.yaml). Hydra only loads
sweepers from the ``hydra_plugins`` package and imports every module in it at startup, so this module stays
light: the search itself is flare_exp/optuna_search.py, imported when a sweep starts."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    def __init__(self, objectives: List[str], n_trials: int = 20, n_jobs: int = 2,
                 params: Optional[Dict[str, str]] = None, objective_weights: Optional[Dict[str, float]] = None,
                 sampler: Optional[Dict[str, Any]] = None, storage: Optional[str] = None,
                 study_name: Optional[str] = None, pruner: Optional[Dict[str, Any]] = None) -> None:
        # the objectives as given: the search reads them (optuna_study.objective_list: one without brackets is one)
        self.settings = dict(objectives=objectives, n_trials=n_trials, n_jobs=n_jobs, params=params,
                             objective_weights=objective_weights, sampler=sampler, storage=storage,
                             study_name=study_name, pruner=pruner)
        self.launcher = self.config = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from flare_exp.optuna_search import Search, SearchFailedError
        from flare_exp.sweep_watch import exit_with

        try:
            return Search(self, arguments).run()
        except SearchFailedError as e:  # named without a traceback; the sweep exits non-zero
            exit_with(str(e))
        except ValueError as e:  # a setting the search refuses before any trial: the sweep dir as it was
            if not getattr(self.launcher, "_launched", True):
                self.launcher._record.restore()
            exit_with(str(e), 2)
