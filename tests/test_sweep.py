"""Reward-weight sweeps through Hydra multirun + submitit: SLURM through stand-in commands, the sweep report (the
README's grid sweep and its report: tests/test_readme.py; the local launcher: test_optuna.py, test_sweep_loud.py)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from flare_exp.models.checkpoints import COMPLETE

import pytest

pytestmark = pytest.mark.slow  # subprocess launches of whole sweeps / several ranks

FAKE_SLURM = Path(__file__).parent / "fake_slurm"


def _launch(args, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _rl_args(session_dir, tmp_path, sft_adapter):
    return [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}", "stage=rl",
            f"rl.init_from={sft_adapter}", "rl.max_steps=1", "rl.max_completion_length=8", "run_name=sweep",
            "rl.per_device_train_batch_size=4", "rl.num_generations=2"]  # the mechanics: not the demo's rl budget


def test_a_slurm_sweep_with_a_refused_job_submits_nothing(session_dir, tmp_path, sft_adapter):
    """sbatch/srun/sacct/scancel stand-ins on PATH: a sweep with a job whose setting the stage refuses
    (rl.num_generations=3) submits nothing (a sweep that runs through them: tests/test_readme.py)."""
    state = tmp_path / "slurm"
    env = {"PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    refused = _launch(["-m", *_rl_args(session_dir, tmp_path, sft_adapter), "hydra/launcher=slurm",
                       "rl.num_generations=2,3"], tmp_path, env)
    assert refused.returncode == 2 and "job #1 (rl.num_generations=3)" in refused.stderr
    assert not (state / "1000.sbatch").exists()


def test_sweep_report_marks_unfinished_jobs(tmp_path):
    from conftest import compose_cfg
    from flare_exp.main import run

    sweep = tmp_path / "sweep"
    for n, marker in enumerate(["DONE", None]):
        (sweep / str(n) / ".hydra").mkdir(parents=True)
        (sweep / str(n) / ".hydra" / "overrides.yaml").write_text(f"- rl.beta={n}\n")
        if marker:
            (sweep / str(n) / marker).write_text("{}")
            (sweep / str(n) / "rl_summary.json").write_text('{"reward_last": 0.5}')
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}"]), run_dir=tmp_path / "r")
    rows = list(csv.DictReader((sweep / "report" / "sweep.csv").open()))
    assert [(r["rl.beta"], r["status"], r["reward_last"]) for r in rows] == [("0", "DONE", "0.5"),
                                                                            ("1", "unfinished", "")]


def test_a_preempted_slurm_job_is_requeued_and_resumes_from_its_checkpoint(session_dir, tmp_path, tiny_model_dir,
                                                                          demo_prepared):
    """SLURM's preemption signal (SIGUSR2) to a running SFT job: submitit checkpoints the task and asks for a
    requeue (scontrol), the stand-in SLURM runs the job again, and the stage continues from its last
    checkpoint to DONE with every step logged once."""
    import signal
    import time

    state = tmp_path / "slurm"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    args = [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}", "stage=sft",
            "sft.max_steps=40", "sft.save_steps=2", "sft.eval_steps=0", "sft.save_total_limit=null",
            "sft.logging_steps=1", "run_name=preempt", "hydra/launcher=slurm", "hydra.launcher.timeout_min=90"]
    launcher = subprocess.Popen([sys.executable, "launch.py", "-m", *args, "seed=1"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = tmp_path / "out" / "sweeps" / "preempt" / "0"
    deadline = time.time() + 300
    while not (job / "checkpoint-2" / COMPLETE).exists():  # the checkpoint resume=auto takes
        assert time.time() < deadline and launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(int(next(state.glob("*.task_pid")).read_text()), signal.SIGUSR2)
    _, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-3000:]
    assert next(state.glob("*.restarts")).read_text() == "1"  # run twice: preempted, then requeued
    assert (job / "DONE").exists() and json.loads((job / "sft_summary.json").read_text())["global_step"] == 40
    first = job / "attempts" / "01"
    assert "stopped from outside (SystemExit" in (first / "FAILED").read_text()
    history = json.loads((job / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 41))
    log = "".join(p.read_text() for p in state.glob("*.out")) + "".join(
        p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.log"))
    assert "resume=auto: continuing from" in log


def test_sweep_report_ranks_by_the_official_metric_and_draws_a_2d_sweep_as_a_heatmap(tmp_path, monkeypatch):
    """A 2 x 2 sweep that ran eval: the jobs ranked by the official metric (best first), the reward terms
    averaged over the whole run (a term missing from the last steps still shows), the heatmap drawn."""
    from conftest import compose_cfg
    from flare_exp.main import run
    from flare_exp.reports import sweep_figure

    sweep, scores = tmp_path / "sweep", {(0.5, 0.1): 0.2, (0.5, 0.3): 0.6, (0.7, 0.1): 0.4, (0.7, 0.3): 0.1}
    for n, ((a, b), score) in enumerate(scores.items()):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- reward.x.weights.a={a}\n- reward.x.weights.b={b}\n")
        (job / "DONE").write_text("{}")
        (job / "rl").mkdir()
        (job / "rl" / "rl_summary.json").write_text('{"reward_last": 0.5, "reward_term/report_generation/radgraph": '
                                                    'null}')  # no report prompt in the last quarter
        (job / "rl" / "log_history.json").write_text(json.dumps(
            [{"step": 1, "reward": 0.1, "reward_term/report_generation/radgraph": 0.2},
             {"step": 2, "reward": 0.3, "reward_term/report_generation/radgraph": 0.4}, {"step": 3, "reward": 0.2}]))
        (job / "eval").mkdir()
        (job / "eval" / "metrics.json").write_text(json.dumps(
            {"rl": {"official": {"classification": {"balanced_accuracy": score, "num_examples": 9}}}}))
    drawn = []
    monkeypatch.setattr(sweep_figure, "_heatmap", lambda fig, ax, jobs, keys, metric: drawn.append((keys, metric)))
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}"]), run_dir=tmp_path / "r")
    rows = list(csv.DictReader((sweep / "report" / "sweep.csv").open()))
    key = "official/classification/balanced_accuracy"
    assert [float(r[key]) for r in rows] == [0.6, 0.4, 0.2, 0.1] and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert all(float(r["reward_term_all/report_generation/radgraph"]) == 0.3 for r in rows)  # all steps' mean
    assert all(r["reward_term/report_generation/radgraph"] == "" for r in rows)  # null everywhere: still a column
    assert "reward_term_all/*: means over all its logged steps" in (sweep / "report" / "sweep.md").read_text()
    assert drawn == [(["reward.x.weights.a", "reward.x.weights.b"], key)]
    assert "Ranked by official/classification/balanced_accuracy (highest first" in (
        sweep / "report" / "sweep.md").read_text()
    page = (sweep / "report" / "sweep.html").read_text()  # one page to send: the figure inside, numbers aligned
    assert "src='data:image/png;base64," in page and "<td class='num'>0.6000</td>" in page and "href=" not in page
    with pytest.raises(ValueError, match="sweep_report.rank_by=nope: no job has it"):
        run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}", "sweep_report.rank_by=nope",
                         "overwrite=true"]), run_dir=tmp_path / "r2")


def test_a_sweep_relaunched_smaller_with_another_setting_ranks_only_its_own_jobs(tmp_path):
    """overwrite=true into a sweep dir with a smaller grid and another fixed setting redid job 0 alone: the
    report ranked it beside the earlier launches' jobs 1 and 2 (another learning rate, their cells blank) and
    showed overwrite as a swept setting. The launcher records the jobs its launch made (.launch.json): the others
    are named and left out of the ranking; each job's own value fills the column; overwrite is no column."""
    from conftest import compose_cfg
    from flare_exp.main import run

    sweep = tmp_path / "sweep"
    jobs = [("0", ["reward.x.weights.a=0", "rl.learning_rate=0.002", "overwrite=True"], 0.002, 0.4),
            ("1", ["reward.x.weights.a=2", "overwrite=True"], 0.0005, 0.9),
            ("2", ["reward.x.weights.a=1"], 0.0005, 0.8)]
    for name, overrides, lr, reward in jobs:
        job = sweep / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in ["stage=rl", *overrides]))
        (job / ".hydra" / "config.yaml").write_text(f"rl:\n  learning_rate: {lr}\n")
        (job / "DONE").write_text("{}")
        (job / "rl_summary.json").write_text(json.dumps({"reward_last": reward}))
    (sweep / ".launch.json").write_text(json.dumps({"jobs": {"0": {"overrides": [
        "stage=rl", "reward.x.weights.a=0", "rl.learning_rate=0.002", "overwrite=true"], "kept": False}}}))
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}"]), run_dir=tmp_path / "r")
    rows = {r["job"]: r for r in csv.DictReader((sweep / "report" / "sweep.csv").open())}
    assert "overwrite" not in rows["0"]
    assert [rows[j]["rl.learning_rate"] for j in "012"] == ["0.002", "0.0005", "0.0005"]
    assert [rows[j]["rank"] for j in "012"] == ["1", "", ""]
    assert "made by an earlier launch into this sweep dir" in rows["1"]["error"] and not rows["0"]["error"]
    assert "not one of the latest launch's 1 job(s)" in rows["2"]["error"]


