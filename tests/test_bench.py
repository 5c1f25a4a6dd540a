"""The GPU benchmark harness runs end to end on CPU with the tiny model (its numbers mean nothing here): a broken
bench must show up here, not in a lent GPU slot. Its command line runs in this process (a fresh interpreter per
measurement would pay the ML imports again each time); test_bench_env_setting_must_name_a_value runs the
module as the GPU box does, `python -m bench.run`."""
import json
import os
import subprocess
import sys

import pytest

from conftest import CONF

pytestmark = pytest.mark.slow  # each runs whole bench measurements

REPO = CONF.parent


@pytest.fixture
def bench(monkeypatch, capsys):
    """bench.run's main with these arguments; returns its BENCH result. What a measurement changes for its own
    process (its --env variables, sft --force-vision-encoder's stage hook, the infer stage logger's level and
    batch collector) is put back after the test."""
    import logging

    from bench import run as bench_run
    from flare_exp.models import loading

    monkeypatch.setattr(loading, "vision_encoder", loading.vision_encoder)
    infer_log = logging.getLogger("flare_exp.stages.infer")
    level, handlers = infer_log.level, list(infer_log.handlers)

    def measure(*args):
        for setting in (args[i + 1] for i, a in enumerate(args) if a == "--env"):
            monkeypatch.delenv(setting.partition("=")[0], raising=False)
        monkeypatch.setattr(sys, "argv", ["bench.run", *args])
        capsys.readouterr()
        bench_run.main()
        return json.loads(capsys.readouterr().out.split("BENCH", 1)[1])

    yield measure
    for handler in set(infer_log.handlers) - set(handlers):
        infer_log.removeHandler(handler)
    infer_log.setLevel(level)


def bench_report(out_dir) -> str:
    from bench.report import load, tables

    return tables(load(out_dir))


