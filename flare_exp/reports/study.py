"""The study view of a sweep_report, for sweeps run by the Optuna sweeper: every trial with its settings and
objectives, the best trial (one objective) or the Pareto front (several), the optimisation history, the
parameters' importances, and the command that reruns a best trial alone."""
from __future__ import annotations

import json
import logging
import math
import shlex
from pathlib import Path

from flare_exp.io import write_text
from flare_exp.optuna_study import STUDY_FILE, open_storage
from flare_exp.reports.tables import md_table, short_number

log = logging.getLogger(__name__)


def load_study(sweep_dir: Path):
    import optuna

    info = json.loads((sweep_dir / STUDY_FILE).read_text())
    storage = info["storage"]
    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(storage, sweep_dir))
    return study, info


RETRIED = "interrupted (retried)"  # the status of such a trial's dir, for the sweep report and the runs listing


def retried_trials(sweep_dir: Path) -> set[str]:
    """The numbers of an Optuna search's trials that a killed launch left running: the rerun retried each under a
    new number, so their dirs are never resumed. Empty for a grid sweep or a study that does not open."""
    if not (sweep_dir / STUDY_FILE).exists():
        return set()
    try:
        study, _ = load_study(sweep_dir)
    except Exception:  # noqa: BLE001  (a study that does not open: no trial is known as retried)
        return set()
    return {str(t.number) for t in study.get_trials(deepcopy=False) if t.user_attrs.get("interrupted")}


def rerun_command(trial, study_name: str) -> str:
    # alone: not reporting to the study (rl.optuna_*), under its own name
    overrides = [o for o in trial.user_attrs.get("overrides", []) if not o.startswith(("run_name=", "rl.optuna_"))]
    return "python launch.py " + " ".join(shlex.quote(o) for o in overrides) + \
        f" run_name={study_name}-trial{trial.number}"


def best_trials(study) -> list:
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def trial_rows(study, names: list[str]) -> tuple[list[str], list[list]]:
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    best = {t.number for t in best_trials(study)}
    header = ["trial", "state", *names, *params, "best", "note"]
    rows = []
    for t in trials:
        values = list(t.values) if t.values else [""] * len(names)
        note = "interrupted, retried" if t.user_attrs.get("interrupted") else t.user_attrs.get("failure", "")
        if t.user_attrs.get("pruned_at_step") is not None:
            note = pruned_note(t)
        rows.append([t.number, t.state.name, *values, *(t.params.get(p, "") for p in params),
                     "yes" if t.number in best else "", note])
    return header, rows


def pruned_note(trial) -> str:
    last = trial.intermediate_values.get(trial.user_attrs["pruned_at_step"])
    return (f"pruned at step {trial.user_attrs['pruned_at_step']}"
            + (f" (in-training metric {last:.4g})" if last is not None else "")
            + f", {trial.user_attrs.get('steps_saved', 0)} steps saved")


def pruned_section(study) -> list[str]:
    """Trials the pruner stopped, each with its step, its last in-training value and the steps it did not run."""
    import optuna

    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    if not pruned:
        return []
    saved = sum(t.user_attrs.get("steps_saved") or 0 for t in pruned)
    return ["", f"## Pruned trials ({len(pruned)}; {saved} training steps saved)", "",
            *(f"- trial {t.number}: {pruned_note(t)}; {t.params}" for t in pruned)]