def test_a_reward_typed_into_a_jobs_rl_summary_is_named_and_not_ranked(tmp_path):
    """An edited metrics.json was caught; an edited rl_summary.json's reward_last moved the ranking without a word
    (the row's own rewards/* still showed the true one). It is recomputed from the job's log_history.json."""
    from conftest import compose_cfg
    from flare_exp.main import run
    from flare_exp.rl_monitor.reward_summary import summarise

    sweep = tmp_path / "sweep"
    for n, rewards in enumerate(([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8])):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- reward.x.weights.a={n}\n")
        (job / "DONE").write_text("{}")
        history = [{"step": i + 1, "reward": r, "reward_term/classification/choice": r} for i, r in enumerate(rewards)]
        history.append({"step": 5, "reward": 0.5, "reward_term/regression/numeric": 1.0})
        (job / "log_history.json").write_text(json.dumps(history))
        summary = summarise(history, 5)
        assert summary["reward_term/classification/choice"] is None and "reward_term_note" in summary
        (job / "rl_summary.json").write_text(json.dumps({**summary, "reward_last": 0.99} if n == 0 else summary))
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}", "sweep_report.rank_by=reward_last"]),
        run_dir=tmp_path / "r")
    rows = {r["job"]: r for r in csv.DictReader((sweep / "report" / "sweep.csv").open())}
    assert "reward_last 0.99, 0.5 from its log_history.json: edited since its run wrote it" in rows["0"]["error"]
    assert rows["0"]["rank"] == "" and rows["0"]["reward_last"] == "" and rows["1"]["rank"] == "1"
    assert float(rows["1"]["reward_term_all/classification/choice"]) == 0.65 and not rows["1"]["error"]


