"""The sft stage's model and batches in a bare training loop: what the model itself costs per step, without the
Trainer, the DataLoader or collation (batches are built once, before timing, and kept on the GPU).

    python -m bench.run loop --backend hf --batch 8 --steps 10 --out bench_out/

Same model loading (flare_exp.models.loading.load_model: LoRA, gradient checkpointing, pixel budget) and the
same collator as `stage=sft`, AdamW on the trainable parameters. Two variants, one after the other in one
process: `autocast` (bf16 autocast around forward, as the Trainer does with bf16=True) and `plain` (no
autocast: the weights are already bf16). Stage tokens/s divided by loop tokens/s is the stage's overhead.
"""
from __future__ import annotations

import time

from bench.common import bench_data, compose, ensure_prepared, filtered_file, gpu_peak_gib, model_overrides


def timed_steps(model, optimizer, batches: list[dict], steps: int, warmup: int, autocast: bool) -> dict:
    import contextlib

    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seconds, tokens = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        amp = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with amp:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the Trainer's per-step sync (logging) as well
        sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
            tokens.append(int(batch["attention_mask"].sum()))
    import statistics

    # Medians, as for the stage (bench.run.summarise): one slow step (an allocator or autotuning hiccup) must
    # not decide the comparison.
    return {"step_seconds_median": round(statistics.median(seconds), 4),
            "tokens_per_second_median": round(statistics.median(t / s for t, s in zip(tokens, seconds)), 1),
            "tokens_per_second_mean": round(sum(tokens) / sum(seconds), 1),
            "peak_memory_gib": gpu_peak_gib()}


def run_loop(args, work) -> dict:
    import torch

    from flare_exp.data.vision import SFTCollator, VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    ensure_prepared(work, args.image_size)
    cfg = compose(["stage=sft", "experiment=flare", *bench_data(work), *model_overrides(args), *args.set])
    loaded = load_model(cfg.model, training=True, seed=cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = loaded.model.to(device)
    model.train()
    records = read_jsonl(filtered_file(work, args.dataset, views=args.views, answer_words=args.answer_words,
                                       long_side=args.long_side))
    collate = SFTCollator(VisionChat(loaded.processor, abspath(cfg.data.root)))
    t0 = time.perf_counter()
    # Four batches, cycled: after the warm-up every shape has been seen (kernel plans, compiled graphs, the
    # allocator's blocks). --distinct-batches: a new batch for every step of each variant, as the stage sees them
    # (its batches' token counts differ from step to step).
    per_variant = args.warmup + args.steps if args.distinct_batches else 4
    n_batches = 2 * per_variant if args.distinct_batches else per_variant
    batches = [{k: v.to(device) for k, v in collate(records[i * args.batch:(i + 1) * args.batch]).items()}
               for i in range(n_batches)]
    collate_seconds = (time.perf_counter() - t0) / n_batches
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device == "cuda")
    result = {"what": "loop", "backend": args.backend, "batch": args.batch, "dataset": args.dataset,
              "collate_seconds_per_batch": round(collate_seconds, 4),
              "tokens_per_batch": int(batches[0]["attention_mask"].sum()),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for k, variant in enumerate(("autocast", "plain")):
        own = batches[k * per_variant:(k + 1) * per_variant] if args.distinct_batches else batches
        result[variant] = timed_steps(model, optimizer, own, args.steps, args.warmup, variant == "autocast")
    if args.force_vision_encoder:
        result["vision_encoder_forced"] = forced_vision_encoder(model, batches[0])
        result["autocast, vision encoder batched (forced)"] = timed_steps(model, optimizer, batches, args.steps,
                                                                          args.warmup, True)
    return result


def forced_vision_encoder(model, batch: dict) -> dict:
    """Install the batched vision encoder over whatever code the model runs now (Unsloth rewrites transformers'
    modules), after checking that the encoder's outputs stay the same on one batch."""
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from flare_exp.models.vision_encoder import use_batched_vision_encoder

    encoder = next(m for m in model.modules() if isinstance(m, Qwen3VLVisionModel))
    attention_code = type(encoder.blocks[0].attn).forward.__code__.co_filename

    def encode():
        with torch.no_grad(), torch.autocast(batch["pixel_values"].device.type, dtype=torch.bfloat16):
            out = encoder(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        # the merged image features: a tuple's first item (transformers 4), pooler_output (5)
        return (out[0] if isinstance(out, tuple) else out.pooler_output).float()

    before = encode()
    changed = use_batched_vision_encoder(model, "batched", replace_foreign=True)
    after = encode()
    relative = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if relative > 0.05:
        raise RuntimeError(f"the forced batched vision encoder changes the outputs (max relative {relative:.3g}); "
                           f"the model's attention code is {attention_code}")
    return {"attention_code": attention_code, "modules_changed": changed, "max_relative_difference": relative}


def force_batched_vision_encoder() -> list[dict]:
    """sft --force-vision-encoder: the stage's model gets the batched vision encoder even over another library's
    copy of transformers' code (Unsloth's, which keeps the per-image attention), after the loop's output check
    on two random 512-px images. Returns the check (filled when the model loads)."""
    import types

    import torch

    from flare_exp.models import loading, vision_encoder

    checks: list[dict] = []

    def install(model, setting: str) -> int:
        if setting != "batched":
            return 0
        config = model.config.vision_config
        grid = torch.tensor([[1, 32, 32]] * 2, device=model.device)
        patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        pixels = torch.randn(int(grid.prod(-1).sum()), patch, device=model.device)
        checks.append(forced_vision_encoder(model, {"pixel_values": pixels, "image_grid_thw": grid}))
        return checks[-1]["modules_changed"]

    loading.vision_encoder = types.SimpleNamespace(SETTINGS=vision_encoder.SETTINGS,
                                                   use_batched_vision_encoder=install)
    return checks
