"""The card-sizing measurements: the per-token memory coefficients of flare_exp/card.py, and the card table.

    python -m bench.run memory [--set model.liger_kernel=true] --out DIR   # SFT: peak GiB per 1,000 tokens
    python -m bench.card DIR                                                 # coefficients + card table

``memory`` loads the 4B-shaped model once through the sft stage's own pieces (its trainer, loss and collator)
and trains single micro-batches of 1-16 IU_XRay-like samples, with and without recomputation, measuring the
peak GPU memory of each: the slope of peak over tokens is the coefficient (GRPO's passes use the recomputed one).
The report also fits infer's per-report memory from infer results at two batch sizes and the GREEN judge's from
bench/green.py's runs, and tabulates the sft/infer results by the card size they ran under (``--card-gib``: the
process capped with torch.cuda.set_per_process_memory_fraction, which emulates a card of that size).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MEMORY_BATCHES = {"kept": (1, 2, 4, 8), "recomputed": (2, 4, 8, 16)}


def slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of y over x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    s = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return s, my - s * mx


def run_memory(args, work: Path) -> dict:
    """Peak GiB of one SFT micro-batch (forward + backward through the stage's trainer) at several sizes,
    recomputed and not; the fitted GiB per 1,000 tokens of each."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    from bench.common import bench_data, compose, ensure_prepared, filtered_file, model_overrides
    from flare_exp.data.vision import VisionChat
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath
    from flare_exp.stages import sft
    from flare_exp.training import CheckpointMeta

    ensure_prepared(work, args.image_size)
    train_file = filtered_file(work, args.dataset)
    cfg = compose(["stage=sft", "experiment=flare", *bench_data(work), *model_overrides(args),
                   f"sft.train_file={train_file}", "sft.val_file=null", "sft.card_preset=none",
                   "sft.recompute_above_tokens=0", "sft.dataloader_num_workers=0", "sft.max_steps=1",
                   f"paths.output_root={work / 'out'}", *args.set])
    out_dir = work / "runs" / "memory"
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(cfg.model, init_from=None, training=True, seed=cfg.seed)
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    train, _, _ = sft.datasets(cfg, chat, out_dir)
    meta = CheckpointMeta(loaded.base_path, cfg, [], loaded.processor)
    trainer = sft.build_trainer(cfg, loaded, chat, train, None,
                                sft.training_args(cfg, out_dir, "none", loaded.model, evaluating=False), meta)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this probe bypasses
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    cuda = torch.cuda.is_available()
    base = torch.cuda.memory_allocated() / 2 ** 30 if cuda else None
    rows = []
    for mode, sizes in MEMORY_BATCHES.items():
        for size in sizes:
            for layer in layers:
                layer.gradient_checkpointing = mode == "recomputed" and cfg.model.gradient_checkpointing
            inputs = trainer.data_collator([train[i] for i in range(size)])
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2 ** 30 if cuda else None
            t0 = time.time()
            try:
                trainer.training_step(model, inputs)
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
            except torch.OutOfMemoryError:
                peak = "out of memory"
            model.zero_grad(set_to_none=True)
            rows.append({"mode": mode, "samples": size, "tokens": int(inputs["input_ids"].numel()),
                         "peak_gib": peak, "before_gib": before, "seconds": round(time.time() - t0, 2)})
            print("MEMORY", json.dumps(rows[-1]), flush=True)
    return {"what": "memory", "backend": args.backend, "batch": 0, "dataset": args.dataset,
            "weights_gib": base, "steps": rows, "fits": memory_fits(rows)}


def memory_fits(rows: list[dict]) -> dict:
    """{mode: {"gib_per_1k_tokens", "intercept_gib"}} from the probe's rows (numbers only)."""
    fits = {}
    for mode in MEMORY_BATCHES:
        points = [(r["tokens"] / 1000, r["peak_gib"]) for r in rows
                  if r["mode"] == mode and isinstance(r["peak_gib"], float)]
        fit = slope(points)
        if fit:
            fits[mode] = {"gib_per_1k_tokens": round(fit[0], 3), "intercept_gib": round(fit[1], 2)}
    return fits


def infer_fit(results: list[dict], prompt_tokens: int) -> dict | None:
    """infer's GiB per 1,000 tokens (prompt + new) from the peaks of runs at two or more batch sizes."""
    points = [(r["batch_used"] * (prompt_tokens + r["new_tokens"]) / 1000, r["peak_memory_gib"]) for r in results
              if r.get("what") == "infer" and r.get("batch_used") and r.get("peak_memory_gib")]
    fit = slope(points)
    return fit and {"gib_per_1k_tokens": round(fit[0], 3), "intercept_gib": round(fit[1], 2),
                    "prompt_tokens_assumed": prompt_tokens}


def green_fit(folder: Path) -> dict | None:
    """The GREEN judge's GiB per 1,000 tokens of a batch (batch x its longest row: prompt + new tokens, or an
    older run's max length) from bench/green.py's runs."""
    points = []
    for path in folder.glob("green*.json"):
        result = json.loads(path.read_text())
        for run in result.get("runs", []):
            match = re.search(r"batch (\d+)", run.get("way", ""))
            row = result.get("row_tokens") or result.get("max_length")
            if match and run.get("peak_gib") and row:
                points.append((int(match.group(1)) * row / 1000, run["peak_gib"]))
    fit = slope(points)
    return fit and {"gib_per_1k_tokens": round(fit[0], 3), "intercept_gib": round(fit[1], 2)}


def steady_reports_per_second(result: dict) -> float | None:
    """infer's reports/s in its full batches after the first (the first compiles), else the whole run's."""
    import statistics

    batches = result.get("generate_seconds_per_batch") or []
    full = batches[1:-1] if len(batches) > 2 else batches[1:]
    if not full or not result.get("batch_used"):
        return result.get("reports_per_second")
    return result["batch_used"] / statistics.median(full)


def card_table(results: list[dict]) -> list[str]:
    """SFT and infer rows by the card size they ran under, the settings the stage chose, side by side."""
    lines = ["| card (cap) | stage | settings | tokens/s or reports/s | peak GiB | first losses | why |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (-(r.get("card_gib") or 999), r["what"], r.get("wall_seconds", 0))):
        if r["what"] == "sft":
            preset = r.get("card_preset") or {}
            changed = preset.get("changed") or {}
            settings = ", ".join(f"{k.split('.')[-1]} {v[1]}" for k, v in changed.items()) or "as configured"
            speed, losses = r.get("tokens_per_second_median"), ", ".join(f"{x:.4f}" for x in r.get("first_losses", []))
            why = preset.get("why", "")
        elif r["what"] == "infer":
            choice = r.get("batch_choice") or {}
            settings = f"batch {r.get('batch_used')}" + (" (auto)" if choice.get("auto") else "")
            speed, losses, why = steady_reports_per_second(r), "", choice.get("why", "")
        else:
            continue
        speed_text = "n/a" if speed is None else f"{speed:,.1f}"
        lines.append(f"| {r.get('card_gib') or 'whole card'} | {r['what']} | {settings} | {speed_text} | "
                     f"{r.get('peak_memory_gib_torch') or r.get('peak_memory_gib')} | {losses} | {why} |")
    return lines


def main() -> None:
    from bench.report import load
    from flare_exp.card import MEMORY_MODEL

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out")
    results = load(folder)
    probe = [r for r in results if r["what"] == "memory"]
    coefficients = {"sft": probe[-1]["fits"] if probe else None, "sft_weights_gib": probe[-1]["weights_gib"]
                    if probe else None, "infer": infer_fit(results, MEMORY_MODEL["infer_prompt_tokens"]),
                    "green": green_fit(folder), "grpo": "the sft recomputed coefficient (its passes recompute)",
                    "in_use": MEMORY_MODEL}
    (folder / "card-coefficients.json").write_text(json.dumps(coefficients, indent=2))
    table = card_table(results)
    (folder / "card-table.md").write_text("\n".join(table) + "\n")
    print(json.dumps({k: v for k, v in coefficients.items() if k != "in_use"}, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