def test_a_sweep_report_pointed_at_one_runs_dir_says_so(tmp_path):
    from flare_exp.reports.sweep import write_sweep_report

    run_dir = tmp_path / "runs" / "my-rl"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "rl_summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"that is one run's dir, not a sweep's: a sweep \(python launch.py -m"):
        write_sweep_report(run_dir, None)
    with pytest.raises(ValueError, match=r"no job directories \(0/, 1/, ... or those a custom hydra.sweep.subdir "
                                         r"named, with .hydra/\).*sweeps/<run_name>/"):
        write_sweep_report((tmp_path / "empty").mkdir() or tmp_path / "empty", None)


def test_two_spellings_of_one_setting_are_one_setting():
    """A relaunch spelled ++key, other quotes, true for True or 5e-4 for 0.0005 is the same run: the kept job's
    line said "made with ++key=2, key at its default"."""
    from flare_exp.sweep_launch import override_pairs

    assert override_pairs(["++rl.max_steps=2", "x='t 45'", "e=true", "lr=5e-4", "model=tiny"]) == override_pairs(
        ["rl.max_steps=2", 'x="t 45"', "e=True", "lr=0.0005", "model=tiny"]) == {
        "rl.max_steps": "2", "x": "t 45", "e": "True", "lr": "0.0005", "model": "tiny"}


def test_a_job_the_alarm_stopped_says_so_in_the_sweep_table(tmp_path):
    """A job the reward-hacking alarm stopped at step 4 of 6 showed a plain DONE beside jobs that ran all steps."""
    from conftest import compose_cfg
    from flare_exp.main import run

    sweep = tmp_path / "sweep"
    for n in range(2):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- rl.max_completion_length={2 + n}\n")
        (job / "DONE").write_text("{}")
        summary = {"reward_last": 0.5 + n / 10, "global_step": 4 if n == 0 else 6}
        if n == 0:
            summary["stopped_early"] = {"step": 4, "max_steps": 6, "why": "the reward-hacking alarm (length cap)"}
        (job / "rl_summary.json").write_text(json.dumps(summary))
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}"]), run_dir=tmp_path / "r")
    rows = {r["job"]: r for r in csv.DictReader((sweep / "report" / "sweep.csv").open())}
    assert rows["0"]["status"] == "DONE (stopped early at step 4 of 6 by the reward-hacking alarm (length cap))"
    assert rows["1"]["status"] == "DONE" and rows["0"]["rank"] == "2"


