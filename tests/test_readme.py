"""The README's commands run as written (on the demo experiment): the grid sweep through the stand-in SLURM
commands followed by its sweep_report command, the demo sweep (the demo itself: test_pipeline.py). A README that
drifts from the code fails here."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow  # whole launches
FAKE_SLURM = Path(__file__).parent / "fake_slurm"


def readme_commands() -> list[str]:
    """Every `python launch.py ...` command in the README's bash blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python launch.py"):
                commands.append(line)
    return commands


def run_command(command: str, extra: list[str], env_extra=None, timeout=900):
    """A README command run as written (python: this interpreter), ``extra`` overrides after it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    argv = shlex.split(command)
    argv[0] = sys.executable
    return subprocess.run([*argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_grid_sweep_and_its_report(session_dir, tmp_path, learned_sft_adapter):
    """Through sbatch/srun/sacct/scancel stand-ins on PATH: the real submitit_slurm launcher submits one array
    job with the cluster settings given. From an SFT adapter that learned the reports, the four weight settings
    price the reports its GRPO policy writes differently: four different reward curves (the weights, not the
    jobs' seeds: each job has the same)."""
    sweep = next(c for c in readme_commands() if c.startswith("python launch.py -m $F stage=rl"))
    report = next(c for c in readme_commands() if "stage=sweep_report" in c)
    assert "hydra/launcher=slurm" in sweep
    command = sweep.replace("$F", "experiment=demo").replace("rl.init_from=outputs/runs/sft-r16",
                                                              f"rl.init_from={learned_sft_adapter}")
    state = tmp_path / "slurm"
    proc = run_command(command, [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}",
                                 "run_name=readme", "rl.max_steps=2", "rl.max_completion_length=8",  # step 2 has
                                 # report prompts; the launcher's settings as a cluster's user adds them:
                                 "hydra.launcher.account=proj42", "hydra.launcher.qos=normal",
                                 "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=2",
                                 "hydra.launcher.setup=[module load cuda/12.4,source /opt/venv/bin/activate]"],
                       {"PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4/4 #" in proc.stderr and "all finished" in proc.stderr  # a line per finished job
    lines = (state / "1000.sbatch").read_text().splitlines()  # the real submitit_slurm launcher's array job
    for expected in ["#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --qos=normal",
                     "#SBATCH --time=90", "#SBATCH --gpus-per-node=1", "#SBATCH --array=0-3%2",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "module load cuda/12.4",
                     "source /opt/venv/bin/activate"]:
        assert expected in lines, f"{expected!r} not in the sbatch script:\n" + "\n".join(lines)
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines.index("module load cuda/12.4") < srun
    sweep_dir = tmp_path / "out" / "sweeps" / "readme"
    assert f"Report: python launch.py stage=sweep_report sweep_report.sweep_dir={sweep_dir}" in proc.stdout
    jobs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert len(jobs) == 4 and all((j / "DONE").exists() for j in jobs)
    done = run_command(report.replace("outputs/sweeps/<run_name>", str(sweep_dir)),
                [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sweep_dir / "report" / "sweep.md").exists()
    rows = list(csv.DictReader((sweep_dir / "report" / "sweep.csv").open()))  # one row per job of the grid
    assert [r["status"] for r in rows] == ["DONE"] * 4
    assert {(r["reward.report_generation.weights.radgraph"], r["reward.report_generation.weights.rouge_l"])
            for r in rows} == {("0.5", "0.1"), ("0.5", "0.3"), ("0.7", "0.1"), ("0.7", "0.3")}
    assert all(r["reward_last"] != "" for r in rows)
    # the weights change the outcome: a larger weight on a term the reports earn raises the job's last reward.
    # (Jobs that differ in both weights can tie: 0.7 / 0.1 and 0.5 / 0.3 do when both terms' means are equal.)
    last = {(r["reward.report_generation.weights.radgraph"], r["reward.report_generation.weights.rouge_l"]):
            float(r["reward_last"]) for r in rows}
    terms = {k: float(rows[0][f"reward_term/report_generation/{k}"]) for k in ("radgraph", "rouge_l")}
    assert min(terms.values()) > 0, rows
    assert last["0.7", "0.1"] > last["0.5", "0.1"] and last["0.7", "0.3"] > last["0.5", "0.3"], rows
    assert last["0.5", "0.3"] > last["0.5", "0.1"] and last["0.7", "0.3"] > last["0.7", "0.1"], rows
    assert (sweep_dir / "report" / "sweep.png").stat().st_size > 1000
    # ranked by each job's own reward, whose weights differ between the jobs: the report says it is no comparison
    assert "not comparable by it" in (sweep_dir / "report" / "sweep.md").read_text()


def test_the_readme_demo_sweep_whose_weights_change_the_official_outcome(session_dir, tmp_path, learned_sft_adapter):
    """Real GRPO on the tiny model from an SFT adapter that learned the answers, each job evaluated: the
    regression reward off leaves the official MAE where sft left it, on moves it (the weight, not the seed:
    both jobs have the same)."""
    sweep = next(c for c in readme_commands() if "reward.regression.weights.numeric=0,1" in c)
    command = sweep.replace("rl.init_from=outputs/runs/demo-pipeline/sft", f"rl.init_from={learned_sft_adapter}")
    proc = run_command(command, [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    official = {}
    for job in sorted((tmp_path / "sweeps" / "demo-weights").glob("[0-9]")):
        numeric = next(o for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) if "numeric" in o)
        results = json.loads((job / "eval" / "metrics.json").read_text())
        mae = next(iter(results.values()))["official"]["regression"]["mean_absolute_error"]
        official[numeric.split("=")[1]] = float(mae)  # "Infinity": an answer without a number (FLARE's rule)
    assert set(official) == {"0", "1"}, official
    assert official["1"] < official["0"], official  # rewarding the number teaches it
    print("official regression MAE by reward.regression.weights.numeric:", official)
