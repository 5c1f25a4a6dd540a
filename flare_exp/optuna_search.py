"""Reward weights (or any keys) searched by Optuna, trials launched by Hydra's launcher (submitit: local processes
or SLURM array jobs), objectives read from each trial's eval metrics.

Why not the hydra-optuna-sweeper package: its releases pin optuna<3.0, which has no journal storage (the one
Optuna storage that is safe on a cluster's shared filesystem; SQLite is not) and no study resume across killed
sweeps that we could rely on. This module is the glue only: Optuna samples, stores and ranks; Hydra's launcher
runs the jobs; each trial is an ordinary job of the stages (rl -> infer -> eval in its own job dir).

The study is persisted (default: ``<sweep dir>/optuna.journal``), so rerunning the same command continues it:
finished trials are kept, trials a killed sweep left running are marked failed ("interrupted") and their
settings tried again, and the study goes on to ``n_trials`` finished trials. A torn last line of the journal (a
kill mid-append) is cut off before anything is appended; one search runs per study at a time (a lock beside
the journal); a trial whose search still lives is never marked interrupted.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from flare_exp.io import write_json
from flare_exp.optuna_pruning import make_pruner, pruning_enabled, pruning_overrides, tell_pruned
from flare_exp.optuna_settings import sampler_problems, weight_problems
from flare_exp.optuna_study import (JOURNAL, STUDY_FILE, check_objective, direction_of, journal_path, objective_list,
                                    objective_value, open_storage)

log = logging.getLogger(__name__)


def search_space(overrides) -> tuple[dict, list[str]]:
    """Optuna distributions for the sweep overrides (interval(a,b) [tag(log, ...)], range(a,b[,step]),
    choice(a,b) or a,b), and the plain overrides every trial gets."""
    space, fixed = {}, []
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            fixed.append(f"{key}={o.get_value_element_as_str()}")
            continue
        try:
            space[key] = _distribution(o.value())
        except ValueError as e:  # Optuna's own words (low above high, a log scale from 0) with the key
            raise ValueError(f"{o.input_line or key}: {e}") from None
    if not space:
        raise ValueError("the Optuna sweeper got no search space: give keys as key='interval(0,1)', "
                         "key='choice(a,b)' on the command line or in hydra.sweeper.params")
    return space, fixed


def _distribution(value):
    """The Optuna distribution of one sweep override's value."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(value.range())
        if not values:
            raise ValueError("an empty range")
        return CategoricalDistribution(values) if any(isinstance(v, float) for v in values) else \
            IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                                        for v in value.list])
    raise ValueError("the Optuna sweeper takes interval(), range() and choice() sweeps")


def search_lock(storage: str | None, sweep_dir: Path):
    """One search per study: the lock beside the journal (or in the sweep dir, for a database), held while the
    search runs; a second search stops naming the first (run.lock.RunLock: a dead holder's is taken over)."""
    from flare_exp.run.lock import RunLock

    path = journal_path(storage, sweep_dir)
    if path is None:
        return RunLock(sweep_dir, name=".optuna.lock")
    # a journal named on purpose holds the study whatever the run_name (the sweep dir): another one is another study
    return RunLock(path.parent, name=f".{path.name}.lock", placed_by="hydra.sweeper.storage" if storage else "run_name")


SEARCH = "search"  # a trial's user attribute: the search (host, pid) that runs it


def this_search() -> dict:
    import os
    import platform

    return {"host": platform.node(), "pid": os.getpid()}


def search_alive(owner: dict | None) -> bool:
    """Whether the search that asked for a trial still runs: on this host, its pid lives; another host's is
    taken as gone (the study's lock, held by this search, says no other search runs on it)."""
    import platform

    from flare_exp.run.lock import _pid_alive

    return bool(owner) and owner.get("host") == platform.node() and owner.get("pid") != this_search()["pid"] \
        and _pid_alive(int(owner.get("pid", -1)))


