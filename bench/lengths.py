"""The benchmark's answer-length mix (``bench.run infer --length-mix flare``): reports that end at different
lengths, as real answers do, instead of every report forced to full length.

The input mixes the demo's five datasets (report generation, multi-label, classification, regression) in a
shuffled order, as a FLARE split comes. Each record's answer length (new tokens, end token included) is drawn
from a log-normal per task type, capped at ``--new-tokens``; the random model never picks its end token, so
the graph loop ends each row at its drawn length (``GraphDecoder``'s ``row_limits``), exactly where a
trained model would have ended it. The medians follow the answers' formats in FLARE Task 5's X-ray part (a
findings/impression report, a few labels, one label or option, a number); the spreads are guesses, stated as
such in docs/performance.md. Both rows of a comparison draw the same lengths (seeded per record id).
"""
from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

# task type: (median new tokens, log-normal sigma)
FLARE_ANSWER_TOKENS = {"report_generation": (70, 0.45), "multi_label": (10, 0.5), "classification": (4, 0.3),
                       "regression": (4, 0.2)}
OTHER_TASK = (8, 0.5)


def answer_length(record_id: str, task_type: str, cap: int) -> int:
    """The record's drawn answer length, 1..cap, the same for the same id."""
    median, sigma = FLARE_ANSWER_TOKENS.get(task_type, OTHER_TASK)
    draw = random.Random(record_id).lognormvariate(math.log(median), sigma)
    return max(1, min(cap, round(draw)))


def mixed_file(work: Path, samples: int) -> Path:
    """``samples`` records of every dataset the demo has, shuffled (seed 0), ids made unique per repeat."""
    from flare_exp.io import read_jsonl, write_jsonl

    out = work / "data" / f"infer_flare_mix_{samples}.jsonl"
    if not out.exists():
        rows = read_jsonl(work / "data" / "prepared" / "train.jsonl")
        repeated = [{**r, "id": f"{r['id']}#{k}"} for k in range(-(-samples // len(rows))) for r in rows]
        random.Random(0).shuffle(repeated)
        write_jsonl(out, repeated[:samples])
    return out


class ForcedLengths(contextlib.AbstractContextManager):
    """While open, the infer stage's graph loop ends each row at its record's drawn length; it counts the
    decode steps each batch took and the row-steps spent on rows already finished (idle)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.reset()
        self._limits: list[int] | None = None

    def __enter__(self):
        from flare_exp.models.batch_decoding import Decoder
        from flare_exp.models.graph_decoding import GraphDecoder

        self._patched = [(Decoder, "_loop_decode", Decoder._loop_decode), (GraphDecoder, "__call__", GraphDecoder.__call__)]
        original_decode, original_call = Decoder._loop_decode, GraphDecoder.__call__

        def loop_decode(decoder, records, images):  # the batch's records, however its input was built
            self._limits = [answer_length(r["id"], r["task_type"], self.cap) for r in records]
            return original_decode(decoder, records, images)

        def call(loop, batch, max_new_tokens, pad_token_id, generation_config=None, row_limits=None, positions=None):
            limits = self._limits if row_limits is None else row_limits
            tokens = original_call(loop, batch, max_new_tokens, pad_token_id, generation_config, limits, positions)
            self.steps.append(tokens.shape[1])
            self.useful_row_steps += sum(min(n, tokens.shape[1]) for n in limits)
            self.idle_row_steps += tokens.shape[1] * len(limits) - sum(min(n, tokens.shape[1]) for n in limits)
            return tokens

        Decoder._loop_decode, GraphDecoder.__call__ = loop_decode, call
        return self

    def __exit__(self, *exc):
        for owner, name, original in self._patched:
            setattr(owner, name, original)
        return False

    def reset(self) -> None:
        """Counting starts again (after an untimed warm-up run)."""
        self.steps, self.idle_row_steps, self.useful_row_steps = [], 0, 0

    def summary(self) -> dict:
        total = self.idle_row_steps + self.useful_row_steps
        return {"decode_steps_per_batch": list(self.steps),
                "idle_row_share": round(self.idle_row_steps / total, 4) if total else None,
                "answer_tokens": self.useful_row_steps}
