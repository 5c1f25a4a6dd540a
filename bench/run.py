"""flare-exp GPU benchmark: runs the project's own stage code on a Qwen3-VL-4B-shaped random model.

    python -m bench.run sft --backend hf --batch 8 --steps 12 --out bench_out/
    python -m bench.run sft --backend unsloth ...
    python -m bench.run loop --backend hf ...   # the same model and batches in a bare loop (bench/loop.py)
    python -m bench.run reward ...              # reward completions/s, RadGraph on CPU and GPU (bench/reward.py)

Each measurement runs in its own process (Unsloth patches transformers globally on import, which would
contaminate a plain-hf measurement in the same process). Results go to <out>/<what>-<backend>-....json;
bench/report.py turns a folder of them into a Markdown table.

MFU = 6 * N * tokens/s / peak bf16 FLOP/s, N = all model parameters (frozen included), the peak the card's
dense bf16 one (bench/common.py's table; --peak-tflops for another card; unknown: no MFU, said so). Tokens =
non-padding input tokens, image tokens included.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (bench_data, cap_memory, compose, device_name, ensure_prepared,  # noqa: E402
                          filtered_file, gpu_held_gib, gpu_peak_gib, library_versions, measurement_name,
                          model_flops_utilization, model_overrides, sample_shape, write_result)
from flare_exp.profiling import PROFILE_FIRST  # noqa: E402

PROFILE_STEPS = 2  # --profile: steps 6 and 7


def summarise(history: list[dict], skip: int, exclude_steps=()) -> dict:
    """Medians over the logged steps after the first `skip`, leaving out `exclude_steps` (profiled ones: the
    profiler slows them; with compile spikes they could outnumber the normal steps)."""
    steps = [h for h in history if "step_seconds" in h][skip:]
    steps = [h for h in steps if h.get("step") not in exclude_steps]
    if not steps:
        return {}
    med = lambda k: statistics.median(h[k] for h in steps if k in h)  # noqa: E731
    out = {"steps_measured": len(steps), "step_seconds_median": med("step_seconds"),
           "tokens_per_second_median": med("tokens_per_second") if any("tokens_per_second" in h for h in steps)
           else None, "peak_memory_gib": max(h.get("peak_memory_gib", 0) for h in steps),
           "data_wait_seconds_median": med("data_wait_seconds") if any("data_wait_seconds" in h for h in steps)
           else None}
    # the in-training evals (rl/sft.eval_steps), each on its own: the held-out decode + scoring, sft's eval loss
    # (a step's step_seconds includes them: compare with a run without evals)
    evals = {"heldout_eval_seconds": [h["heldout/eval_seconds"] for h in history if "heldout/eval_seconds" in h],
             "eval_loss_seconds": [h["eval_runtime"] for h in history if "eval_runtime" in h]}
    return {**out, **{k: v for k, v in evals.items() if v}}


def run_sft(args, work: Path) -> dict:
    import torch

    from flare_exp.main import run

    ensure_prepared(work, args.image_size)
    train = filtered_file(work, args.dataset, views=args.views, answer_words=args.answer_words,
                          long_side=args.long_side)
    name = measurement_name(args)
    forced = None
    if args.force_vision_encoder:
        from bench.loop import force_batched_vision_encoder

        forced = force_batched_vision_encoder()
    cfg = compose(["stage=sft", "experiment=flare", *bench_data(work), *model_overrides(args),
                   f"sft.train_file={train}", "sft.val_file=null", f"sft.max_steps={args.steps}",
                   f"sft.per_device_train_batch_size={args.batch}", "sft.gradient_accumulation_steps=1",
                   "sft.logging_steps=1", "sft.save_steps=100000", "sft.eval_steps=0", "sft.warmup_ratio=0",
                   "sft.learning_rate=1e-5", "sft.card_preset=none", *([] if args.workers is None else [f"sft.dataloader_num_workers={args.workers}"]),
                   f"sft.compile_layers={'true' if args.compile else 'false'}", "overwrite=true",
                   f"sft.profile_steps={PROFILE_STEPS if args.profile else 0}",
                   f"paths.output_root={work / 'out'}", *args.set])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run(cfg, run_dir=work / "runs" / name)
    history = json.loads((work / "runs" / name / "log_history.json").read_text())
    keep_profile(work / "runs" / name, args, name)
    profiled = range(PROFILE_FIRST + 1, PROFILE_FIRST + PROFILE_STEPS + 1)
    result = {"what": "sft", "backend": args.backend, "batch": args.batch, "dataset": args.dataset,
              "dataloader_workers": cfg.sft.dataloader_num_workers, "compiled_layers": args.compile,
              "wall_seconds": round(time.time() - t0, 1),
              **summarise(history, args.warmup, profiled if args.profile else ()),
              "peak_memory_gib_torch": gpu_peak_gib(),
              # every setting trains the same LoRA on the same batches: its first losses should agree
              "first_losses": [h["loss"] for h in history if "loss" in h][:4],
              # compilation shows in the first steps; a warm compile cache (a second run) shortens them
              "first_step_seconds": [h["step_seconds"] for h in history if "step_seconds" in h][:3],
              "first_grad_norms": [round(h["grad_norm"], 4) for h in history if "grad_norm" in h][:4]}
    summary = json.loads((work / "runs" / name / "sft_summary.json").read_text())
    if "recomputed_batches" in summary:  # sft.recompute_above_tokens: how many of the steps recomputed
        result["recomputed_batches"] = summary["recomputed_batches"]
    result["card_preset"] = summary.get("card_preset")  # what sft.card_preset changed on this card
    if forced is not None:
        result["vision_encoder_forced"] = forced[0]
    meta = Path(args.model_dir) / "bench_model.json"
    result["params"] = json.loads(meta.read_text())["params"] if meta.exists() else None  # None: not known
    result.update(model_flops_utilization(result["params"], result.get("tokens_per_second_median"), device_name(),
                                          args.peak_tflops))
    return result


class BatchLog(logging.Handler):
    """The infer stage's per-batch debug records (seconds, the graph loop's KV cache length), collected."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        stage_log = logging.getLogger("flare_exp.stages.infer")
        stage_log.setLevel(logging.DEBUG)
        stage_log.addHandler(self)

    def emit(self, record):
        if hasattr(record, "batch_seconds"):
            self.records.append(record)


