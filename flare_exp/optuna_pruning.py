"""Optuna pruning for the reward-weight search: the in-training held-out metric a trial's rl reports as
intermediate values, the study's pruner (hydra.sweeper.pruner), and a pruned trial told to the study."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")


def make_pruner(setting: dict | None):
    """Optuna's pruner from hydra.sweeper.pruner ({name: median, <its arguments>}); none / null: no pruning."""
    import optuna

    setting = dict(setting or {"name": "none"})
    name = str(setting.pop("name", "median")).lower()
    classes = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
               "none": optuna.pruners.NopPruner}
    if name not in classes:
        raise ValueError(f"hydra.sweeper.pruner.name={name!r}: choose {', '.join(PRUNERS)}")
    try:
        return classes[name](**setting)
    except TypeError as e:
        raise ValueError(f"hydra.sweeper.pruner: {e}") from None


def pruning_overrides(search, trial) -> list[str]:
    """What a trial job needs to report its in-training metric to the study and be pruned: nothing when the
    sweep does not prune (pruner none, several objectives, or trials without rl.eval_steps)."""
    from flare_exp.optuna_search import STUDY_FILE

    if not getattr(search, "prunes", False):
        return []
    return [f"rl.optuna_study={search.sweep_dir / STUDY_FILE}", f"rl.optuna_trial={trial.number}"]


def pruning_enabled(setting: dict | None, directions: list[str], config) -> bool:
    """Whether this sweep prunes; says why not when a pruner is set but cannot work."""
    name = str((setting or {}).get("name", "none")).lower()
    if name == "none":
        return False
    if len(directions) > 1:
        log.warning("optuna: hydra.sweeper.pruner=%s is not used: Optuna prunes single-objective studies only "
                    "(use objective_weights for one number)", name)
        return False
    if not config.rl.get("eval_steps"):
        log.info("optuna: hydra.sweeper.pruner=%s is not used: the trials report no in-training metric "
                    "(pass rl.eval_steps=N, and rl.metric_for_best_model=<the objective>)", name)
        return False
    return True


def trial_pruner(study_file: Path, number: int):
    """In a trial's job: ``report(step, value) -> prune?``, the in-training metric reported to the study as
    trial ``number``'s intermediate value, and the study's pruner asked."""
    import optuna

    from flare_exp.optuna_search import open_storage

    info = json.loads(Path(study_file).read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"],
                                                                                  Path(study_file).parent),
                              pruner=make_pruner(info.get("pruner")))
    trial = optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id,
                                                                                               number))

    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    return report


def pruned_summary(job_dir: Path) -> dict | None:
    """A trial's rl_summary.json when its rl stopped because the pruner said so (pruned_at_step), else None;
    ``job_dir``: a pipeline's run dir (its rl/ step) or the rl run dir itself."""
    for path in (Path(job_dir) / "rl" / "rl_summary.json", Path(job_dir) / "rl_summary.json"):
        if path.is_file():
            summary = json.loads(path.read_text())
            return summary if summary.get("pruned_at_step") is not None else None
    return None


def tell_pruned(study, trial, job_dir: Path) -> bool:
    """A pruned trial told to the study as PRUNED, with its step and the steps it did not run."""
    import optuna

    summary = pruned_summary(job_dir)
    if summary is None:
        return False
    trial.set_user_attr("pruned_at_step", summary["pruned_at_step"])
    trial.set_user_attr("steps_saved", summary.get("steps_saved", 0))
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    log.info("optuna: trial %d pruned at step %d (%s steps saved)", trial.number, summary["pruned_at_step"],
             summary.get("steps_saved"))
    return True