def recover_interrupted(study) -> int:
    """Trials a killed sweep left RUNNING: marked failed ("interrupted", not counted) and queued again. A trial
    whose search still runs (a live process on this host) is left to it."""
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    stale = [t for t in running if not search_alive(t.user_attrs.get(SEARCH))]
    for trial in running:
        if trial not in stale:
            log.warning("optuna: trial %d runs in a live search (%s): left to it", trial.number,
                        trial.user_attrs[SEARCH])
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        log.warning("optuna: trial %d was left running by an earlier, killed sweep: marked failed "
                    "(interrupted) and queued again", trial.number)
    return len(stale)


def finished_trials(study) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get("interrupted"))


class SearchFailedError(RuntimeError):
    """Trials of this search failed: the search ends non-zero, naming them (the study keeps them as FAIL)."""


def raise_for_failed_trials(study, numbers: list[int]) -> None:
    """The trials of ``numbers`` (this search's) that failed, named in a SearchFailedError."""
    import optuna

    failed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
              if t.number in set(numbers) and not t.user_attrs.get("interrupted")]
    if failed:
        raise SearchFailedError(
            f"{len(failed)} of {len(numbers)} trial(s) failed (a trial that stopped: its job dir's FAILED says why; "
            "one that finished: its metrics.json lacked a finite objective):\n"
            + "\n".join(f"  trial {t.number}: {t.user_attrs.get('failure', 'failed')}" for t in failed))