def keep_profile(run_dir: Path, args, name: str) -> None:
    """The stage's profile.txt, copied beside the results as profile-<measurement>.txt."""
    import shutil

    if args.profile and (run_dir / "profile.txt").exists():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "profile.txt", Path(args.out) / f"profile-{name}.txt")


def run_grpo(args, work: Path) -> dict:
    """GRPO steps through the rl stage: fresh LoRA on the base model, IU_XRay-like prompts, reward=flare
    (tiny RadGraph), args.batch completions per step = args.batch / num_generations prompts."""
    from flare_exp.main import run

    ensure_prepared(work, args.image_size)
    name = measurement_name(args)
    cfg = compose(["stage=rl", "experiment=flare", *bench_data(work), *model_overrides(args),
                   f"rl.train_file={filtered_file(work, args.dataset, 1)}", f"rl.max_steps={args.steps}",
                   f"rl.num_generations={args.num_generations}", f"rl.per_device_train_batch_size={args.batch}",
                   f"rl.max_completion_length={args.completion_length}", "rl.logging_steps=1",
                   "rl.save_steps=100000", "rl.task_types=[report_generation]", "overwrite=true",
                   f"reward.radgraph.model_dir={work / 'cache' / 'radgraph'}", "reward.radgraph.build_tiny=true",
                   f"rl.cache_implementation={args.cache or 'dynamic'}",  # the baseline: TRL's own rollouts
                   f"rl.compile_generation={'true' if args.compile else 'false'}",
                   f"rl.profile_steps={PROFILE_STEPS if args.profile else 0}",
                   f"paths.output_root={work / 'out'}", *args.set])
    from bench.grpo_split import StepSplit

    t0 = time.time()
    with StepSplit() as split:
        summary = run(cfg, run_dir=work / "runs" / name)
    history = json.loads((work / "runs" / name / "log_history.json").read_text())
    keep_profile(work / "runs" / name, args, name)  # rollouts included: the decode steps' kernels
    profiled = range(PROFILE_FIRST + 1, PROFILE_FIRST + PROFILE_STEPS + 1) if args.profile else ()
    print("GRPO step split (s, median over the steps after the warm-up):", json.dumps(split.medians(args.warmup)))
    return {"what": "grpo", "step_split_seconds": split.medians(args.warmup), "backend": args.backend, "num_generations": args.num_generations,
            "cache": args.cache or "dynamic", "compiled_decode": args.compile, "decode_loop": summary["decode_loop"],
            "completions_per_step": args.batch, "completion_length": args.completion_length,
            "card_choice": summary.get("card_preset"), "wall_seconds": round(time.time() - t0, 1), "first_step_seconds": next(
                (h["step_seconds"] for h in history if "step_seconds" in h), None),
            **summarise(history, args.warmup, profiled)}


