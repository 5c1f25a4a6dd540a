"""Watching GRPO: readable rollouts, held-out task metrics during training, the reward-hacking alarm and
Optuna's pruning on the in-training metric."""
import json

import pytest

from conftest import compose_cfg
from flare_exp.rl_monitor.alarm import findings
from flare_exp.rl_monitor.heldout import monitored_value, stratified_subset
from flare_exp.rl_monitor.rollouts import RolloutLog, group_entries, read_rollouts


def _history(rewards, **series):
    return [{"step": i + 1, "reward": r, **{k.replace("__", "/"): v[i] for k, v in series.items() if v[i] is not None}}
            for i, r in enumerate(rewards)]


RISING = [0.0, 0.05, 0.1, 0.2, 0.4, 0.5, 0.6, 0.7]


def test_alarm_names_the_heldout_metric_the_term_and_the_steps():
    metric = [0.5, None, None, 0.45, None, None, None, 0.3]
    said = findings(_history(RISING, heldout__official_mean=metric), 8, 0.05, 0.5, "heldout/official_mean")
    assert said == ["reward rose by 0.4625 over steps 1-8 while held-out official_mean fell from 0.5 (step 1) to "
                    "0.3 (step 8)"]
    # an error metric falls when it grows
    assert findings(_history(RISING, heldout__m=[3, 0, 0, 0, 0, 0, 0, 2.0]), 8, 0.05, 0.5, "heldout/m",
                    higher_better=False) == []
    format_term = [0.1, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0]
    choice = [0.5, 0.5, 0.4, 0.4, 0.2, 0.1, 0.1, 0.0]
    said = findings(_history(RISING, reward_term__classification__format_flare=format_term,
                             reward_term__classification__choice=choice), 8, 0.05, 0.5, None)
    assert len(said) == 1 and "term classification/format_flare saturated at 1 from step 5 while " \
                              "classification/choice fell" in said[0]


def test_alarm_on_length_collapse_and_the_cap_but_only_while_the_reward_rises():
    lengths = [100, 100, 90, 80, 40, 30, 20, 20]
    said = findings(_history(RISING, completions__mean_length=lengths), 8, 0.05, 0.5, None)
    assert said and "completion length collapsed from 92.5 tokens (first steps) to 27.5 (steps 5-8)" in said[0]
    capped = [0.0, 0.0, 0.2, 0.4, 0.75, 1.0, 1.0, 0.5]
    assert "most groups hit rl.max_completion_length in 3 of steps 5-8" in findings(
        _history(RISING, completions__groups_at_cap=capped), 8, 0.05, 0.5, None)[0]
    flat = [0.3, 0.32, 0.29, 0.31, 0.3, 0.28, 0.31, 0.3]  # noisy but not rising: a truncated policy, no hack
    assert findings(_history(flat, completions__mean_length=lengths, completions__groups_at_cap=capped), 8, 0.05,
                    0.5, None) == []
    assert findings(_history(RISING[:4]), 8, 0.05, 0.5, None) == []  # fewer steps than the window


def test_the_heldout_subset_is_stratified_and_fixed():
    records = [{"id": f"{d}-{i}", "dataset": d, "task_type": t, "answer": "x"}
               for t, ds in (("classification", ("a", "b")), ("regression", ("c",))) for d in ds for i in range(5)]
    picked = stratified_subset(records, ["classification", "regression"], 4)
    assert [r["task_type"] for r in picked].count("classification") == 4
    assert {r["dataset"] for r in picked if r["task_type"] == "classification"} == {"a", "b"}
    assert {r["id"] for r in stratified_subset(records[::-1], ["classification", "regression"], 4)} == \
        {r["id"] for r in picked}  # the file's order does not decide
    result = {"official": {"classification": {"balanced_accuracy": 0.5}, "multi_label": {"f1_score": 0.3},
                           "regression": {"mean_absolute_error": 9.0}, "report_generation": {"green_score": None}},
              "by_task": {"report_generation": {"rouge_l": 0.2}}}
    assert monitored_value(result, "official_mean") == pytest.approx(0.4)
    assert monitored_value(result, "report_generation.rouge_l") == 0.2


