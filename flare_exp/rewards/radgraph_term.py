"""radgraph: F1-RadGraph through the real ``radgraph`` package (0.1.18).

One scorer per process (loading it costs seconds), inputs lower-cased (0.1.18 matches entity tokens
case-sensitively), identical (hyp, ref) pairs scored once, and results cached across GRPO steps (the same
reference meets the same short answers again and again). Weights load from a local dir: nothing downloads.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from flare_exp.rewards import register

log = logging.getLogger(__name__)
LEVELS = {"RG_E": 0, "RG_ER": 1, "RG_ER_bar": 2}
_SCORERS: dict = {}


def check_model_dir(model_dir, model_type: str, key: str = "reward.radgraph.model_dir") -> Path:
    if not model_dir:
        raise FileNotFoundError(
            f"{key} is not set. Download the RadGraph weights on a machine with internet "
            f"(StanfordAIMI/RRG_scorers, file {model_type}.tar.gz), unpack it to DIR/{model_type}/ (config.json, "
            f"vocabulary/, weights.th), make the BERT encoder named in its config.json local, and pass {key}=DIR")
    path = Path(model_dir)
    if not (path / model_type / "weights.th").exists():
        raise FileNotFoundError(f"{key}={path}: no {model_type}/weights.th there. Unpack {model_type}.tar.gz "
                                f"(StanfordAIMI/RRG_scorers) into {path / model_type}/")
    return path


def get_scorer(model_dir, model_type: str):
    """One F1RadGraph per (dir, type) per process."""
    key = (str(model_dir), model_type)
    if key not in _SCORERS:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from radgraph import F1RadGraph

        log.info("loading RadGraph %s from %s", model_type, model_dir)
        _SCORERS[key] = F1RadGraph(reward_level="all", model_type=model_type, model_cache_dir=str(model_dir),
                                   cuda=-1)
    return _SCORERS[key]


class RadGraphScorer:
    """(RG_E, RG_ER, RG_ER_bar) per (hyp, ref) pair, batched, de-duplicated and cached."""

    def __init__(self, model_dir, model_type: str = "radgraph-xl", cache_size: int = 100000, use_cache=True,
                 build_tiny: bool = False):
        if build_tiny and model_dir and not (Path(model_dir) / model_type / "weights.th").exists():
            from flare_exp.models.tiny_radgraph import build_tiny_radgraph

            log.info("building a tiny random RadGraph at %s (reward.radgraph.build_tiny=true)", model_dir)
            build_tiny_radgraph(model_dir, model_type)
        self.model_dir = check_model_dir(model_dir, model_type)
        self.model_type = model_type
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size if use_cache else 0

    def score_pairs(self, hyps: list[str], refs: list[str]) -> list[tuple[float, float, float]]:
        pairs = [(h.strip().lower(), r.strip().lower()) for h, r in zip(hyps, refs)]
        todo = [p for p in pairs if p not in self.cache and p[0] and p[1]]
        if self.cache_size:  # without the cache every pair is scored, duplicates too (for comparison)
            todo = list(dict.fromkeys(todo))
        results = dict()
        if todo:
            _, lists, _, _ = get_scorer(self.model_dir, self.model_type)(refs=[r for _, r in todo],
                                                                         hyps=[h for h, _ in todo])
            for i, pair in enumerate(todo):
                results[pair] = (float(lists[0][i]), float(lists[1][i]), float(lists[2][i]))
        out = []
        for pair in pairs:
            if not pair[0] or not pair[1]:
                out.append((0.0, 0.0, 0.0))
                continue
            value = results.get(pair) or self.cache[pair]
            if self.cache_size:
                self.cache[pair] = value
                self.cache.move_to_end(pair)
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
            out.append(value)
        return out


@register("radgraph")
class RadGraphTerm:
    def __init__(self, model_dir=None, model_type: str = "radgraph-xl", reward_level: str = "RG_ER",
                 cache_size: int = 100000, use_cache: bool = True, build_tiny: bool = False):
        if reward_level not in LEVELS:
            raise ValueError(f"radgraph reward_level={reward_level!r}: choose one of {', '.join(LEVELS)}")
        self.level = LEVELS[reward_level]
        self.scorer = RadGraphScorer(model_dir, model_type, cache_size, use_cache, build_tiny)

    def __call__(self, completions, answers, rows=None) -> list[float]:
        hyps = [c if isinstance(c, str) else "" for c in completions]
        return [s[self.level] for s in self.scorer.score_pairs(hyps, [str(a) for a in answers])]