def run_infer(args, work: Path) -> dict:
    """Inference through the infer stage: two 512-px views + a question, args.new_tokens new tokens each
    (min_new_tokens forces the full length, so every report costs the same); or, with --length-mix flare,
    the demo's five datasets shuffled, each report ending at a length drawn for its task type (bench/lengths.py)."""
    import contextlib

    from flare_exp.main import run

    ensure_prepared(work, args.image_size)
    source = filtered_file(work, args.dataset, max(1, -(-args.samples // 64)))  # 64 demo records per dataset
    samples = args.samples
    forced = None
    if args.length_mix == "flare":
        from bench.lengths import ForcedLengths, mixed_file

        source, forced = mixed_file(work, samples), ForcedLengths(args.new_tokens)
    if args.long_side:  # one batch of large images first (infer sorts longest first), then the usual reports
        from flare_exp.io import read_jsonl, write_jsonl

        large = filtered_file(work, args.dataset, max(1, -(-args.batch // 64)), long_side=args.long_side)
        mixed = work / "data" / f"infer_{args.dataset}_long{args.long_side}x{args.batch}_then{samples}.jsonl"
        long_rows = [{**r, "id": f"{r['id']}-long{args.long_side}"} for r in read_jsonl(large)[:args.batch]]
        write_jsonl(mixed, long_rows + read_jsonl(source)[:samples])  # ids of their own: one prediction each
        source, samples = mixed, samples + args.batch
    name = measurement_name(args)
    overrides = ["stage=infer", "experiment=flare", *bench_data(work), *model_overrides(args),
                 f"infer.input_file={source}", f"infer.batch_size={args.batch}", f"infer.num_samples={samples}",
                 f"infer.max_new_tokens={args.new_tokens}", "overwrite=true", f"paths.output_root={work / 'out'}",
                 f"infer.sort_by_length={'false' if args.batch == 1 else 'true'}",
                 f"infer.image_device={args.image_device}"]
    overrides += [f"infer.cache_implementation={args.cache or 'dynamic'}",
                  # every report new_tokens long, either decode loop; or each its drawn length (the graph loop)
                  *([] if forced else [f"infer.min_new_tokens={args.new_tokens}"]),
                  f"infer.keep_long_cache={'true' if args.keep_long_cache else 'false'}", *args.set]
    import torch

    batches = BatchLog()
    held_after_warm = None
    with forced or contextlib.nullcontext():
        if args.warm:  # one untimed batch first: compilation (static cache) is not throughput
            run(compose([*overrides, f"infer.num_samples={args.batch}"]), run_dir=work / "runs" / (name + "-warm"))
            held_after_warm = gpu_held_gib()
            print("GPU memory held after the warm-up run (GiB):", held_after_warm)
        batches.records.clear()
        if forced:
            forced.reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        # the profile: the second batch of the timed run
        summary = run(compose([*overrides, *(["infer.profile_batch=2"] if args.profile else [])]),
                      run_dir=work / "runs" / name)
    keep_profile(work / "runs" / name, args, name)
    if forced and summary["decode_loop"] != "graph":
        raise SystemExit("--length-mix flare ends reports at their drawn lengths in the graph decode loop only: "
                         f"this run decoded with {summary['decode_loop']} (pass --cache static and "
                         "--set infer.decode_loop=graph)")
    return {"what": "infer", "length_mix": args.length_mix, **(forced.summary() if forced else {}), "generate_seconds_per_batch": [round(r.batch_seconds, 3) for r in batches.records],
            "backend": args.backend, "batch": args.batch, "batch_used": summary["batch_size"],
            "batch_choice": summary.get("batch_size_choice"), "cache": args.cache or "dynamic",
            "image_device": args.image_device, "peak_memory_gib": gpu_peak_gib(),
            "held_after_warm_gib": held_after_warm,
            "new_tokens": args.new_tokens, "samples": summary["samples"], "decode_loop": summary["decode_loop"],
            "loop_cache_lengths": [r.loop_cache_length for r in batches.records],
            "reports_per_second": summary["reports_per_second"], "wall_seconds": round(time.time() - t0, 1)}


def dynamo_counts() -> dict:
    """TorchDynamo's counters for the process: graphs, frames, and the reasons of any graph breaks."""
    import torch._dynamo

    counters = torch._dynamo.utils.counters
    return {kind: {str(k)[:300]: v for k, v in counters[kind].items()}
            for kind in ("stats", "frames", "graph_break", "unimplemented") if counters.get(kind)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["build", "sft", "loop", "grpo", "infer", "reward", "memory"])
    p.add_argument("--card-gib", type=float, default=None,
                   help="emulate a card of this many GiB: the process capped with torch.cuda."
                        "set_per_process_memory_fraction, and the stages size their settings for it")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--completion-length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--cache", default=None)
    p.add_argument("--warm", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="grpo: rl.compile_generation=true (needs --cache static); sft: sft.compile_layers=true")
    p.add_argument("--image-device", default="auto", help="infer: infer.image_device")
    p.add_argument("--workers", type=int, default=None, help="sft: sft.dataloader_num_workers (default: the stage's)")
    p.add_argument("--profile", action="store_true",
                   help="sft, grpo: torch.profiler over two steps (grpo: needs --steps >= 7); infer: one batch")
    p.add_argument("--radgraph-size", default="base", choices=["tiny", "base"], help="reward: the RadGraph's shapes")
    p.add_argument("--backend", default="hf", choices=["hf", "unsloth"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dataset", default="IU_XRay")
    p.add_argument("--views", type=int, default=None, help="sft/loop: keep only the first N images per sample")
    p.add_argument("--length-mix", default="forced", choices=["forced", "flare"],
                   help="infer: every report --new-tokens long (forced), or the five datasets shuffled, each report "
                        "ending at a length drawn for its task type, capped at --new-tokens (bench/lengths.py)")
    p.add_argument("--keep-long-cache", action="store_true",
                   help="infer: the graph loop keeps any cache long enough (no shrinking), to compare")
    p.add_argument("--long-side", type=int, default=None,
                   help="sft/loop: one S x S px image per sample instead (3424: ~11.4k tokens, the long case)")
    p.add_argument("--answer-words", type=int, default=None,
                   help="sft/loop: replace answers by N synthetic report words (1 view + 150 words: ~530 tokens "
                        "per sample, the bare-loop shape)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--grad-ckpt", default="true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override for the measured stage (repeatable; named in the result file)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the measured process, e.g. UNSLOTH_FUSED_LINEAR=0 (repeatable; "
                        "named in the result file)")
    p.add_argument("--vision-encoder", default="batched", choices=["batched", "per_image"],
                   help="model.vision_encoder")
    p.add_argument("--force-vision-encoder", action="store_true",
                   help="loop: then install the batched vision encoder even over another library's copy of "
                        "transformers' code (Unsloth's), compare the encoder's outputs, and time that too; sft: "
                        "the stage runs with it so installed (outputs compared first)")
    p.add_argument("--distinct-batches", action="store_true",
                   help="loop: a new batch (and token count) every step, as the stage sees them, instead of four "
                        "batches cycled")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="sft: the card's dense bf16 peak for MFU, where bench/common.py's table does not know it")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--model-dir", default="/tmp/flare_bench/qwen3vl-4b-random")
    p.add_argument("--work", default="/tmp/flare_bench")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    for setting in args.env:  # before anything imports the libraries that read them (Unsloth reads at import)
        key, sep, value = setting.partition("=")
        if not key or not sep:
            p.error(f"--env {setting!r}: expected KEY=VALUE, e.g. --env UNSLOTH_FUSED_LINEAR=0")
        os.environ[key] = value
    if args.what == "infer" and args.length_mix == "flare" and (args.samples % args.batch or args.long_side):
        p.error("--length-mix flare: --samples must be a multiple of --batch (a short last batch decodes with "
                "generate, where lengths are not forced), without --long-side")
    work = Path(args.work)
    if args.what == "build":
        from bench.model import build_qwen3vl_4b_random

        t0 = time.time()
        build_qwen3vl_4b_random(args.model_dir)
        print(f"built {args.model_dir} in {time.time() - t0:.0f} s")
        return
    if args.backend == "unsloth":
        # Before anything imports transformers (the stage modules patched below do): Unsloth patches at import
        # and warns "may run slower" otherwise, as launch.py's path (flare_exp.checks.preload_backend) avoids.
        from flare_exp.models.loading import require_unsloth

        require_unsloth()
    import torch

    if args.card_gib:
        cap_memory(args.card_gib)
    if args.what == "loop":
        from bench.loop import run_loop

        result = run_loop(args, work)
    elif args.what == "reward":
        from bench.reward import run_reward

        result = run_reward(args, work)
    elif args.what == "memory":
        from bench.card import run_memory

        result = run_memory(args, work)
    else:
        result = {"sft": run_sft, "grpo": run_grpo, "infer": run_infer}[args.what](args, work)
    if args.what in ("sft", "loop"):
        result["gradient_checkpointing"] = args.grad_ckpt != "false"
        result["samples"] = ", ".join([args.dataset] + [words for _, words in sample_shape(args)] + (
            ["a new batch every step"] if args.what == "loop" and args.distinct_batches else []))
    if args.what != "reward":
        result["vision_encoder"] = args.vision_encoder
        result["overrides"] = list(args.set) + [f"env {setting}" for setting in args.env]
    if args.what in ("grpo", "infer"):  # how the compiled decode step traced: one graph per step, or breaks
        result["dynamo"] = dynamo_counts()
    result.update(card_gib=args.card_gib, device=device_name(),
                  torch=torch.__version__, versions=library_versions(),
                  date=time.strftime("%Y-%m-%d %H:%M"))
    write_result(args.out, measurement_name(args), result, "BENCH")


if __name__ == "__main__":
    main()
