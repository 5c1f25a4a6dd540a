"""Turn a folder of bench/run.py results (*.json, *.jsonl) into the Markdown tables of docs/benchmarks.md.

    python -m bench.report bench/results/<date>-<card>/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.json*")):
        text = path.read_text()
        rows += [json.loads(l) for l in text.splitlines() if l.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
    return rows


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(rows: list[dict]) -> str:
    out = []
    sft = [r for r in rows if r["what"] == "sft"]
    if sft:
        out += ["### SFT (the sft stage, LoRA r=16, gradient checkpointing, IU_XRay-like: two 512-px views)", "",
                "| backend | batch | workers | tokens/s | MFU (6·N) | step s | data wait s/step | collate s in-process | "
                "peak GiB | device |", "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['backend']} | {r['batch']} | {r.get('dataloader_workers', 0)} | "
                f"{r.get('tokens_per_second_median', 0):,.0f} | {r.get('mfu', 0):.3f} | "
                f"{r.get('step_seconds_median', 0):.3f} | {_num(r.get('data_wait_seconds_median'), 3)} | "
                f"{r.get('collate_seconds_per_batch_in_process') or 'n/a'} | "
                f"{r.get('peak_memory_gib', 0)} | {r['device']} |" for r in sft]
        out.append("")
    inf = [r for r in rows if r["what"] == "infer"]
    if inf:
        out += ["### Inference (the infer stage, 128 new tokens forced, two 512-px views)", "",
                "| backend | batch | KV cache | image processing | reports/s | samples | device |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['backend']} | {r['batch']} | {r['cache']} | {r.get('image_device', 'cpu')} | "
                f"{r['reports_per_second']} | {r['samples']} | {r['device']} |"
                for r in sorted(inf, key=lambda r: (r['cache'], r['batch']))]
        out.append("")
    grpo = [r for r in rows if r["what"] == "grpo"]
    if grpo:
        out += ["### GRPO (the rl stage)", "",
                "| backend | generations | completions/step | rollouts | s/step (median) | first step s | peak GiB |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['backend']} | {r['num_generations']} | {r['completions_per_step']} | "
                f"{r.get('cache', 'dynamic')}{' + compiled decode' if r.get('compiled_decode') else ''} | "
                f"{_num(r.get('step_seconds_median'))} | {_num(r.get('first_step_seconds'))} | {r.get('peak_memory_gib')} |"
                for r in grpo]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(tables(load(Path(sys.argv[1]))))
