"""The Optuna study survives a crash and has one writer: a torn journal tail, a second search, a live trial."""
import subprocess
import sys

import pytest

from flare_exp.optuna_search import SEARCH, recover_interrupted, search_lock
from flare_exp.optuna_study import open_storage
from flare_exp.run.lock import RunLockedError


def _study(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name="s", storage=open_storage(None, tmp_path), load_if_exists=True)


def test_a_torn_journal_tail_is_cut_before_the_study_goes_on(tmp_path, caplog):
    _study(tmp_path).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    journal = tmp_path / "optuna.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + '{"op_code": 5, "worker_id": "é'.encode()[:-1])  # killed mid-append
    _study(tmp_path).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert "ends in a torn line" in caplog.text
    trials = _study(tmp_path).get_trials()  # readable by every later rerun and by sweep_report
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert journal.read_bytes().startswith(whole)


def test_one_search_per_study(tmp_path):
    with search_lock(None, tmp_path):
        with pytest.raises(RunLockedError, match=r"in use by another run: host \S+, pid \d+"):
            search_lock(None, tmp_path).acquire()
        with pytest.raises(RunLockedError):  # the same journal named as storage: the same study
            search_lock(str(tmp_path / "optuna.journal"), tmp_path / "elsewhere").acquire()
    search_lock(None, tmp_path).acquire().release()  # free again once the first search ended


def test_a_live_trial_is_not_marked_interrupted(tmp_path):
    import platform

    study = _study(tmp_path)
    live, killed = study.ask(), study.ask()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        live.set_user_attr(SEARCH, {"host": platform.node(), "pid": sleeper.pid})
        killed.set_user_attr(SEARCH, {"host": platform.node(), "pid": gone.pid})
        assert recover_interrupted(study) == 1
        states = {t.number: (t.state.name, t.user_attrs.get("interrupted")) for t in study.get_trials()}
        assert states[live.number] == ("RUNNING", None) and states[killed.number] == ("FAIL", True)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_misspelt_objective_is_refused_before_any_trial_with_the_names_it_could_be():
    """multi_label.f1 ran every trial's rl, infer and eval in full, then failed it: now refused up front, naming
    the task's metrics (the report metrics depend on the scorers configured: any name passes there)."""
    from flare_exp.optuna_study import check_objective, objective_problems

    for fine in ("multi_label.f1_score", "regression.mean_absolute_error", "classification.macro_f1",
                 "multi_label.dataset_aware_f1_micro", "report_generation.anything"):
        check_objective(fine)
    said = [str(p) for p in objective_problems(["multi_label.f1", "multilabel.f1_score", "classification.acc",
                                                "classification.balanced_accuracy"])]
    assert said == [
        "hydra.sweeper.objectives: 'multi_label.f1': multi_label has no metric 'f1'; its metrics: "
        "dataset_aware_f1_example, dataset_aware_f1_micro, dataset_aware_precision_micro, dataset_aware_recall_micro, "
        "f1_score, precision_micro, recall_micro",
        "hydra.sweeper.objectives: 'multilabel.f1_score' names no task 'multilabel' (did you mean "
        "multi_label.f1_score?)",
        "hydra.sweeper.objectives: 'classification.acc': classification has no metric 'acc'; its metrics: accuracy, "
        "balanced_accuracy, balanced_accuracy_parsed, macro_f1"]
    assert objective_problems(None) == []


def test_an_empty_a_bracketless_and_a_judgeless_objective_list_are_said():
    from flare_exp.optuna_study import objective_list, objective_problems

    assert objective_list("multi_label.f1_score") == ["multi_label.f1_score"]  # not one per character
    assert objective_problems("multi_label.f1_score") == []
    assert [str(p) for p in objective_problems([])] == [
        "hydra.sweeper.objectives is empty: name at least one '<task>.<metric>' of eval's metrics.json, e.g. "
        "[multi_label.f1_score]"]
    assert "needs the GREEN judge: set eval.green.model_path" in str(
        objective_problems(["report_generation.green_score"], green_judge=False)[0])
    assert objective_problems(["report_generation.green_score"], green_judge=True) == []


