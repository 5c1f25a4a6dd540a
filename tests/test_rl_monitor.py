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
    assert said == [("heldout", "reward rose by 0.4625 over steps 1-8 while held-out official_mean fell from 0.5 (step 1) to "
                    "0.3 (step 8)")]
    # an error metric falls when it grows
    assert findings(_history(RISING, heldout__m=[3, 0, 0, 0, 0, 0, 0, 2.0]), 8, 0.05, 0.5, "heldout/m",
                    higher_better=False) == []
    format_term = [0.1, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0]
    choice = [0.5, 0.5, 0.4, 0.4, 0.2, 0.1, 0.1, 0.0]
    said = findings(_history(RISING, reward_term__classification__format_flare=format_term,
                             reward_term__classification__choice=choice), 8, 0.05, 0.5, None)
    assert len(said) == 1 and said[0][0] == "saturated reward_term/classification/format_flare"
    assert "term classification/format_flare saturated at 1 from step 5 while classification/choice fell" in said[0][1]


def test_alarm_on_length_collapse_and_the_cap_but_only_while_the_reward_rises():
    lengths = [100, 100, 90, 80, 40, 30, 20, 20]
    said = findings(_history(RISING, completions__mean_length=lengths), 8, 0.05, 0.5, None)
    assert said[0][0] == "length collapse"
    assert "completion length collapsed from 92.5 tokens (first steps) to 27.5 (steps 5-8)" in said[0][1]
    capped = [0.0, 0.0, 0.2, 0.4, 0.75, 1.0, 1.0, 0.5]
    assert "most groups hit rl.max_completion_length in 3 of steps 5-8" in findings(
        _history(RISING, completions__groups_at_cap=capped), 8, 0.05, 0.5, None)[0][1]
    flat = [0.3, 0.32, 0.29, 0.31, 0.3, 0.28, 0.31, 0.3]  # noisy but not rising: a truncated policy, no hack
    assert findings(_history(flat, completions__mean_length=lengths, completions__groups_at_cap=capped), 8, 0.05,
                    0.5, None) == []
    assert findings(_history(RISING[:4]), 8, 0.05, 0.5, None) == []  # fewer steps than the window


def test_a_window_without_any_learning_signal_is_said():
    """Every group's completions earning one reward (a policy collapsed by a learning rate far too high, or a
    reward that cannot tell them apart) logged loss 0 and grad_norm 0 for the rest of the run, unsaid."""
    from flare_exp.rl_monitor.alarm import no_signal

    flat = [0.4] * 8
    said = no_signal(_history(flat, frac_reward_zero_std=[0.5, 0.5] + [1.0] * 6), 6)
    assert said and said[0][0] == "no_signal" and "logged step 3-8 (frac_reward_zero_std 1)" in said[0][1]
    assert "rl.learning_rate" in said[0][1] and "rl.temperature" in said[0][1]
    assert no_signal(_history(flat, frac_reward_zero_std=[1.0] * 7 + [0.75]), 6) == []  # one group told apart
    assert no_signal(_history(flat[:3], frac_reward_zero_std=[1.0] * 3), 6) == []  # fewer steps than the window


