"""Data-parallel SFT through torchrun: 2 processes on the gloo backend (CPU) train one adapter, written by rank
0 alone, equal to one process trained on the same global batches (gradient accumulation over the same samples)."""
import json
import os
import subprocess
import sys

from conftest import REPO
from flare_exp.models.checkpoints import COMPLETE

import pytest

pytestmark = pytest.mark.slow  # subprocess launches of whole sweeps / several ranks


def _sft_args(session_dir, out, *extra):
    return [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={out}", "stage=sft", "sft.max_steps=2",
            "sft.eval_steps=0", "sft.save_steps=2", "sft.per_device_train_batch_size=2", "sft.warmup_ratio=0",
            "sft.logging_steps=1", "sft.dataloader_num_workers=0", "run_name=ddp", *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _one_process(overrides, run_dir):
    """The one-process reference, run in this process on one thread as each rank runs (OMP_NUM_THREADS=1)."""
    import torch

    from conftest import compose_cfg
    from flare_exp.main import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_cfg(overrides), run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_train_one_adapter_equal_to_one_process(session_dir, tmp_path, tiny_model_dir, demo_prepared):
    import torch
    from safetensors.torch import load_file

    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "launch.py", *_sft_args(session_dir, tmp_path / "ddp", "sft.gradient_accumulation_steps=1")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    run_dir = tmp_path / "ddp" / "runs" / "ddp"
    summary = json.loads((run_dir / "sft_summary.json").read_text())
    assert (run_dir / "DONE").exists() and summary["world_size"] == 2 and summary["effective_batch"] == 4
    assert "2 per device x 1 accumulation x 2 rank(s) = 4 samples per optimizer step" in ddp.stderr + ddp.stdout
    _one_process(_sft_args(session_dir, tmp_path / "one", "sft.gradient_accumulation_steps=2"),
                 tmp_path / "one" / "runs" / "ddp")
    single = json.loads((tmp_path / "one" / "runs" / "ddp" / "sft_summary.json").read_text())
    assert single["world_size"] == 1 and single["effective_batch"] == 4
    a = load_file(run_dir / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "runs" / "ddp" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert abs(summary["first_loss"] - single["first_loss"]) < 1e-3


def test_two_ranks_share_the_predictions_and_rank_0_merges_them_in_input_order(session_dir, tmp_path, sft_adapter):
    from flare_exp.io import read_jsonl

    args = [f"paths.cache_dir={session_dir / 'cache'}", "stage=infer", f"infer.checkpoint={sft_adapter}",
            "infer.num_samples=9", "infer.batch_size=2", "infer.max_new_tokens=6", "run_name=inf"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
                          "launch.py", *args, f"paths.output_root={tmp_path / 'ddp'}"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    _one_process([*args, f"paths.output_root={tmp_path / 'one'}"], tmp_path / "one" / "runs" / "inf")
    run_dir = tmp_path / "ddp" / "runs" / "inf"
    merged, single = read_jsonl(run_dir / "predictions.jsonl"), read_jsonl(tmp_path / "one" / "runs" / "inf" /
                                                                          "predictions.jsonl")
    assert [r["id"] for r in merged] == [r["id"] for r in single] and len(merged) == 9  # none lost or doubled
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in single]
    summary = json.loads((run_dir / "infer_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["generated_now"] == 9 and (run_dir / "DONE").exists()
    assert not list(run_dir.glob("predictions.rank*.jsonl"))


def test_a_failing_rank_ends_the_job_with_failed_naming_it(session_dir, tmp_path, sft_adapter, demo_prepared):
    """Rank 1's share holds a record whose image is gone: the job fails and FAILED says rank 1 and why."""
    from flare_exp.io import read_jsonl, write_jsonl

    rows = read_jsonl(demo_prepared / "val.jsonl")[:4]
    rows[1] = {**rows[1], "images": ["no/such/image.png", *rows[1]["images"][1:]]}  # records[1::2]: rank 1's share
    write_jsonl(tmp_path / "four.jsonl", rows)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29535",
                           "launch.py", f"paths.cache_dir={session_dir / 'cache'}", "stage=infer",
                           f"paths.output_root={tmp_path / 'out'}", f"infer.input_file={tmp_path / 'four.jsonl'}",
                           f"infer.checkpoint={sft_adapter}", "infer.max_new_tokens=4", "run_name=fail"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    failed = (tmp_path / "out" / "runs" / "fail" / "FAILED").read_text()
    assert failed.startswith("rank 1: ") and "image.png" in failed, failed[:500]
    assert not (tmp_path / "out" / "runs" / "fail" / "DONE").exists()


def test_a_pipeline_on_two_ranks_prepares_on_rank_0_and_runs_grpo_on_both(session_dir, tmp_path, tiny_model_dir):
    """torchrun 2 ranks, stage=pipeline prepare -> sft -> rl -> infer -> eval: prepare on rank 0 (a fresh demo
    tree) while rank 1 waits, 2 GRPO steps over 2 ranks (world_size 2 in the summary), every step DONE."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "tiny-qwen3vl").symlink_to(tiny_model_dir)
    args = [f"paths.cache_dir={cache}", f"paths.output_root={tmp_path / 'out'}", "stage=pipeline",
            "stage.steps=[prepare,sft,rl,infer,eval]", "sft.max_steps=1", "sft.eval_steps=0",
            "sft.dataloader_num_workers=0", "rl.max_steps=2", "rl.num_generations=2",
            "rl.per_device_train_batch_size=2", "rl.max_completion_length=6", "infer.num_samples=5",
            "infer.max_new_tokens=4", "run_name=pipe"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29536",
                          "launch.py", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    run_dir = tmp_path / "out" / "runs" / "pipe"
    assert all((run_dir / step / "DONE").exists() for step in ("sft", "rl", "infer", "eval"))
    assert (cache / "demo" / "prepared" / "DONE").exists()
    rl = json.loads((run_dir / "rl" / "rl_summary.json").read_text())
    assert rl["global_step"] == 2 and rl["world_size"] == 2 and rl["effective_batch"] == 4
    assert json.loads((run_dir / "infer" / "infer_summary.json").read_text())["samples"] == 5
    assert (run_dir / "eval" / "metrics.json").exists() and (run_dir / "DONE").exists()


def test_the_green_judge_on_two_ranks_equals_one_process(session_dir, tmp_path, sft_adapter):
    """eval over 2 ranks: each rank judges its share of the reports into its own journal, rank 0 merges them
    and scores; the same GREEN numbers and judgments as one process, every report judged once."""
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm
    from flare_exp.io import read_jsonl

    judge = build_tiny_causal_lm(tmp_path / "judge")
    common = [f"paths.cache_dir={session_dir / 'cache'}", "run_name=ev"]
    _one_process([*common, "stage=infer", f"infer.checkpoint={sft_adapter}", "infer.num_samples=12",
                  "infer.max_new_tokens=5", f"paths.output_root={tmp_path / 'inf'}"], tmp_path / "inf" / "runs" / "ev")
    evaluate = ["stage=eval", f"eval.predictions=[{tmp_path / 'inf' / 'runs' / 'ev'}]",
                f"eval.green.model_path={judge}", "eval.green.max_new_tokens=4", "eval.green.batch_size=2"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                          "launch.py", *common, *evaluate, f"paths.output_root={tmp_path / 'ddp'}"], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    _one_process([*common, *evaluate, f"paths.output_root={tmp_path / 'one'}"], tmp_path / "one" / "runs" / "ev")
    two_dir, one_dir = tmp_path / "ddp" / "runs" / "ev", tmp_path / "one" / "runs" / "ev"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (two_dir, one_dir)]
    label = next(iter(metrics[0]))
    assert metrics[0][label]["by_task"]["report_generation"]["green_score"] == \
        metrics[1][label]["by_task"]["report_generation"]["green_score"]
    judged = read_jsonl(two_dir / "green_judgments.jsonl")
    assert len({r["key"] for r in judged}) == len(judged) == len(read_jsonl(one_dir / "green_judgments.jsonl"))
    assert not list(two_dir.glob("green_judgments.rank*.jsonl"))
    assert "rank 1" not in (two_dir / "DONE").read_text()


def test_a_requeued_two_task_job_resumes_on_both_ranks(session_dir, tmp_path, tiny_model_dir, demo_prepared):
    """hydra.launcher.tasks_per_node=2 through the stand-in SLURM: the sbatch script asks for two tasks, each
    task becomes a rank from submitit's job environment. SLURM preempts the job (SIGUSR2 to both tasks): rank 0
    checkpoints and requeues it through submitit, the stand-in SLURM runs the job again, both ranks resume from
    the last checkpoint and the job ends DONE with one adapter and world_size 2, every step logged once, the
    preempted attempt kept in attempts/01."""
    import signal
    import time

    fake = REPO / "tests" / "fake_slurm"
    state = tmp_path / "slurm"
    env = {**_env(), "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    args = [*_sft_args(session_dir, tmp_path / "out", "sft.max_steps=30", "sft.save_steps=2",
                       "sft.save_total_limit=null", "sft.gradient_accumulation_steps=1"),
            "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=0"]
    launcher = subprocess.Popen([sys.executable, "launch.py", "-m", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = tmp_path / "out" / "sweeps" / "ddp" / "0"
    try:
        deadline = time.time() + 300
        while not (job / "checkpoint-2" / COMPLETE).exists():  # the checkpoint resume=auto takes
            assert time.time() < deadline and launcher.poll() is None, launcher.communicate()[1][-3000:]
            time.sleep(0.1)
        for pid in next(state.glob("*.task_pids")).read_text().split():
            os.kill(int(pid), signal.SIGUSR2)  # SLURM signals every task of the job step
        _, stderr = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "#SBATCH --ntasks-per-node=2" in (state / "1000.sbatch").read_text()
    assert next(state.glob("*.restarts")).read_text() == "1"
    summary = json.loads((job / "sft_summary.json").read_text())
    assert (job / "DONE").exists() and summary["world_size"] == 2 and summary["global_step"] == 30
    assert summary["effective_batch"] == 4 and (job / "final" / "adapter_model.safetensors").exists()
    assert (job / "attempts" / "01" / "FAILED").exists()
    history = json.loads((job / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 31))
    log = "".join(p.read_text(errors="replace") for p in state.glob("*.out")) + "".join(
        p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.log"))
    assert "resume=auto: continuing from" in log