def test_rollouts_html_shows_thumbnails_terms_and_filters(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), "white").save(tmp_path / "x.png")
    rows = [{"id": i, "task_type": t, "dataset": "d", "answer": "A", "image_paths": ["x.png"]}
            for i, t in (("r1", "classification"), ("r1", "classification"), ("r2", "regression"),
                         ("r2", "regression"), ("r3", "classification"), ("r3", "classification"))]
    samples = [{"text": f"answer <{i}>", "terms": {"choice": i / 5}, "total": i / 5} for i in range(6)]
    entries = group_entries(3, rows, samples, [0.1] * 6, [4, 8, 8, 8, 2, 3], 8, {"classification": {"choice": 1}}, 2)
    assert [e["id"] for e in entries] == ["r1", "r2"]  # one group per task type first
    assert entries[0]["completions"][1] == {"text": "answer <1>", "terms": {"choice": 0.2}, "total": 0.2,
                                            "advantage": 0.1, "length": 8, "at_cap": True}
    rollouts = RolloutLog(tmp_path, 1, 2, 1.0, tmp_path)
    rollouts.append(entries)
    rollouts.append(entries)  # the same step again (a resumed run): kept once
    assert len(read_rollouts(tmp_path / "rollouts.jsonl")) == 2
    page = (tmp_path / "rollouts.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 and "answer &lt;1&gt;" in page
    assert '<option value="regression">' in page and 'data-step="3"' in page and "hsl(" in page
    small = RolloutLog(tmp_path / "small", 1, 2, 0.0001, tmp_path)
    (tmp_path / "small").mkdir()
    small.append(entries)  # over the size bound: nothing written, said once
    assert not (tmp_path / "small" / "rollouts.jsonl").exists() and small.full_said


def test_bad_monitor_settings_are_named():
    from flare_exp.stages.rl import check_settings

    with pytest.raises(ValueError, match="rl.metric_for_best_model='balanced_accuracy'"):
        check_settings(compose_cfg(["rl.metric_for_best_model=balanced_accuracy"]))
    with pytest.raises(ValueError, match="rl.eval_steps=0"):
        check_settings(compose_cfg(["rl.optuna_trial=3", "rl.optuna_study=/x"]))


def test_optuna_prunes_a_trailing_trial_and_the_study_report_shows_it(tmp_path):
    """A journal study with the median pruner: a trial whose in-training metric trails the finished ones at the
    same step is pruned through trial_pruner (as a trial's rl job calls it), told PRUNED from its rl_summary.json,
    and study.md lists it with the steps saved."""
    import optuna

    from flare_exp.io import write_json
    from flare_exp.optuna_report import write_study_report
    from flare_exp.optuna_search import JOURNAL, STUDY_FILE, make_pruner, open_storage, tell_pruned, trial_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setting = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}
    study = optuna.create_study(study_name="s", storage=open_storage(None, tmp_path), direction="maximize",
                                pruner=make_pruner(setting))
    write_json(tmp_path / STUDY_FILE, {"study_name": "s", "storage": str(tmp_path / JOURNAL), "objectives": ["m"],
                                       "directions": ["maximize"], "pruner": setting})
    for value in (0.5, 0.7):
        trial = study.ask({"w": optuna.distributions.FloatDistribution(0, 1)})
        assert not trial_pruner(tmp_path / STUDY_FILE, trial.number)(10, value)
        study.tell(trial, value)
    losing = study.ask({"w": optuna.distributions.FloatDistribution(0, 1)})
    report = trial_pruner(tmp_path / STUDY_FILE, losing.number)
    assert report(10, 0.2)  # below the median of the finished trials at step 10
    job = tmp_path / str(losing.number)
    write_json(job / "rl" / "rl_summary.json", {"pruned_at_step": 10, "steps_saved": 90})
    assert tell_pruned(study, losing, job)
    summary = write_study_report(tmp_path, tmp_path / "report")
    assert summary["pruned_trials"] == 1 and summary["steps_saved"] == 90
    text = (tmp_path / "report" / "study.md").read_text()
    assert "1 pruned" in text and "## Pruned trials (1; 90 training steps saved)" in text
    assert "pruned at step 10 (in-training metric 0.2), 90 steps saved" in text
    with pytest.raises(ValueError, match="hydra.sweeper.pruner.name='mediam'"):
        make_pruner({"name": "mediam"})
