"""Two infer runs' predictions side by side, record by record (a lever that reorders or regroups the batches
must not change them: run both in float32 on the 4B-shaped model). Prints and writes
same-predictions-<name>.json: how many records, how many identical, the first few that differ, and whether both
files list the records in the same order.

    python3 -m bench.same_predictions RUN_DIR_A RUN_DIR_B --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def compare(a: Path, b: Path) -> dict:
    from flare_exp.io import read_jsonl

    rows_a, rows_b = read_jsonl(a / "predictions.jsonl"), read_jsonl(b / "predictions.jsonl")
    by_id = {r["id"]: r["prediction"] for r in rows_b}
    differ = [r["id"] for r in rows_a if by_id.get(r["id"]) != r["prediction"]]
    return {"a": str(a), "b": str(b), "records": len(rows_a), "identical": len(rows_a) - len(differ),
            "first_differing": differ[:5], "same_order": [r["id"] for r in rows_a] == [r["id"] for r in rows_b]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    from bench.common import write_result

    write_result(args.out, f"same-predictions-{args.b.name}", compare(args.a, args.b), "SAME")


if __name__ == "__main__":
    main()