def importances(study) -> dict[str, float]:
    """Each parameter's share of the objective's variance (Optuna's fANOVA); empty when it cannot be told
    (fewer than two finished trials, one parameter, constant objectives)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or len({t.values[0] for t in complete}) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(study, target=(lambda t: t.values[0]))
    except (RuntimeError, ValueError) as e:
        log.info("parameter importances not computed: %s", e)
        return {}


def plot_study(study, names: list[str], path: Path) -> None:
    from flare_exp.plotting import save_png, subplots

    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    several = len(names) > 1
    fig, axes = subplots(1, 3 if several else 2, figsize=(15 if several else 11, 4.2))
    history = axes[0]
    for i, name in enumerate(names):
        xs, ys = [t.number for t in done], [t.values[i] for t in done]
        history.plot(xs, ys, "o", label=name)
        if not several and ys:
            pick = min if study.direction.name == "MINIMIZE" else max
            history.plot(xs, [pick(ys[:k + 1]) for k in range(len(ys))], "-", label="best so far")
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]
    for n in failed:
        history.axvline(n, color="tab:red", alpha=0.25)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)):
        history.axvline(t.number, color="tab:orange", alpha=0.35)
    history.set(title="optimisation history (red lines: failed trials, orange: pruned)", xlabel="trial",
                ylabel="objective")
    history.legend(fontsize=7)
    share = importances(study)
    names_shown = list(share)[::-1] or ["(needs 2+ complete trials\nwith different objectives)"]
    axes[1].barh(names_shown, list(share.values())[::-1] or [0])
    axes[1].set(title=f"parameter importance for {names[0]}", xlim=(0, 1))
    axes[1].tick_params(axis="y", labelsize=7)
    if several:
        front = {t.number for t in best_trials(study)}
        for on_front, color in ((False, "tab:gray"), (True, "tab:blue")):
            pts = [t for t in done if (t.number in front) == on_front]
            axes[2].scatter([t.values[0] for t in pts], [t.values[1] for t in pts], color=color,
                            label="Pareto front" if on_front else "dominated")
            for t in pts:
                axes[2].annotate(f"#{t.number}", (t.values[0], t.values[1]), fontsize=7)
        axes[2].set(title="Pareto front", xlabel=names[0], ylabel=names[1])
        axes[2].legend(fontsize=7)
    save_png(fig, path)


def write_study_report(sweep_dir: Path, report: Path) -> dict:
    import optuna

    study, info = load_study(sweep_dir)
    names = info["objectives"]
    header, rows = trial_rows(study, names)
    best = best_trials(study)
    interrupted = sum(bool(t.user_attrs.get("interrupted")) for t in study.get_trials(deepcopy=False)
                      if t.state == optuna.trial.TrialState.FAIL)  # a killed search's trials, retried by its rerun
    lines = [f"# Optuna study {study.study_name}", "",
             f"Objectives: {', '.join(f'{n} ({d})' for n, d in zip(names, info['directions']))}; "
             f"{len(rows)} trials, {sum(r[1] == 'COMPLETE' for r in rows)} complete, "
             f"{sum(r[1] == 'FAIL' for r in rows) - interrupted} failed, "
             + (f"{interrupted} interrupted (retried), " if interrupted else "")
             + f"{sum(r[1] == 'PRUNED' for r in rows)} pruned.", "",
             "## Best trial" + ("s (the Pareto front)" if len(names) > 1 else ""), ""]
    for t in best:
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t.values) if isinstance(v, float) and math.isfinite(v))
        lines += [f"- trial {t.number}: {values}; {t.params}", f"  rerun alone: `{rerun_command(t, study.study_name)}`"]
    if not best:
        lines.append("- none complete yet")
    lines += pruned_section(study)
    share = importances(study)
    if share:
        lines += ["", "## Parameter importance", ""] + [f"- {k}: {v:.2f}" for k, v in share.items()]
    lines += ["", "## Trials", "", *md_table(header, rows, cell=short_number)]
    write_text(report / "study.md", "\n".join(lines) + "\n")
    plot_study(study, names, report / "study.png")
    for t in best:
        log.info("best trial %d: %s -> %s\n  rerun alone: %s", t.number, t.params, t.values,
                 rerun_command(t, study.study_name))
    return {"trials": len(rows), "pruned_trials": sum(r[1] == "PRUNED" for r in rows),
            "steps_saved": sum(t.user_attrs.get("steps_saved") or 0 for t in study.get_trials(deepcopy=False)),
            "best_trials": [t.number for t in best],
            "best_values": [list(t.values) for t in best]}