def test_a_killed_relaunch_leaves_no_earlier_run_ranked_as_its_own(tmp_path):
    """A relaunch (overwrite=true) killed before it reached job 0 left the earlier launch's run there; the record
    named job 0 as the latest launch's, so that run ranked as its own (the best). A job the latest launch was to
    run, whose dir holds a run of other settings, is an earlier launch's; a job it kept is its own; the record is
    read by job number (a custom hydra.sweep.subdir names the dirs otherwise)."""
    from flare_exp.reports.sweep_jobs import collect

    sweep = tmp_path / "sweep"
    for name, num, made_with in (("job0", 0, "q3"), ("job1", 1, "q1"), ("job2", 2, "q2")):
        job = sweep / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- eval.predictions=[{made_with}]\n")
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        (job / "DONE").write_text("{}")
    (sweep / ".launch.json").write_text(json.dumps({"jobs": {
        "0": {"overrides": ["eval.predictions=[q0]", "overwrite=true"], "kept": False},
        "1": {"overrides": ["eval.predictions=[q1]"], "kept": True},
        "2": {"overrides": ["++eval.predictions=[q2]"], "kept": False}}}))
    jobs = {j["job"]: j for j in collect(sweep)}
    assert jobs["job0"].get("earlier_launch") and "was to run this job with other settings" in jobs["job0"]["error"]
    assert not jobs["job1"].get("earlier_launch") and not jobs["job2"].get("earlier_launch")


def test_damaged_copied_and_foreign_job_dirs_are_said_not_ranked_as_the_launchs(tmp_path):
    """One job's cut rl_summary.json crashed the whole report (a bare JSONDecodeError); a job dir copied inside the
    sweep, or one an earlier launch made under another hydra.sweep.subdir, ranked as the latest launch's (matched
    by job number and settings, not by its dir); a job dir without .hydra/ was left out unsaid; a DONE typed
    over showed as a plain DONE."""
    import shutil

    from flare_exp.reports.sweep_jobs import collect

    sweep = tmp_path / "sweep"
    launched = {}
    for num in (0, 1, 2):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        (job / "DONE").write_text('{"seconds": 3}')
        (job / "rl_summary.json").write_text(json.dumps({"reward_last": 0.1 * num, "global_step": 2}))
        launched[str(num)] = {"overrides": [f"seed={num}"], "kept": False, "dir": str(num)}
    (sweep / ".launch.json").write_text(json.dumps({"jobs": launched}))
    (sweep / "1" / "rl_summary.json").write_text('{"reward_last": 0.')  # cut
    (sweep / "2" / "DONE").write_text("done by hand")  # typed over
    shutil.copytree(sweep / "0", sweep / "5")  # a copy: hydra.job.num 0, seed=0, as job 0
    shutil.copytree(sweep / "0", sweep / "seed_0")  # an earlier launch's, under another subdir
    shutil.copytree(sweep / "0", sweep / "3")
    shutil.rmtree(sweep / "3" / ".hydra")  # copied without its dot-dirs
    jobs = {j["job"]: j for j in collect(sweep)}
    assert set(jobs) == {"0", "1", "2", "3", "5", "seed_0"}
    assert "rl_summary.json unreadable (JSONDecodeError): cut or edited" in jobs["1"]["error"]
    assert "reward_last" not in jobs["1"]["metrics"] and jobs["0"]["metrics"]["reward_last"] == 0.0
    assert "DONE not as a run writes it (edited)" in jobs["2"]["error"]
    for name in ("5", "seed_0"):
        assert jobs[name].get("earlier_launch") and "made its job #0 in 0/, not here" in jobs[name]["error"]
    assert not jobs["0"].get("earlier_launch") and ".hydra/overrides.yaml missing" in jobs["3"]["error"]
    from conftest import compose_cfg
    from flare_exp.main import run

    from flare_exp.reports.sweep_jobs import rank_key

    assert rank_key([{"metrics": {"official/regression/mean_absolute_error": 3.0}}],
                    "regression.mean_absolute_error") == "official/regression/mean_absolute_error"  # as objectives
    run(compose_cfg(["stage=sweep_report", f"sweep_report.sweep_dir={sweep}", "sweep_report.rank_by=reward_last"]),
        run_dir=tmp_path / "report_run")  # written, the damaged job named in its error column
    rows = {r["job"]: r for r in csv.DictReader((sweep / "report" / "sweep.csv").open())}
    assert rows["0"]["rank"] == "2" and rows["2"]["rank"] == "1" and rows["1"]["rank"] in ("", "n/a", "-"), rows