def test_a_run_the_alarm_stopped_says_so_in_its_summary_and_last_line(tmp_path):
    """rl.stop_on_alarm=true ended a run at the alarm's step, and its summary and last log line read as a run
    that trained its rl.max_steps: now both say where, of how many steps, and which alarm stopped it."""
    from types import SimpleNamespace

    from flare_exp.rl_monitor.callbacks import GRPOMonitor
    from flare_exp.rl_monitor.reward_summary import ending

    cfg = compose_cfg(["stage=rl", "rl.alarm_window=8", "rl.stop_on_alarm=true", "rl.max_steps=30"])
    monitor = GRPOMonitor(cfg, tmp_path, None, None, None, None)
    state = SimpleNamespace(global_step=8, log_history=_history(
        RISING, completions__mean_length=[100, 100, 90, 80, 40, 30, 20, 20]))
    assert monitor._alarm(state)
    early = monitor.rl_summary(30)["stopped_early"]
    assert early["step"] == 8 and early["max_steps"] == 30 and early["why"] == "the reward-hacking alarm (length collapse)"
    assert ending({"stopped_early": early}) == "stopped early at step 8 of 30 by the reward-hacking alarm (length collapse)"
    assert "completion length collapsed from 92.5 tokens" in early["findings"][0]
    assert "stopped_early" not in monitor.rl_summary(8)  # stopped at its last step: not early
    assert ending({}) == "finished"
    quiet = GRPOMonitor(compose_cfg(["stage=rl", "rl.alarm_window=8"]), tmp_path, None, None, None, None)
    assert not quiet._alarm(state) and "stopped_early" not in quiet.rl_summary(30)  # warned, not stopped


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
    from flare_exp.rl_monitor.callbacks import check_monitor_settings  # called by rl.check_settings

    with pytest.raises(ValueError, match="rl.metric_for_best_model='balanced_accuracy'"):
        check_monitor_settings(compose_cfg(["rl.metric_for_best_model=balanced_accuracy"]).rl)
    with pytest.raises(ValueError, match="rl.eval_steps=0"):
        check_monitor_settings(compose_cfg(["rl.optuna_trial=3", "rl.optuna_study=/x"]).rl)
    check_monitor_settings(compose_cfg(["rl.metric_for_best_model=classification.balanced_accuracy"]).rl)
    # a misspelt metric kept no best/ adapter and switched an Optuna search's pruning off, silently
    with pytest.raises(ValueError, match=r"rl.metric_for_best_model: 'multi_label.f1_scor': multi_label has no "
                                         r"metric 'f1_scor' \(did you mean multi_label.f1_score\?\)"):
        check_monitor_settings(compose_cfg(["rl.metric_for_best_model=multi_label.f1_scor"]).rl)
    from flare_exp.rl_monitor.heldout_watch import check_metric_spec

    with pytest.raises(ValueError, match="sft.metric_for_best_model: 'foo.bar' names no task 'foo'"):
        check_metric_spec("sft", "foo.bar")


def test_optuna_prunes_a_trailing_trial_and_the_study_report_shows_it(tmp_path):
    """A journal study with the median pruner: a trial whose in-training metric trails the finished ones at the
    same step is pruned through trial_pruner (as a trial's rl job calls it), told PRUNED from its rl_summary.json,
    and study.md lists it with the steps saved."""
    import optuna

    from flare_exp.io import write_json
    from flare_exp.reports.study import write_study_report
    from flare_exp.optuna_pruning import make_pruner, tell_pruned, trial_pruner
    from flare_exp.optuna_study import JOURNAL, STUDY_FILE, open_storage

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


