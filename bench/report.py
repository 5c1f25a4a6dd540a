"""Turn a folder of bench/run.py results (*.json, *.jsonl) into the Markdown tables of docs/performance.md.

    python -m bench.report bench/results/<date>-<card>/
"""
from __future__ import annotations

import json
from statistics import median
import sys
from pathlib import Path

from flare_exp.reports.tables import md_table


def load(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.json*")):
        text = path.read_text()
        rows += [json.loads(l) for l in text.splitlines() if l.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
    return [r for r in rows if "what" in r]  # other JSON kept alongside (a smoke run's metrics) is not a result


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _yes(flag) -> str:
    return "yes" if flag else "no"


def section(title: str, columns: list[str], rows: list[list]) -> list[str]:
    """A Markdown table under a heading; nothing when there are no rows."""
    if not rows:
        return []
    return [f"### {title}", "", *md_table(columns, rows)]


def loop_tokens_per_second(row: dict, variant: str) -> float:
    """Median tokens/s of a bench/loop.py variant (results before it stored the median: tokens per batch
    over the median step time)."""
    v = row[variant]
    return v.get("tokens_per_second_median") or row["tokens_per_batch"] / v["step_seconds_median"]


def _setup(r: dict) -> list:
    """The columns every SFT and loop row starts with: what was trained, and how."""
    return [r.get("samples", r["dataset"]), r["backend"], r["batch"], _yes(r.get("gradient_checkpointing", True)),
            r.get("vision_encoder", "per_image")]


SETUP = ["samples", "backend", "batch", "grad ckpt", "vision encoder"]


def _settings(r: dict) -> str:
    """The config overrides (--set) and environment variables (--env) a measurement ran with."""
    return ", ".join(r.get("overrides") or []) or "-"


def _mfu(r: dict) -> str:
    """MFU as measured, or "unknown" where it was not (no parameter count, an unknown card): never a 0."""
    return "unknown" if r.get("mfu") is None else f"{r['mfu']:.3f}"


def sft_row(r: dict) -> list:
    return [*_setup(r), r.get("dataloader_workers", 0), _yes(r.get("compiled_layers")),
            f"{r.get('tokens_per_second_median', 0):,.0f}", _mfu(r),
            f"{r.get('step_seconds_median', 0):.3f}", _num(r.get("data_wait_seconds_median"), 3),
            r.get("collate_seconds_per_batch_in_process") or "n/a", r.get("peak_memory_gib", 0),
            ", ".join(f"{loss:.3f}" for loss in r.get("first_losses") or []) or "n/a", _settings(r), r["device"]]


def loop_row(r: dict) -> list:
    variants = [x for v in ("autocast", "plain") for x in (
        f"{loop_tokens_per_second(r, v):,.0f}", r[v]["step_seconds_median"], r[v]["peak_memory_gib"])]
    forced = r.get("autocast, vision encoder batched (forced)")
    forced = f"{forced['tokens_per_second_median']:,.0f} (max rel. diff {r['vision_encoder_forced']['max_relative_difference']:.1e})" if forced else "-"
    return [*_setup(r), r["tokens_per_batch"], *variants, forced, r["device"]]


def answer_lengths(r: dict) -> str:
    """forced N (every report N new tokens), or the FLARE mix with the share of row-steps spent idle."""
    if r.get("length_mix") == "flare":
        idle = r.get("idle_row_share")
        return "flare mix" + ("" if idle is None else f", {idle:.0%} of row-steps idle")
    return f"forced {r.get('new_tokens', 128)}"


def provenance(rows: list[dict]) -> list[str]:
    """Which cards and library versions the results came from (one line per distinct set; results written
    before versions were recorded name torch only)."""
    seen = {}
    for r in rows:
        versions = r.get("versions") or ({"torch": r["torch"]} if r.get("torch") else {})
        line = (f"{r.get('device', 'unknown device')}: "
                + ", ".join(f"{name} {version}" for name, version in versions.items()))
        seen[line] = seen.get(line, 0) + 1
    lines = [f"- {line} ({count} result{'s' if count > 1 else ''})" for line, count in seen.items()]
    return ["Measured on:", "", *lines, ""] if lines else []


def tables(rows: list[dict]) -> str:
    of = lambda what: [r for r in rows if r["what"] == what]  # noqa: E731
    out = provenance(rows)
    out += section("SFT (the sft stage, LoRA r=16; IU_XRay samples: two 512-px views and a short section answer)",
                  [*SETUP, "workers", "compiled blocks", "tokens/s", "MFU (6·N)", "step s", "data wait s/step",
                   "collate s in-process", "peak GiB", "first losses", "other settings", "device"],
                  [sft_row(r) for r in of("sft")])
    out += section("SFT model cost in a bare loop (bench/loop.py: same model and batches, no Trainer/collation)",
                   [*SETUP, "tokens/batch", "autocast: tokens/s (median)", "step s", "peak GiB",
                    "no autocast: tokens/s (median)", "step s", "peak GiB",
                    "autocast, batched vision encoder forced over the model's own: tokens/s", "device"],
                   [loop_row(r) for r in of("loop")])
    out += section("Inference (the infer stage, two 512-px views; new tokens forced, or the FLARE mix of lengths)",
                   ["backend", "batch", "KV cache", "decode loop", "answer lengths", "image processing",
                    "vision encoder", "reports/s",
                    "s per batch (median)", "peak GiB", "samples", "other settings", "device"],
                   [[r["backend"], r["batch"], r["cache"], r.get("decode_loop", "generate"), answer_lengths(r),
                     r.get("image_device", "cpu"),
                     r.get("vision_encoder", "per_image"), r["reports_per_second"],
                     _num(median(r.get("generate_seconds_per_batch") or [None])), r.get("peak_memory_gib") or "n/a",
                     r["samples"], _settings(r),
                     r["device"]] for r in sorted(of("infer"), key=lambda r: (r["cache"], r["batch"]))])
    out += section("GRPO (the rl stage)",
                   ["backend", "generations", "completions/step", "rollouts", "s/step (median)", "first step s",
                    "peak GiB", "split s: rollout / old+ref log-probs / reward / loss forward / backward / other",
                    "other settings"],
                   [[r["backend"], r["num_generations"], r["completions_per_step"],
                     r.get("cache", "dynamic") + (" + compiled decode" if r.get("compiled_decode") else "")
                     + (" + graph loop" if r.get("decode_loop") == "graph" else ""),
                     _num(r.get("step_seconds_median")), _num(r.get("first_step_seconds")), r.get("peak_memory_gib"),
                     " / ".join(_num(v) for v in (r.get("step_split_seconds") or {}).values()) or "n/a", _settings(r)]
                    for r in of("grpo")])
    out += section("Reward (reward=flare on report completions, RadGraph of radgraph-xl's shapes, random weights)",
                   ["RadGraph device", "path", "completions", "generations per reference", "completions/s",
                    "device"],
                   [[row["device"], row["path"], r["completions"], r["num_generations"],
                     row["completions_per_second"], r["device"]] for r in of("reward") for row in r["rows"]])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(tables(load(Path(sys.argv[1]))))
