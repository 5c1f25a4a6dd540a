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
    if name == "none":  # no pruning: the arguments the config keeps for median mean nothing
        return optuna.pruners.NopPruner()
    import inspect

    takes = [p for p in inspect.signature(classes[name]).parameters if p != "self"]
    foreign = [k for k in setting if k not in takes]
    if foreign:  # e.g. median's n_startup_trials, kept from conf/hydra/sweeper/optuna.yaml when the name changes
        raise ValueError(f"hydra.sweeper.pruner: {name} takes no {', '.join(foreign)} (it takes "
                         f"{', '.join(takes) or 'nothing'}): drop it with "
                         f"{' '.join(f'~hydra.sweeper.pruner.{k}' for k in foreign)}" + (
                             " (the sweeper's config sets median's arguments, kept when only the name changes)"
                             if name != "median" and set(foreign) & {"n_startup_trials", "n_warmup_steps"} else ""))
    try:
        return classes[name](**setting)
    except (TypeError, ValueError) as e:  # Optuna's own range checks (a percentile of 150) with the key
        raise ValueError(f"hydra.sweeper.pruner ({name}, {setting}): {e}") from None


def pruning_overrides(search, trial) -> list[str]:
    """What a trial job needs to report its in-training metric to the study and be pruned: nothing when the
    sweep does not prune (pruner none, several objectives, or trials without rl.eval_steps)."""
    from flare_exp.optuna_study import STUDY_FILE

    if not getattr(search, "prunes", False):
        return []
    return [f"rl.optuna_study={search.sweep_dir / STUDY_FILE}", f"rl.optuna_trial={trial.number}"]


def pruning_enabled(setting: dict | None, objectives: list[str], directions: list[str], config) -> bool:
    """Whether this sweep prunes; says why not, naming the fix, when a pruner is set but cannot work, and refuses
    an in-training metric that runs against the study's direction (the pruner would stop the best trials)."""
    name = str((setting or {}).get("name", "none")).lower()
    if name == "none":
        return False
    if len(directions) > 1:
        same = [o for o, d in zip(objectives, directions) if d == directions[0]]
        log.warning("optuna: hydra.sweeper.pruner=%s is not used: Optuna prunes single-objective studies only and "
                    "this one has %d objectives (%s). To prune, fold them into one number with "
                    "hydra.sweeper.objective_weights (metrics of one direction, e.g. '{%s}') or keep one objective, "
                    "with rl.eval_steps=N and rl.metric_for_best_model set to match; "
                    "hydra.sweeper.pruner.name=none keeps this Pareto search without this message", name,
                    len(objectives), ", ".join(objectives), ", ".join(f"{o}: 1" for o in same))
        return False
    rl = config.rl
    if not rl.get("eval_steps"):
        log.info("optuna: hydra.sweeper.pruner=%s is not used: the trials report no in-training metric "
                 "(pass rl.eval_steps=N, and rl.metric_for_best_model=<the objective>)", name)
        return False
    return in_training_metric_fits(rl.metric_for_best_model, objectives, directions[0])


def in_training_metric_fits(spec: str, objectives: list[str], direction: str) -> bool:
    """The intermediate values (rl.metric_for_best_model) must improve where the objective does."""
    from flare_exp.rl_monitor.heldout import OFFICIAL_MEAN, higher_is_better

    reported = "maximize" if higher_is_better(spec) else "minimize"
    if reported != direction:
        raise ValueError(f"rl.metric_for_best_model={spec} (each trial's intermediate value, to {reported}) runs "
                         f"against the study's objective ({', '.join(objectives)}: {direction}): the pruner would "
                         f"stop the best trials. Pass rl.metric_for_best_model={objectives[0]} (or another that "
                         "improves with the objective), or hydra.sweeper.pruner.name=none")
    if spec not in objectives and spec != OFFICIAL_MEAN:
        log.info("optuna: trials are pruned on rl.metric_for_best_model=%s while the study's objective is %s",
                 spec, ", ".join(objectives))
    return True


def trial_pruner(study_file: Path, number: int):
    """In a trial's job: ``report(step, value) -> prune?``, the in-training metric reported to the study as
    trial ``number``'s intermediate value, and the study's pruner asked."""
    import optuna

    from flare_exp.optuna_study import open_storage

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