def test_grpo_writes_rollouts_heldout_metrics_and_best(base_overrides, sft_adapter, tmp_path):
    """Two tiny GRPO steps: groups with every term in rollouts.jsonl / .html, the held-out subset decoded and
    scored at each step (eval's numbers in the log, the summary and the curves), best/ kept."""
    from flare_exp.main import run

    cfg = compose_cfg(["stage=rl", *base_overrides, f"rl.init_from={sft_adapter}", "rl.max_steps=2",
                       "rl.per_device_train_batch_size=4", "rl.num_generations=2", "rl.max_completion_length=8",
                       "rl.save_steps=10", "rl.log_rollouts_steps=1", "rl.eval_steps=1", "rl.eval_per_task=1",
                       "rl.metric_for_best_model=report_generation.rouge_l"])
    summary = run(cfg, run_dir=tmp_path / "rl")
    out = tmp_path / "rl"
    groups = read_rollouts(out / "rollouts.jsonl")
    assert {g["step"] for g in groups} == {1, 2} and all(len(g["completions"]) == 2 for g in groups)
    first = groups[0]
    assert first["images"] and first["reference"] and set(first["completions"][0]) == {
        "text", "terms", "total", "advantage", "length", "at_cap"}
    assert set(first["completions"][0]["terms"]) == set(first["weights"])  # every weighted term, raw
    assert "data:image/jpeg;base64," in (out / "rollouts.html").read_text()
    subset = json.loads((out / "heldout_subset.json").read_text())
    assert len(subset) == 4  # one per task type trained (the demo has all four)
    history = [h for h in json.loads((out / "log_history.json").read_text()) if "reward" in h]
    assert all("heldout/report_generation/rouge_l" in h and "heldout/classification/balanced_accuracy" in h
               for h in history)
    predictions = (out / "heldout" / "step-2" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4
    assert summary["heldout_metric"] == "report_generation.rouge_l" and summary["best_step"] in (1, 2)
    assert (out / "best" / "adapter_config.json").exists() and (out / "rl_curves.png").exists()
    meta = json.loads((out / "best" / "flare_exp_checkpoint.json").read_text())
    assert meta["step"] == summary["best_step"] and meta["metric_value"] == summary["best_value"]


@pytest.mark.slow  # a whole Optuna search through launch.py
def test_a_demo_search_prunes_a_trailing_trial_and_sweep_report_shows_it(session_dir, tmp_path,
                                                                        learned_sft_adapter):
    """Two trials one at a time over the learning rate (a grid, so the order is fixed: a small one first, then one
    that wrecks the learned tiny policy in one step), each evaluating its held-out subset after every step, no
    warmup: the median pruner stops the second, whose infer and eval never run, and the study report lists it with
    the steps saved."""
    import subprocess
    import sys

    from conftest import REPO

    run_name = "prune"
    args = ["-m", "hydra/sweeper=optuna", f"paths.cache_dir={session_dir / 'cache'}",  # trials in its process
            f"paths.output_root={tmp_path / 'out'}", "stage=pipeline", "stage.steps=[rl,infer,eval]",
            f"rl.init_from={learned_sft_adapter}", "rl.max_steps=2", "rl.warmup_ratio=0", "rl.max_completion_length=8", "rl.eval_steps=1",
            "rl.per_device_train_batch_size=4", "rl.num_generations=2",
            "rl.eval_per_task=3", "rl.eval_max_new_tokens=8", "rl.log_rollouts_steps=0",
            "rl.metric_for_best_model=report_generation.bleu_1", "infer.num_samples=8", "infer.max_new_tokens=8",
            "eval.radgraph=false", "rl.learning_rate=choice(0.0001,0.3)", "hydra.sweeper.sampler.name=grid",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "hydra.sweeper.objectives=[report_generation.bleu_1]",
            "hydra.sweeper.pruner.n_startup_trials=1", f"run_name={run_name}"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "out" / "sweeps" / run_name
    from flare_exp.main import run

    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}", f"paths.output_root={tmp_path / 'out'}",
                     f"paths.cache_dir={session_dir / 'cache'}"]), run_dir=tmp_path / "report_run")
    study = (sweep / "report" / "study.md").read_text()
    pruned = [d for d in sweep.iterdir() if (d / "rl" / "rl_summary.json").exists() and
              json.loads((d / "rl" / "rl_summary.json").read_text()).get("pruned_at_step")]
    assert pruned and not any((d / "eval").exists() for d in pruned), study
    assert "## Pruned trials" in study and "steps saved" in study and "rl.optuna_trial" not in study