def test_every_sweeper_setting_is_named_before_any_trial():
    """A misspelt sampler, pruner (accepted silently where pruning was off), objective weight or trial count is one
    line each, with its key, before Hydra starts the sweep (they failed in it with a traceback)."""
    from omegaconf import OmegaConf

    from flare_exp.optuna_settings import sweeper_problems

    good = {"_target_": "hydra_plugins.flare_exp_optuna.optuna_sweeper.OptunaSweeper", "n_trials": 4, "n_jobs": 2,
            "objectives": ["multi_label.f1_score", "regression.mean_absolute_error"],
            "objective_weights": None, "sampler": {"name": "tpe", "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 2}}
    assert sweeper_problems(OmegaConf.create(good), True) == []
    bad = OmegaConf.create({**good, "n_trials": 0, "n_jobs": 1.5, "sampler": {"name": "bayes", "seed": -2},
                            "pruner": {"name": "medain"},
                            "objective_weights": {"multi_label.f1": 1, "regression.mean_absolute_error": "x"}})
    said = [str(p) for p in sweeper_problems(bad, True)]
    assert said == ["hydra.sweeper.n_trials=0: must be an integer >= 1",
                    "hydra.sweeper.n_jobs=1.5: must be an integer >= 1",
                    "hydra.sweeper.objective_weights names 'multi_label.f1', not one of hydra.sweeper.objectives "
                    "(multi_label.f1_score, regression.mean_absolute_error): did you mean multi_label.f1_score?",
                    "hydra.sweeper.objective_weights.regression.mean_absolute_error='x': must be a number > 0 (an "
                    "objective without weight goes out of hydra.sweeper.objectives)",
                    "hydra.sweeper.sampler.name='bayes': choose tpe, random, nsga2, grid",
                    "hydra.sweeper.sampler.seed=-2: must be an integer from 0 to 2**32 - 1, or null",
                    "hydra.sweeper.pruner.name='medain': choose median, percentile, successive_halving, hyperband, "
                    "threshold, none"]
    mixed = OmegaConf.create({**good, "objective_weights": {"multi_label.f1_score": 1,
                                                            "regression.mean_absolute_error": 1}})
    assert "mixes metrics to maximise and to minimise" in str(sweeper_problems(mixed, True)[0])
    zero = OmegaConf.create({**good, "objective_weights": {"multi_label.f1_score": 0,
                                                           "regression.mean_absolute_error": 0}})
    assert "multi_label.f1_score=0: must be a number > 0" in str(sweeper_problems(zero, True)[0])
    twice = OmegaConf.create({**good, "objectives": ["multi_label.f1_score", "multi_label.f1_score"]})
    assert "names multi_label.f1_score more than once" in str(sweeper_problems(twice, True)[0])
    from flare_exp.optuna_pruning import make_pruner

    assert type(make_pruner({"name": "none", "n_startup_trials": 2})).__name__ == "NopPruner"  # median's leftovers
    partial = OmegaConf.create({**good, "objective_weights": {"multi_label.f1_score": 1}})
    assert "gives no weight to regression.mean_absolute_error" in str(sweeper_problems(partial, True)[0])
    args = OmegaConf.create({**good, "pruner": {"name": "hyperband", "bogus": 1}})
    assert "hydra.sweeper.pruner: hyperband takes no bogus (it takes min_resource" in str(
        sweeper_problems(args, True)[0])
    switched = OmegaConf.create({**good, "pruner": {"name": "hyperband", "n_startup_trials": 2}})
    assert "~hydra.sweeper.pruner.n_startup_trials" in str(sweeper_problems(switched, True)[0])
    basic = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"})
    assert sweeper_problems(basic, True) == []


def test_a_sweep_value_optuna_refuses_is_named_with_its_key():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from flare_exp.optuna_search import search_space

    parse = OverridesParser.create().parse_overrides
    for override, said in (("a.b=interval(1,0)", r"a.b=interval\(1, ?0\): .*low"),
                           ("a.b=tag(log,interval(0,1))", r"a.b=.*: .*log"),
                           ("a.b=range(3,1)", "a.b=.*: an empty range")):
        with pytest.raises(ValueError, match=said):
            search_space(parse([override]))
    space, fixed = search_space(parse(["a.b=interval(0,1)", "c=2"]))
    assert list(space) == ["a.b"] and fixed == ["c=2"]


def test_a_search_report_ranks_by_its_objective_and_says_which_dirs_were_retried(tmp_path):
    """A killed search's rerun retries the trials it left running under new numbers: their old dirs were listed
    as 'unfinished' (which the same command resumes: not these) and study.md counted them as failed; and the
    search's report ranked by the first official metric rather than the objective it optimised. The runs listing
    says so too."""
    import json

    import optuna

    from flare_exp.catalog import listing

    from flare_exp.io import write_json
    from flare_exp.optuna_study import JOURNAL, STUDY_FILE
    from flare_exp.reports.sweep import write_sweep_report

    sweep = tmp_path / "out" / "sweeps" / "sweep"
    study = _study(sweep)
    first = study.ask()
    study.tell(first, 0.5)
    killed = study.ask()
    study._storage.set_trial_user_attr(killed._trial_id, "interrupted", True)
    study.tell(killed, state=optuna.trial.TrialState.FAIL)
    retry = study.ask()
    study.tell(retry, 0.7)
    write_json(sweep / STUDY_FILE, {"study_name": "s", "storage": str(sweep / JOURNAL), "n_trials": 3,
                                    "objectives": ["multi_label.f1_score"], "directions": ["maximize"]})
    # f1 ranks trial 2 first, balanced accuracy (the first official metric by name) trial 0
    for number, f1, accuracy in ((0, 0.5, 0.9), (1, None, None), (2, 0.7, 0.1)):
        job = sweep / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- reward.x.weights.y={number}\n")
        if f1 is not None:
            (job / "metrics.json").write_text(json.dumps({"m": {"official": {
                "multi_label": {"f1_score": f1}, "classification": {"balanced_accuracy": accuracy}}}}))
            (job / "DONE").write_text("")
        (job / "run_info.json").write_text(json.dumps({"started": "2026-12-07T01:00:00"}))
    statuses = {row[0]: row[2] for row in listing(tmp_path / "out")[1]}
    assert statuses == {"sweeps/sweep/0": "DONE", "sweeps/sweep/2": "DONE", "sweeps/sweep/1":
                        "interrupted (retried): the search's rerun tried it again as a new trial"}, statuses
    summary = write_sweep_report(sweep, None)
    text = (sweep / "report" / "sweep.md").read_text()
    assert "Ranked by official/multi_label/f1_score (highest first; the search's objective" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # the header left out
    assert rows[0].startswith("| 1 | 2 |") and "interrupted (retried)" in rows[-1], rows
    assert summary["unfinished"] == 0 and summary["interrupted (retried)"] == 1
    headline = (sweep / "report" / "study.md").read_text().splitlines()[2]
    assert headline.endswith("3 trials, 2 complete, 0 failed, 1 interrupted (retried), 0 pruned.")
    by_accuracy = write_sweep_report(sweep, "official/classification/balanced_accuracy")  # chosen: as asked
    assert by_accuracy and "sweep_report.rank_by chooses)" in (sweep / "report" / "sweep.md").read_text()
