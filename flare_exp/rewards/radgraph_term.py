"""radgraph: the F1-RadGraph of a completion against the reference, at one level (RG_E, RG_ER or RG_ER_bar),
scored by :class:`flare_exp.metrics.radgraph_f1.RadGraphScorer` (eval's RadGraph metric)."""
from __future__ import annotations

from flare_exp.metrics.radgraph_f1 import DEFAULTS, LEVELS, RadGraphScorer


class RadGraphTerm:
    def __init__(self, model_dir=None, model_type: str = DEFAULTS.model_type, reward_level: str = DEFAULTS.reward_level,
                 cache_size: int = DEFAULTS.cache_size, use_cache: bool = True, build_tiny: bool = DEFAULTS.build_tiny,
                 device: str = DEFAULTS.device):
        if reward_level not in LEVELS:
            raise ValueError(f"radgraph reward_level={reward_level!r}: choose one of {', '.join(LEVELS)}")
        self.level = LEVELS[reward_level]
        self.scorer = RadGraphScorer(model_dir, model_type, cache_size, use_cache, build_tiny, device)

    def __call__(self, completions, answers, rows=None) -> list[float]:
        hyps = [c if isinstance(c, str) else "" for c in completions]
        return [s[self.level] for s in self.scorer.score_pairs(hyps, [str(a) for a in answers])]