@pytest.mark.slow  # two GRPO runs of 5 and up to 10 steps
def test_the_alarm_fires_on_a_gameable_reward_and_stays_quiet_on_the_default(base_overrides, sft_adapter, tmp_path):
    """Classification prompts on the tiny model. The gameable reward pays format_flare (a one-word answer in
    the reference's style, right or wrong) and almost nothing for the right letter: its reward rises while every
    completion is cut at the cap and the choice term stays at 'missing' -- the alarm fires and, with
    rl.stop_on_alarm, stops the run there. The default reward (choice only) stays flat: no alarm."""
    from flare_exp.main import run

    common = ["stage=rl", *base_overrides, f"rl.init_from={sft_adapter}", "rl.per_device_train_batch_size=8",
              "rl.num_generations=4", "rl.max_completion_length=8", "rl.learning_rate=5e-3", "rl.save_steps=100",
              "rl.log_rollouts_steps=0", "rl.task_types=[classification]", "rl.alarm_window=4"]
    gamed = run(compose_cfg([*common, "rl.max_steps=10", "rl.stop_on_alarm=true",
                             "+reward.classification.weights.format_flare=1.0",
                             "reward.classification.weights.choice=0.01"]), run_dir=tmp_path / "gamed")
    assert [a["kind"] for a in gamed["alarms"]] == ["length cap"]
    # its 4 completions per prompt earned one reward each step (all cut at the cap): said apart from the alarms
    assert "frac_reward_zero_std 1" in gamed["no_learning_signal"]["finding"]
    assert gamed["alarms"][0]["finding"].startswith("reward rose by") and gamed["global_step"] == gamed["alarms"][0]["step"] < 10
    assert json.loads((tmp_path / "gamed" / "alarms.json").read_text()) == gamed["alarms"]
    assert gamed["stopped_early"]["step"] == gamed["global_step"] and gamed["stopped_early"]["max_steps"] == 10
    default = run(compose_cfg([*common, "rl.max_steps=5"]), run_dir=tmp_path / "default")
    assert default["alarms"] == [] and not (tmp_path / "default" / "alarms.json").exists()


def test_a_heldout_eval_leaves_trainings_random_stream_as_it_was(monkeypatch):
    """Whatever the held-out eval draws (a judge's weights initialised before loading, a sampled decode), training
    goes on with the random state it had: the same stream as a run without evals."""
    import torch

    from flare_exp.rl_monitor.heldout import HeldOutEval

    monkeypatch.setattr(HeldOutEval, "_run", lambda self, model, step: (torch.nn.Linear(64, 64), {}, 0.0)[1:])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert HeldOutEval.__new__(HeldOutEval).run(None, 1) == ({}, 0.0)
    assert torch.equal(torch.rand(3), expected)