def test_bench_sft_loop_and_report(tmp_path, tiny_model_dir, bench):
    common = ["--model-dir", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--image-size", "96",
              "--dtype", "float32", "--out", str(tmp_path / "out")]
    sft = bench("sft", "--steps", "3", "--warmup", "1", "--workers", "0", "--grad-ckpt", "false",
                "--set", "model.lora.r=8", "--env", "FLARE_PROBE=on", *common)
    assert sft["steps_measured"] == 2 and sft["tokens_per_second_median"] > 0
    assert sft["gradient_checkpointing"] is False and sft["data_wait_seconds_median"] is not None
    # the tiny model has no parameter count file and a CPU no bf16 peak: MFU unknown, not 0
    assert sft["params"] is None and sft["mfu"] is None and "no parameter count" in sft["mfu_note"]
    assert len(sft["first_losses"]) == 3 and all(loss > 0 for loss in sft["first_losses"])
    loop = bench("loop", "--steps", "2", "--warmup", "1", "--views", "1", "--answer-words", "60", *common)
    assert loop["tokens_per_batch"] > 0 and loop["trainable_params"] > 0
    assert all(loop[v]["tokens_per_second_median"] > 0 for v in ("autocast", "plain"))
    forced = bench("loop", "--steps", "1", "--warmup", "0", "--batch", "2", "--force-vision-encoder", *common)
    assert forced["vision_encoder_forced"]["max_relative_difference"] < 0.05
    assert forced["autocast, vision encoder batched (forced)"]["tokens_per_second_median"] > 0
    (tmp_path / "out" / "loop-hf-bs2-forced-vision-IU_XRay.json").unlink()
    long_case = bench("loop", "--steps", "1", "--warmup", "0", "--batch", "1", "--long-side", "320", *common)
    assert long_case["tokens_per_batch"] >= (320 // 32) ** 2  # one 320-px image: 10 x 10 merged patches at least
    (tmp_path / "out" / "loop-hf-bs1-long320px-IU_XRay.json").unlink()
    distinct = bench("loop", "--steps", "2", "--warmup", "1", "--batch", "2", "--distinct-batches", *common)
    assert distinct["samples"] == "IU_XRay, a new batch every step"  # 2 variants x 3 steps: 6 batches built
    assert all(distinct[v]["tokens_per_second_median"] > 0 for v in ("autocast", "plain"))
    (tmp_path / "out" / "loop-hf-bs2-distinct-IU_XRay.json").unlink()
    names = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert names == ["loop-hf-bs8-views1-answer60w-IU_XRay.json",
                     "sft-hf-bs8-w0-nockpt-r-8-FLARE_PROBE-on-IU_XRay.json"]
    assert loop["samples"] == "IU_XRay, 1 view(s), 60-word answers"
    assert loop["tokens_per_batch"] > 8 * 60  # the long answers are in the batch
    report = bench_report(tmp_path / "out")
    assert "| IU_XRay | hf | 8 | no | batched | 0 | no |" in report  # no checkpointing, workers 0, not compiled
    assert f"| {sft['tokens_per_second_median']:,.0f} | unknown |" in report
    first_losses = ", ".join(f"{loss:.3f}" for loss in sft["first_losses"])
    assert f"| {first_losses} | model.lora.r=8, env FLARE_PROBE=on |" in report
    assert "### SFT model cost in a bare loop" in report
    import torch
    import transformers

    assert sft["versions"]["transformers"] == transformers.__version__
    assert f"- cpu: torch {torch.__version__}, transformers {transformers.__version__}, peft " in report


def test_bench_infer_both_decode_loops(tmp_path, tiny_model_dir, bench):
    common = ["--model-dir", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--image-size", "96",
              "--dtype", "float32", "--out", str(tmp_path / "out"), "--batch", "2", "--samples", "4",
              "--new-tokens", "5", "--cache", "static"]
    for loop in ("generate", "graph"):
        result = bench("infer", "--set", f"infer.decode_loop={loop}", *common)
        assert len(result["generate_seconds_per_batch"]) == 2 and result["reports_per_second"] > 0
        assert result["decode_loop"] == loop  # the loop that ran, as the stage resolved it
        predictions = (tmp_path / "work" / "runs" / f"infer-hf-bs2-static-imgauto-decode_loop-{loop}-IU_XRay"
                       / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 4
    report = bench_report(tmp_path / "out")
    assert "| infer.decode_loop=graph |" in report and "| infer.decode_loop=generate |" in report
    assert "| static | graph |" in report and "| static | generate |" in report


def test_bench_infer_with_a_first_batch_of_large_images(tmp_path, tiny_model_dir, bench):
    """infer-mixed on the GPU: the graph loop's cache shrinks after the large batch (default) or is kept."""
    common = ["--model-dir", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--image-size", "96",
              "--dtype", "float32", "--out", str(tmp_path / "out"), "--batch", "2", "--samples", "4",
              "--new-tokens", "4", "--cache", "static", "--long-side", "320", "--set", "infer.decode_loop=graph"]
    shrunk = bench("infer", *common)
    kept = bench("infer", "--keep-long-cache", *common)
    assert shrunk["samples"] == kept["samples"] == 6  # 2 large + 4 usual
    lengths = shrunk["loop_cache_lengths"]
    assert lengths[0] > 2 * lengths[1] and lengths[1] == lengths[2]  # a new cache after the large batch
    assert kept["loop_cache_lengths"] == [lengths[0]] * 3
    assert (tmp_path / "out" / "infer-hf-bs2-static-imgauto-long320first-keepcache-decode_loop-graph-IU_XRay.json").exists()


def test_bench_grpo_both_rollout_loops(tmp_path, tiny_model_dir, bench):
    """A fresh work dir each (the first run once sampled <|vision_start|> as a completion's last token and
    crashed in the loss forward: rollouts now never sample vision tokens)."""
    for loop in ("generate", "graph"):
        # graph: with --profile, steps 6 and 7 profiled (rollouts inside: the decode steps' kernels), their profile
        # kept beside the results and those steps left out of the medians
        profiled = ["--steps", "7", "--profile"] if loop == "graph" else ["--steps", "2"]
        result = bench("grpo", "--model-dir", str(tiny_model_dir), "--work", str(tmp_path / loop), "--image-size",
                       "96", "--dtype", "float32", "--out", str(tmp_path / "out"), "--num-generations", "2",
                       "--batch", "2", *profiled, "--warmup", "1", "--completion-length", "8",
                       "--set", f"rl.decode_loop={loop}")
        assert result["steps_measured"] == (4 if loop == "graph" else 1)
        assert result["overrides"] == [f"rl.decode_loop={loop}"]
        assert result["decode_loop"] == loop
        split = result["step_split_seconds"]  # the step's parts, each timed
        assert list(split) == ["rollout", "old_ref_logprobs", "reward", "loss_forward", "backward", "other"]
        assert split["rollout"] > 0 and split["reward"] > 0 and split["backward"] > 0 and split["loss_forward"] > 0
    profile = (tmp_path / "out" / "profile-grpo-hf-bs2-ng2-dynamic-decode_loop-graph-IU_XRay.txt")
    assert profile.read_text().startswith("2 steps: wall ") and "aten::mm" in profile.read_text()


def test_bench_reward(tmp_path, bench):
    result = bench("reward", "--samples", "8", "--num-generations", "4", "--radgraph-size", "tiny",
                   "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert [(r["device"], r["path"]) for r in result["rows"]][:2] == [("cpu", "each report once"),
                                                                       ("cpu", "F1RadGraph per pair")]
    assert all(r["completions_per_second"] > 0 for r in result["rows"]) and result["completions"] == 8
    report = bench_report(tmp_path / "out")
    assert "| cpu | each report once | 8 | 4 |" in report


def test_profiled_steps_stay_out_of_the_medians():
    from bench.run import summarise

    seconds = [60.0, 0.6, 0.6, 12.0, 0.6, 0.9, 0.9, 15.0, 0.6, 0.6]  # compile spikes at 1, 4, 8; profiled 6, 7
    history = [{"step": i + 1, "step_seconds": s} for i, s in enumerate(seconds)] + [{"train_runtime": 1.0}]
    assert summarise(history, 3)["step_seconds_median"] == 0.9  # spikes + profiled steps outnumber the rest
    summary = summarise(history, 3, exclude_steps=range(6, 8))
    assert summary["steps_measured"] == 5 and summary["step_seconds_median"] == 0.6


def test_bench_sft_with_the_vision_encoder_forced_and_profiled(tmp_path, tiny_model_dir, bench):
    """What the GPU piece measures under Unsloth (whose own copy of the vision code keeps the per-image
    attention): the stage with the batched encoder installed over the model's code, outputs checked first.
    --profile writes the profiled steps' top ops headed by GPU kernel time vs wall time, and leaves those steps
    out of the medians (the profiler slows them)."""
    result = bench("sft", "--model-dir", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--image-size", "96",
                   "--dtype", "float32", "--out", str(tmp_path / "out"), "--steps", "8", "--warmup", "1",
                   "--workers", "0", "--batch", "2", "--force-vision-encoder", "--profile")
    assert result["steps_measured"] == 8 - 1 - 2 and result["tokens_per_second_median"] > 0
    forced = result["vision_encoder_forced"]
    assert forced["modules_changed"] > 0 and forced["max_relative_difference"] < 0.05
    assert (tmp_path / "out" / "sft-hf-bs2-w0-forced-vision-IU_XRay.json").exists()
    profile = (tmp_path / "out" / "profile-sft-hf-bs2-w0-forced-vision-IU_XRay.txt").read_text()
    assert profile.startswith("2 steps: wall ") and "GPU kernels" in profile and "aten::mm" in profile


def test_bench_env_setting_must_name_a_value():
    out = subprocess.run([sys.executable, "-m", "bench.run", "sft", "--env", "UNSLOTH_FUSED_LINEAR"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "--env 'UNSLOTH_FUSED_LINEAR': expected KEY=VALUE" in out.stderr


def test_bench_infer_answer_length_mix(tmp_path, tiny_model_dir, bench):
    """--length-mix flare: reports end at lengths drawn per task type (the loop stops once a batch's rows all
    ended); infer.bucket_by_task batches like with like, so fewer row-steps idle on finished rows (here against
    the shuffled input order: in the demo, sorting by prompt length already puts the two-view reports together)."""
    common = ["--model-dir", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--image-size", "96",
              "--dtype", "float32", "--out", str(tmp_path / "out"), "--batch", "4", "--samples", "12",
              "--new-tokens", "40", "--cache", "static", "--length-mix", "flare", "--set", "infer.decode_loop=graph",
              "--set", "infer.sort_by_length=false"]
    mixed = bench("infer", *common)
    bucketed = bench("infer", *common, "--set", "infer.bucket_by_task=true")
    assert mixed["length_mix"] == "flare" and mixed["answer_tokens"] == bucketed["answer_tokens"] > 0
    assert len(mixed["decode_steps_per_batch"]) == 3 and min(bucketed["decode_steps_per_batch"]) < 40
    assert bucketed["idle_row_share"] < mixed["idle_row_share"]
    from bench.same_predictions import compare

    runs = tmp_path / "work" / "runs"
    name = "infer-hf-bs4-static-imgauto-mixflare-decode_loop-graph-sort_by_length-false"
    same = compare(runs / f"{name}-IU_XRay", runs / f"{name}-bucket_by_task-true-IU_XRay")
    assert same["records"] == same["identical"] == 12 and same["same_order"]  # the GPU check, here in small
    assert "| flare mix" in bench_report(tmp_path / "out")