def job_metrics(ret) -> tuple[dict | None, str | None]:
    """(the metrics.json block of a finished trial job, or None with the reason)."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        error = ret._return_value
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    from flare_exp.catalog import own_block

    value = ret.return_value if isinstance(ret.return_value, dict) else {}
    eval_dir = (value.get("steps") or {}).get("eval")
    path = Path(eval_dir) / "metrics.json" if eval_dir else Path(value.get("metrics", ""))
    if not path.is_file():
        return None, "the trial ran no eval (stage.steps must end with eval) or wrote no metrics.json"
    # the trial's own model: stage.compare's (base, the sft it starts from) are scored in the same file
    trial_dir = Path(eval_dir).parent if eval_dir else Path(value["kept"]) if value.get("kept") else None
    return own_block(json.loads(path.read_text()), trial_dir), None


def _comparable(key: str, value):
    """A recorded study setting as it decides the study: fixed overrides in any order, a path with or without its
    trailing slash."""
    if key == "fixed_overrides":
        return sorted(str(o).rstrip("/") for o in value or [])
    return value


def _change(key: str, before, now) -> str:
    if key == "fixed_overrides":
        gone, new = set(_comparable(key, before)) - set(_comparable(key, now)), \
            set(_comparable(key, now)) - set(_comparable(key, before))
        return f"fixed overrides: {sorted(gone) or 'none'} -> {sorted(new) or 'none'}"
    if key == "distributions" and isinstance(before, dict) and isinstance(now, dict):
        return "; ".join(f"{name}: {_described(before.get(name))} -> {_described(now.get(name))}"
                         for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name))
    return f"{key}: {before} -> {now}"


def _described(distribution) -> str:
    """A recorded Optuna distribution (its JSON) as the override that makes it: interval(0,2), range(1,5),
    choice(a,b), with a log scale or a step said; (not searched) where there is none."""
    if not isinstance(distribution, dict):
        return "(not searched)"
    name, values = distribution.get("name"), distribution.get("attributes") or {}
    if name == "CategoricalDistribution":
        return f"choice({','.join(map(str, values.get('choices', [])))})"
    if name not in ("FloatDistribution", "IntDistribution"):
        return json.dumps(distribution)
    how = [word for word, on in (("log", values.get("log")), (f"step {values.get('step')}",
                                                              values.get("step") not in (None, 1))) if on]
    text = (f"{'interval' if name == 'FloatDistribution' else 'range'}"
            f"({values.get('low')},{values.get('high')})")
    return text + (f" [{', '.join(how)}]" if how else "")


class Search:
    """One study: its objectives and directions, the search space, and the launcher that runs its trials."""

    def __init__(self, sweeper, arguments: list[str]):
        import optuna
        from hydra.core.override_parser.overrides_parser import OverridesParser

        s = sweeper.settings
        self.launcher, self.config, self.hydra_context = sweeper.launcher, sweeper.config, sweeper.hydra_context
        self.objectives = objective_list(s["objectives"])
        for spec in self.objectives:
            check_objective(spec)
        self.weights = dict(s.get("objective_weights") or {})
        parser = OverridesParser.create()
        params = [f"{k}={v}" for k, v in (s.get("params") or {}).items()]
        self.space, self.fixed = search_space(parser.parse_overrides(list(arguments) + params))
        self.directions = [direction_of(o) for o in self.objectives]
        if self.weights:
            problems = weight_problems(self.weights, self.objectives)
            if problems:
                raise ValueError("; ".join(problems))
            self.directions = [direction_of(next(o for o in self.objectives if self.weights.get(o)))]
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.n_trials, self.n_jobs = int(s["n_trials"]), max(1, int(s["n_jobs"]))
        self.grid: list[dict] = []
        sampler = self._sampler(s.get("sampler") or {})
        self.storage_setting = s.get("storage")
        self.pruner_setting = dict(s.get("pruner") or {}) or None
        self.prunes = pruning_enabled(self.pruner_setting, self.objectives, self.directions, self.config)
        self.study = optuna.create_study(
            pruner=make_pruner(self.pruner_setting if self.prunes else None),
            study_name=s.get("study_name") or self.sweep_dir.name, storage=open_storage(self.storage_setting,
                                                                                         self.sweep_dir),
            sampler=sampler, load_if_exists=True,
            **({"direction": self.directions[0]} if len(self.directions) == 1 else {"directions": self.directions}))
        seed, earlier = (s.get("sampler") or {}).get("seed"), len(self.study.trials)
        if earlier and seed is not None:  # a continued study: with the same seed its sampler would draw the first
            # trials' settings again (a killed search's rerun repeated whole trials)
            self.study.sampler = type(sampler)(seed=(int(seed) + earlier) % 2**32)

    def _sampler(self, setting: dict):
        import optuna

        name, seed = str(setting.get("name", "tpe")).lower(), setting.get("seed")
        if name == "grid":  # every combination enqueued once (Optuna's GridSampler stops studies it does not run)
            import itertools

            choices = {k: d.choices for k, d in self.space.items() if hasattr(d, "choices")}
            if len(choices) != len(self.space):
                raise ValueError("sampler grid takes choice() / a,b sweeps only")
            self.grid = [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]
            if self.n_trials > len(self.grid):
                log.info("optuna: the grid has %d points; n_trials=%d is cut to it", len(self.grid), self.n_trials)
                self.n_trials = len(self.grid)
            return optuna.samplers.RandomSampler(seed=seed)
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                    "nsga2": optuna.samplers.NSGAIISampler}
        problems = sampler_problems(setting)
        if problems:
            raise ValueError("; ".join(problems))
        return samplers[name](seed=seed)

    def values(self, metrics: dict) -> tuple[list[float] | None, str | None]:
        found = {o: objective_value(metrics, o) for o in self.objectives}
        missing = [o for o, v in found.items() if v is None or not math.isfinite(v)]
        if missing:
            return None, (f"objective(s) {', '.join(missing)} missing or not finite in the trial's metrics "
                          f"({', '.join(f'{o}={found[o]}' for o in missing)})")
        if self.weights:
            total = sum(self.weights.get(o, 0.0) for o in self.objectives)
            return [sum(self.weights.get(o, 0.0) * found[o] for o in self.objectives) / total], None
        return [found[o] for o in self.objectives], None

    def run(self) -> list:
        with search_lock(self.storage_setting, self.sweep_dir):
            self._refuse_other_settings()
            return self._search()

    def _search(self) -> list:
        recover_interrupted(self.study)
        for point in self.grid:
            self.study.enqueue_trial(point, skip_if_exists=True)
        self._record()
        results, asked = [], []
        while (left := self.n_trials - finished_trials(self.study)) > 0:
            trials = [self.study.ask(self.space) for _ in range(min(self.n_jobs, left))]
            for trial in trials:
                trial.set_user_attr(SEARCH, this_search())
            asked += [t.number for t in trials]
            results += self._launch(self._refuse_bad_settings(trials))
        self._record()
        log.info("optuna: %d trials finished in %s; sweep_report: python launch.py stage=sweep_report "
                 "sweep_report.sweep_dir=%s", finished_trials(self.study), self.sweep_dir, self.sweep_dir)
        raise_for_failed_trials(self.study, asked)
        return results

    def _overrides(self, trial) -> list[str]:
        return [*self.fixed, *(f"{k}={v}" for k, v in trial.params.items()), *pruning_overrides(self, trial)]

    def _refuse_bad_settings(self, trials: list) -> list:
        """Trials whose settings a run would refuse fail here, unlaunched (FAILED in their job dir says why);
        the others are returned."""
        import optuna

        from flare_exp.run.record import write_failed
        from flare_exp.sweep_checks import job_problems

        good = []
        for trial in trials:
            problems = job_problems(self.hydra_context, self.config, self._overrides(trial))
            if not problems:
                good.append(trial)
                continue
            reason = "settings a run refuses: " + "; ".join(problems)
            trial.set_user_attr("failure", reason)
            trial.set_user_attr("job_dir", str(self.sweep_dir / str(trial.number)))
            write_failed(self.sweep_dir / str(trial.number), ValueError(reason))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("optuna: trial %d not launched: %s", trial.number, reason)
        return good

    def _launch(self, trials: list) -> list:
        import optuna

        if not trials:
            return []
        overrides = [self._overrides(t) for t in trials]
        numbers = [t.number for t in trials]
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        # the job dir of trial N is <sweep dir>/N (jobs of one launch are numbered from its first index)
        returns = self.launcher.launch(overrides, initial_job_idx=numbers[0]) if consecutive else \
            [self.launcher.launch([o], initial_job_idx=n)[0] for o, n in zip(overrides, numbers)]
        for trial, job, ret in zip(trials, overrides, returns):
            trial.set_user_attr("overrides", job)
            trial.set_user_attr("job_dir", str(self.sweep_dir / str(trial.number)))
            if tell_pruned(self.study, trial, self.sweep_dir / str(trial.number)):
                continue
            metrics, reason = job_metrics(ret)
            values = None
            if metrics is not None:
                values, reason = self.values(metrics)
            if values is None:
                trial.set_user_attr("failure", reason)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning("optuna: trial %d failed: %s", trial.number, reason)
            else:
                self.study.tell(trial, values)
                log.info("optuna: trial %d %s", trial.number, dict(zip(self._names(), values)))
        return returns

    def _names(self) -> list[str]:
        return ["weighted(" + ",".join(self.objectives) + ")"] if self.weights else self.objectives

    def _deciding(self) -> dict:
        """What makes two searches one study: their trials' numbers are comparable only where these agree."""
        from optuna.distributions import distribution_to_json

        return {"objectives": self._names(), "objective_weights": self.weights or None, "directions": self.directions,
                "search_space": sorted(self.space), "fixed_overrides": self.fixed,
                "distributions": {k: json.loads(distribution_to_json(d)) for k, d in sorted(self.space.items())}}

    def _refuse_other_settings(self) -> None:
        """A rerun that changed the objectives, weights, search space or fixed overrides of a study with finished
        trials would continue it: the old trials' values ranked under the new objective's name, the sampler
        fitted to them. Refused, naming what changed; a study without a finished trial takes the new settings."""
        import optuna

        path = self.sweep_dir / STUDY_FILE
        if not path.is_file():
            return
        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                             optuna.trial.TrialState.PRUNED))
        before, now = json.loads(path.read_text()), self._deciding()
        changed = [_change(key, before[key], now[key]) for key in now if key in before
                   and _comparable(key, before[key]) != _comparable(key, now[key])]
        if done and changed:
            raise ValueError(f"hydra.sweeper: the study in {self.sweep_dir} has {len(done)} finished trial(s) made "
                             f"with other settings ({'; '.join(changed)}); continuing it would rank them beside "
                             "these. Rerun with its settings to continue it, or pass run_name=<another name> to "
                             "start a new study in its own sweep dir")

    def _record(self) -> None:
        write_json(self.sweep_dir / STUDY_FILE, {
            "study_name": self.study.study_name, "storage": self.storage_setting or str(self.sweep_dir / JOURNAL),
            "n_trials": self.n_trials, **self._deciding(), "pruner": self.pruner_setting if self.prunes else None})