def test_rollout_thumbnails_show_the_picture_the_model_was_given(tmp_path):
    """A 16-bit X-ray is scaled by the record's window (not clipped to white), an EXIF-rotated photo is upright:
    the thumbnail is the stages' decoding of the file, as the model saw it."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from flare_exp.data.decoding import decode_image
    from flare_exp.rl_monitor.rollouts_html import thumbnail

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "x16.png")
    photo = Image.new("RGB", (60, 20), "black")
    photo.paste((255, 255, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    photo.save(tmp_path / "turned.jpg", exif=exif)

    def shown(uri: str) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L")

    x16 = np.asarray(shown(thumbnail(tmp_path / "x16.png", (0, 4095))), dtype=float)
    assert 100 < x16.mean() < 155 and x16.std() > 40  # a ramp over the window, not all white
    expected = np.asarray(decode_image(tmp_path / "x16.png", (0, 4095)).convert("L"), dtype=float)
    assert abs(x16.mean() - expected.mean()) < 3
    turned = shown(thumbnail(tmp_path / "turned.jpg"))
    assert turned.size[1] > turned.size[0]  # upright: taller than wide, as decoded
    assert thumbnail(tmp_path / "missing.png") == ""


def test_a_rollout_journal_torn_by_a_kill_is_mended_before_the_resume_appends(tmp_path, caplog):
    """The kill cut the last group's line (or only its newline): the resumed run's first append starts a line of
    its own; every line parses, none is lost but the torn one."""
    entry = {"step": 1, "id": "r1", "dataset": "d", "task_type": "regression", "images": [], "reference": "4",
             "completions": []}
    for n, tail in enumerate(('{"step": 2, "id": "r2", "data', "")):
        journal = tmp_path / f"run{n}" / "rollouts.jsonl"
        journal.parent.mkdir()
        journal.write_text(json.dumps(entry) + ("\n" + tail if tail else ""))  # torn line / no final newline
        rollouts = RolloutLog(journal.parent, 1, 2, 1.0, tmp_path)
        rollouts.append([{**entry, "step": 10}])
        steps = [json.loads(line)["step"] for line in journal.read_text().splitlines()]
        assert steps == [1, 10]
    assert "dropping a torn last line" in caplog.text


def test_a_step_whose_groups_the_kill_tore_is_written_whole_by_the_resume(tmp_path, caplog):
    """A step's groups are one append: the kill tore its second group's line, the mend kept the first, and the
    resumed run, redoing that step, skipped it as written: the torn group was lost for good. Now a resume that
    redoes the step drops its lines and the redone step writes all its groups; an earlier whole step stays. A
    resume that starts after the torn step keeps its other groups (dropping them lost the step, said as rewritten)
    and says one was cut."""
    entry = {"step": 1, "id": "r1", "dataset": "d", "task_type": "regression", "images": [], "reference": "4",
             "completions": []}
    journal = tmp_path / "rollouts.jsonl"
    lines = [json.dumps({**entry, "id": f"r{i}"}) for i in range(2)] + [json.dumps({**entry, "step": 5})]
    torn = "\n".join(lines) + "\n" + json.dumps({**entry, "step": 5, "id": "r9"})[:40]
    journal.write_text(torn)
    rollouts = RolloutLog(tmp_path, 1, 2, 1.0, tmp_path)
    rollouts.continue_from(4)  # the resume's checkpoint: step 4
    assert rollouts.steps_written == {1}
    rollouts.append([{**entry, "step": 5, "id": "a"}, {**entry, "step": 5, "id": "b"}])
    assert [(r["step"], r["id"]) for r in map(json.loads, journal.read_text().splitlines())] == [
        (1, "r0"), (1, "r1"), (5, "a"), (5, "b")]
    journal.write_text(torn)
    rollouts = RolloutLog(tmp_path, 1, 2, 1.0, tmp_path)
    rollouts.continue_from(6)  # a checkpoint after the torn step: it is not redone
    assert [(r["step"], r["id"]) for r in map(json.loads, journal.read_text().splitlines())] == [
        (1, "r0"), (1, "r1"), (5, "r1")]
    assert "step 5's last group was cut by the kill; the resume starts after that step (at 6)" in caplog.text
    journal.write_text(json.dumps(entry) + "\n" + '{"st')  # cut before its step: the whole steps stay
    assert RolloutLog(tmp_path, 1, 2, 1.0, tmp_path).steps_written == {1}


def test_a_reward_term_with_steps_missing_is_drawn_as_dots_not_a_line_across_the_gap(tmp_path, monkeypatch):
    """A term whose task had no prompt at some logged steps was drawn as a straight line between the steps it
    had (1 -> 6 -> 9), which reads as measured data in between: the line breaks at the gaps, each step a dot."""
    import math

    from flare_exp import plotting
    from flare_exp.rl_monitor.heldout_watch import write_curves

    drawn = []
    monkeypatch.setattr(plotting, "save_png", lambda fig, path: drawn.append(fig))
    history = [{"step": s, "reward": 0.1 * s, "reward_term/a/x": 0.5,
                **({"reward_term/b/y": 1.0} if s in (1, 6, 9) else {})} for s in range(1, 13)]
    write_curves(history, ["reward", "reward_term/a/x", "reward_term/b/y"], "eval/m", tmp_path / "c.png", "t", "off")
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    sparse = lines["b/y"]
    assert len(sparse.get_xdata()) == 12 and sum(math.isnan(v) for v in sparse.get_ydata()) == 9
    assert sparse.get_marker() == "o" and lines["a/x"].get_marker() in ("None", "", None)
