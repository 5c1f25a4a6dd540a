"""Task metrics during SFT (the held-out eval rl uses, at sft.eval_steps) and the reward_search preset's pruning."""
import json
import logging
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg


def test_sft_scores_heldout_rows_at_its_eval_steps_and_keeps_best(base_overrides, tmp_path):
    """One tiny SFT step and its eval: one val record per task type decoded and scored by eval's code, the
    numbers in the step's log line, heldout_evals.jsonl, the summary and the curves; best/ kept."""
    from flare_exp.main import run

    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=1", "sft.logging_steps=1", "sft.eval_steps=1",
                       "sft.save_steps=10", "sft.max_eval_samples=2", "sft.eval_per_task=1",
                       "sft.eval_max_new_tokens=4", "sft.metric_for_best_model=report_generation.rouge_l",
                       "eval.radgraph=false"])
    out = tmp_path / "sft"
    summary = run(cfg, run_dir=out)
    val_types = {r["task_type"] for r in map(json.loads, open(cfg.sft.val_file)) if r.get("answer") is not None}
    subset = json.loads((out / "heldout_subset.json").read_text())
    assert len(subset) == len(val_types) == summary["heldout_records"] == 4  # one per task type of the val file
    history = json.loads((out / "log_history.json").read_text())
    line = next(h for h in history if h.get("step") == 1 and "heldout/eval_seconds" in h)
    assert "heldout/report_generation/rouge_l" in line and "heldout/classification/balanced_accuracy" in line
    evals = [json.loads(x) for x in (out / "heldout_evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1] and line["heldout/report_generation.rouge_l"] == evals[0]["value"]
    predictions = [json.loads(x) for x in (out / "heldout" / "step-1" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and predictions[0]["model"] == "sft step 1"
    assert summary["heldout_metric"] == "report_generation.rouge_l" and summary["best_step"] == 1
    meta = json.loads((out / "best" / "flare_exp_checkpoint.json").read_text())
    assert meta["step"] == 1 and meta["metric_value"] == summary["best_value"]
    assert (out / "best" / "adapter_config.json").exists() and (out / "sft_curves.png").exists()


def test_a_resume_drops_the_stopped_attempts_evals_of_later_steps(tmp_path, caplog):
    """Killed after its step-30 eval but before checkpoint-30 was whole, a run resumed from checkpoint-20 wrote
    step 30's eval again: heldout_evals.jsonl held [10, 20, 30, 30, 40] (sft and rl alike)."""
    from flare_exp.rl_monitor.heldout_watch import EVALS, HeldOutWatch

    lines = [json.dumps({"step": step, "value": step / 100}) for step in (10, 20, 30)] + ['{"step": 40, "val']
    (tmp_path / EVALS).write_text("\n".join(lines))
    watch = HeldOutWatch("sft", SimpleNamespace(metric_for_best_model="official_mean"), tmp_path, None, None)
    watch.on_train_begin(None, SimpleNamespace(global_step=20), None)
    assert (tmp_path / EVALS).read_text() == "\n".join(lines[:2]) + "\n"
    watch.on_train_begin(None, SimpleNamespace(global_step=20), None)  # nothing more to drop
    assert [json.loads(x)["step"] for x in (tmp_path / EVALS).read_text().splitlines()] == [10, 20]
    (tmp_path / EVALS).write_text("\n".join(lines[:2]) + '\n{"step": 30, "val')  # the resume step's own line torn
    with caplog.at_level("WARNING"):
        watch.on_train_begin(None, SimpleNamespace(global_step=30), None)
    assert "step 30's held-out eval was cut by the kill and is lost (the resume starts after it, at 30" in caplog.text


def test_sft_heldout_settings_are_named(base_overrides):
    from flare_exp.stages.sft import check_settings

    with pytest.raises(ValueError, match="sft.eval_per_task=4 .* sft.eval_steps=0"):
        check_settings(compose_cfg(["stage=sft", "sft.eval_per_task=4", "sft.eval_steps=0"]))
    with pytest.raises(ValueError, match="sft.metric_for_best_model='rouge_l'"):
        check_settings(compose_cfg(["stage=sft", "sft.metric_for_best_model=rouge_l"]))
    check_settings(compose_cfg(["stage=sft", "sft.eval_per_task=4", "sft.metric_for_best_model=regression.mean_absolute_error"]))


def _search(tmp_path, overrides):
    """The Optuna search a sweep would start, from the composed experiment (its study in tmp_path)."""
    from flare_exp.optuna_search import Search

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/sweeper=optuna", f"hydra.sweep.dir={tmp_path}", *overrides])
    settings = {k: v for k, v in OmegaConf.to_container(cfg.hydra.sweeper).items() if k != "_target_"}
    return Search(SimpleNamespace(settings=settings, launcher=None, config=cfg, hydra_context=None), [])


def test_the_reward_search_preset_prunes(tmp_path):
    """As shipped: one weighted objective of the maximised official metrics, the in-training eval on, and the
    pruner on the same number."""
    search = _search(tmp_path, ["experiment=reward_search", "data.root=/data/FLARE_Task5", "rl.init_from=/runs/sft"])
    assert search.prunes and search.directions == ["maximize"]
    rl = search.config.rl
    assert rl.eval_steps and 0 < rl.eval_per_task <= 16 and rl.metric_for_best_model == "official_mean"
    assert sorted(search.weights) == sorted(search.objectives)


def test_pruning_says_how_to_prune_several_objectives_and_refuses_a_reversed_metric(tmp_path, caplog):
    four = ("hydra.sweeper.objectives=[report_generation.green_score,classification.balanced_accuracy,"
            "multi_label.f1_score,regression.mae_parseable]")
    with caplog.at_level(logging.WARNING, logger="flare_exp.optuna_pruning"):
        search = _search(tmp_path / "a", ["experiment=reward_search", four, "hydra.sweeper.objective_weights=null"])
    assert not search.prunes
    assert "hydra.sweeper.objective_weights" in caplog.text and "green_score: 1, classification" in caplog.text
    with pytest.raises(ValueError, match="rl.metric_for_best_model=official_mean .* pruner would stop the best"):
        _search(tmp_path / "b", ["experiment=reward_search", "hydra.sweeper.objectives=[regression.mae_parseable]",
                                 "hydra.sweeper.objective_weights=null"])


def test_the_bench_reports_each_in_training_eval():
    from bench.run import summarise

    history = [{"step": i, "step_seconds": 1.0 + 9 * (i == 4)} for i in range(1, 7)]
    history[3].update({"heldout/eval_seconds": 8.5})
    history.insert(4, {"step": 4, "eval_loss": 1.0, "eval_runtime": 2.5})
    summary = summarise(history, 1)
    assert summary["heldout_eval_seconds"] == [8.5] and summary["eval_loss_seconds"] == [2.5]
    assert summary["step_seconds_median"] == 1.0 and "heldout_eval_seconds" not in summarise(history[:3], 1)


def test_a_resume_files_away_a_best_of_the_stopped_attempts_later_steps(tmp_path, caplog):
    """best/ of step 30, kept by an attempt stopped after it, and a resume from checkpoint-20: best/ stayed, its
    step-30 eval dropped from heldout_evals.jsonl, a later eval only as good never replaced it (sft and rl)."""
    from flare_exp.rl_monitor.heldout_watch import HeldOutWatch

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "flare_exp_checkpoint.json").write_text(json.dumps({"step": 30, "metric_value": 0.9}))
    section = SimpleNamespace(metric_for_best_model="official_mean")
    watch = HeldOutWatch("sft", section, tmp_path, None, None)
    assert watch.best == {"step": 30, "value": 0.9}
    with caplog.at_level("WARNING"):
        watch.on_train_begin(None, SimpleNamespace(global_step=20), None)
    assert watch.best is None and not (tmp_path / "best").exists()
    filed = next(tmp_path.glob("attempts/*/best/flare_exp_checkpoint.json"))  # moved whole, not deleted
    assert json.loads(filed.read_text())["step"] == 30
    assert "the best/ of the stopped attempt (step 30) filed away" in caplog.text
    (tmp_path / "best").mkdir()  # a best/ of a step up to the resume's is the run's own: kept
    (tmp_path / "best" / "flare_exp_checkpoint.json").write_text(json.dumps({"step": 10, "metric_value": 0.5}))
    kept = HeldOutWatch("sft", section, tmp_path, None, None)
    kept.on_train_begin(None, SimpleNamespace(global_step=20), None)
    assert kept.best == {"step": 10, "value": 0.5} and (tmp_path / "best").is_dir()
