"""Reward weights searched by Optuna through Hydra's launcher: each trial runs rl -> infer -> eval on the demo
and returns its eval metrics; the study is persisted, resumes after a kill, and sweep_report reads it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, compose_cfg
from flare_exp.main import run
from flare_exp.optuna_study import direction_of, objective_value

pytestmark = pytest.mark.slow  # subprocess launches of whole sweeps / several ranks

FAKE_SLURM = REPO / "tests" / "fake_slurm"


def _trial_args(session_dir, tmp_path, sft_adapter, run_name):
    return ["-m", "hydra/sweeper=optuna", f"paths.cache_dir={session_dir / 'cache'}",
            f"paths.output_root={tmp_path / 'out'}", "stage=pipeline", "stage.steps=[rl,infer,eval]",
            f"rl.init_from={sft_adapter}", "rl.max_steps=1", "rl.max_completion_length=8", "infer.num_samples=6",
            "rl.per_device_train_batch_size=4", "rl.num_generations=2",  # the mechanics: not the demo's rl budget
            "infer.max_new_tokens=8", "eval.radgraph=false", f"run_name={run_name}"]


def _env(extra=None):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(extra or {})}


def _study(sweep):
    import optuna

    from flare_exp.reports.study import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_study(sweep)[0]


def _states(sweep):
    if not (sweep / "optuna_study.json").exists():
        return []
    return [t.state.name for t in _study(sweep).get_trials(deepcopy=False)]


def test_objectives_and_directions():
    assert direction_of("regression.mean_absolute_error") == "minimize"
    assert direction_of("multi_label.f1_score") == "maximize"
    metrics = {"official": {"multi_label": {"f1_score": 0.5}}, "by_task": {"report_generation": {"rouge_l": 0.2}}}
    assert objective_value(metrics, "multi_label.f1_score") == 0.5
    assert objective_value(metrics, "report_generation.rouge_l") == 0.2
    assert objective_value(metrics, "classification.balanced_accuracy") is None


def test_a_killed_study_continues_to_its_n_trials(session_dir, tmp_path, sft_adapter):
    """4 trials, 2 at a time, one objective over two reward weights: killed while its second batch runs, the
    same command continues the study; the first batch is not redone and the interrupted trials are retried."""
    args = [*_trial_args(session_dir, tmp_path, sft_adapter, "search"), "hydra/launcher=local",
            "reward.multi_label.weights.label_f1=interval(0.1,1.0)",
            "reward.report_generation.weights.rouge_l=interval(0.0,0.5)", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.objectives=[report_generation.rouge_l]"]
    sweep = tmp_path / "out" / "sweeps" / "search"
    first = subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while _states(sweep).count("RUNNING") < 2 or _states(sweep).count("COMPLETE") < 2:
        assert time.time() < deadline and first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.3)
    os.killpg(first.pid, signal.SIGKILL)  # the sweeper and its running trials, as a node failure would
    first.wait()
    done_before = {n: (sweep / str(n) / "DONE").stat().st_mtime for n in (0, 1)}
    again = subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(sweep).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(complete) == 4 and [t.number for t in interrupted] == [2, 3]
    assert {t.user_attrs.get("retry_of") for t in complete} >= {2, 3}  # their settings were tried again
    assert {n: (sweep / str(n) / "DONE").stat().st_mtime for n in (0, 1)} == done_before
    assert all(isinstance(t.values[0], float) for t in complete)
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}", f"paths.output_root={tmp_path / 'out'}",
                     f"paths.cache_dir={session_dir / 'cache'}"]), run_dir=tmp_path / "report_run")
    text = (sweep / "report" / "study.md").read_text()
    assert "## Best trial" in text and "rerun alone: `python launch.py " in text and "interrupted, retried" in text
    assert (sweep / "report" / "study.png").stat().st_size > 5000


def test_two_objectives_give_a_pareto_front_and_a_failing_trial_does_not_stop_the_study(session_dir, tmp_path,
                                                                                        sft_adapter):
    """A grid over rl.num_generations, both trials in one batch: num_generations=3 does not divide the batch, so
    that trial fails unlaunched (the settings checks; its FAILED marker says why), the other completes, and the
    search ends non-zero naming the failed trial."""
    from flare_exp.reports.study import best_trials, write_study_report

    sweep = tmp_path / "out" / "sweeps" / "pareto"
    proc = subprocess.run([sys.executable, "launch.py", *_trial_args(session_dir, tmp_path, sft_adapter, "pareto"),
                           "hydra/launcher=local", "rl.num_generations=choice(2,3)", "hydra.sweeper.n_trials=2",
                           "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.name=grid",
                           "hydra.sweeper.objectives=[report_generation.rouge_l,report_generation.bleu_1]"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "1 of 2 trial(s) failed" in proc.stderr, proc.stderr[-3000:]
    study = _study(sweep)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(trials) == 2 and len(failed) == 1
    assert all(t.params["rl.num_generations"] == 3 and "not divisible" in t.user_attrs["failure"] for t in failed)
    assert all((sweep / str(t.number) / "FAILED").exists() for t in failed)
    assert len(study.directions) == 2 and best_trials(study)
    summary = write_study_report(sweep, sweep / "report")
    assert summary["best_trials"] and "(the Pareto front)" in (sweep / "report" / "study.md").read_text()
    # the same sweep again with another objective: its finished trial would be ranked under the new name
    record = sorted(p.name for p in sweep.iterdir())
    again = subprocess.run([sys.executable, "launch.py", *_trial_args(session_dir, tmp_path, sft_adapter, "pareto"),
                            "hydra/launcher=local", "rl.num_generations=choice(2,3)", "hydra.sweeper.n_trials=2",
                            "hydra.sweeper.sampler.name=grid", "hydra.sweeper.objectives=[report_generation.bleu_1]"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "has 1 finished trial(s) made with other settings (objectives: ['report_generation.rouge_l', " \
           "'report_generation.bleu_1'] -> ['report_generation.bleu_1']" in again.stderr
    assert "run_name=<another name>" in again.stderr and sorted(p.name for p in sweep.iterdir()) == record
    assert len(_study(sweep).get_trials(deepcopy=False)) == 2


def test_a_batch_of_trials_through_the_stand_in_slurm(session_dir, tmp_path, sft_adapter):
    state = tmp_path / "slurm"
    env = _env({"PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)})
    proc = subprocess.run([sys.executable, "launch.py", *_trial_args(session_dir, tmp_path, sft_adapter, "slurm"),
                           "hydra/launcher=slurm", "hydra.launcher.array_parallelism=2",
                           "reward.multi_label.weights.label_f1=interval(0.1,1.0)", "hydra.sweeper.n_trials=2",
                           "hydra.sweeper.n_jobs=2", "hydra.sweeper.objectives=[report_generation.rouge_l]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --array=0-1%2" in (state / "1000.sbatch").read_text()  # one array for the batch
    assert _states(tmp_path / "out" / "sweeps" / "slurm") == ["COMPLETE", "COMPLETE"]
    info = json.loads((tmp_path / "out" / "sweeps" / "slurm" / "optuna_study.json").read_text())
    assert info["storage"].endswith("optuna.journal") and info["directions"] == ["maximize"]


@pytest.mark.parametrize("setting, message", [
    ("hydra.sweeper.objectives=[rouge]", "is not '<task>.<metric>'"),
    ("hydra.sweeper.sampler.name=bayes", "choose tpe, random, nsga2, grid"),
])
def test_bad_sweeper_settings_are_named(session_dir, tmp_path, sft_adapter, setting, message):
    proc = subprocess.run([sys.executable, "launch.py", *_trial_args(session_dir, tmp_path, sft_adapter, "bad"),
                           "hydra/launcher=local", "reward.multi_label.weights.label_f1=interval(0.1,1.0)", setting],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr


def test_a_changed_search_range_is_named_as_the_override_that_makes_it():
    """The refusal of a study whose range changed dumped Optuna's distribution dicts; it names the key and both
    overrides."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, distribution_to_json

    from flare_exp.optuna_search import _change

    def recorded(**space):
        return {k: json.loads(distribution_to_json(d)) for k, d in space.items()}

    before = recorded(w=FloatDistribution(0.0, 2.0), c=CategoricalDistribution(["a", "b"]))
    now = recorded(w=FloatDistribution(0.0, 3.0, log=False), c=CategoricalDistribution(["a", "b"]),
                   v=FloatDistribution(0.1, 1.0, log=True))
    assert _change("distributions", before, now) == ("v: (not searched) -> interval(0.1,1.0) [log]; "
                                                     "w: interval(0.0,2.0) -> interval(0.0,3.0)")
