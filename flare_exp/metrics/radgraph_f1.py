"""F1-RadGraph through the real ``radgraph`` package (0.1.18), shared by eval's metric and the radgraph reward term.

One scorer per process (loading it costs seconds), inputs lower-cased (0.1.18 matches entity tokens
case-sensitively). The package parses both reports of every pair, one report at a time; here each distinct
report is parsed once and its graph kept (a GRPO group's completions share one reference, which returns every
epoch), and the package's own ``compute_reward`` scores the pairs from the graphs: the same numbers as
``F1RadGraph`` (tested). ``device=auto`` parses on the job's GPU when it has one. Weights load from a local
dir: nothing downloads.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from flare_exp.reward_config import RadGraphConfig
from flare_exp.runtime import cpu_rng_kept

log = logging.getLogger(__name__)
DEFAULTS = RadGraphConfig()  # reward.radgraph's defaults, the one place they are written
LEVELS = {"RG_E": 0, "RG_ER": 1, "RG_ER_bar": 2}  # each level's place in a score triple
_SCORERS: dict = {}


# What RadGraph sees of a report: its BERT encoder reads 512 word pieces, about MAX_WORDS words of a report;
# an absurd prediction (100 KB of text) otherwise costs tens of GB and minutes in its span enumeration.
MAX_WORDS = 384
MAX_CHARS = 4000


def cut_report(text: str) -> str:
    """The first MAX_WORDS words (at most MAX_CHARS characters) of a report, stripped."""
    return " ".join(str(text).split()[:MAX_WORDS])[:MAX_CHARS].strip()


def is_cut(text: str) -> bool:
    return cut_report(text) != " ".join(str(text).split())


def check_model_dir(model_dir, model_type: str, key: str = "reward.radgraph.model_dir") -> Path:
    if not model_dir:
        raise FileNotFoundError(
            f"{key} is not set. Download the RadGraph weights on a machine with internet "
            f"(StanfordAIMI/RRG_scorers, file {model_type}.tar.gz), unpack it to DIR/{model_type}/ (config.json, "
            f"vocabulary/, weights.th), make the BERT encoder named in its config.json local, and pass {key}=DIR"
            + (" (or export FLARE_EXP_RADGRAPH=DIR, which the reward configs read)" if key.startswith("reward.")
               else ""))
    path = Path(model_dir)
    if not (path / model_type / "weights.th").exists():
        raise FileNotFoundError(f"{key}={path}: no {model_type}/weights.th there. Unpack {model_type}.tar.gz "
                                f"(StanfordAIMI/RRG_scorers) into {path / model_type}/")
    return path


def radgraph_device(setting: str, key: str = "reward.radgraph.device") -> int:
    """radgraph's ``cuda`` argument: a GPU index, or -1 for the CPU."""
    import torch

    if setting == "auto":
        return 0 if torch.cuda.is_available() else -1
    if setting == "cpu":
        return -1
    if setting == "cuda" or (setting.startswith("cuda:") and setting[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={setting}: no CUDA GPU here; use auto or cpu")
        return int(setting[5:] or 0) if setting != "cuda" else 0
    raise ValueError(f"{key}={setting!r}: choose auto, cpu, cuda or cuda:N")


def get_scorer(model_dir, model_type: str, device: str = "auto"):
    """One F1RadGraph per (dir, type, device) per process."""
    cuda = radgraph_device(device)
    key = (str(model_dir), model_type, cuda)
    if key not in _SCORERS:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from radgraph import F1RadGraph

        from flare_exp.metrics.radgraph_tokenizer import supply_radgraph_tokenizer_methods

        supply_radgraph_tokenizer_methods()
        log.info("loading RadGraph %s from %s on %s", model_type, model_dir, "cpu" if cuda < 0 else f"cuda:{cuda}")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Using device: ..." (said above)
            _SCORERS[key] = F1RadGraph(reward_level="all", model_type=model_type, model_cache_dir=str(model_dir),
                                       cuda=cuda)
    return _SCORERS[key]


def _remember(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


class RadGraphScorer:
    """(RG_E, RG_ER, RG_ER_bar) per (hyp, ref) pair: each distinct report parsed once and its graph cached.
    use_cache=False scores every pair through F1RadGraph itself (the package's path, for comparison)."""

    def __init__(self, model_dir, model_type: str = DEFAULTS.model_type, cache_size: int = DEFAULTS.cache_size,
                 use_cache=True, build_tiny: bool = DEFAULTS.build_tiny, device: str = DEFAULTS.device):
        if build_tiny and model_dir and not (Path(model_dir) / model_type / "weights.th").exists():
            from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph

            log.info("building a tiny random RadGraph at %s (reward.radgraph.build_tiny=true)", model_dir)
            build_tiny_radgraph(model_dir, model_type)
        self.model_dir = check_model_dir(model_dir, model_type)
        self.model_type, self.device = model_type, device
        radgraph_device(device)  # a bad setting fails here, before any training starts
        self.graphs: OrderedDict = OrderedDict()  # report -> its RadGraph annotation
        self.cache_size = cache_size if use_cache else 0

    def _scorer(self):
        return get_scorer(self.model_dir, self.model_type, self.device)

    def graphs_of(self, reports: list[str]) -> dict:
        import torch

        new = list(dict.fromkeys(r for r in reports if r not in self.graphs))
        # radgraph never turns gradients off (each parse would record a graph); loading and parsing draw from
        # torch's random state, as many draws as the process's caches decide: training's draws stay its own
        with torch.no_grad(), cpu_rng_kept():
            parsed = self._scorer().radgraph(new) if new else {}
        found = {}
        for report in reports:
            if report in self.graphs:
                found[report] = self.graphs[report]
                self.graphs.move_to_end(report)  # least recently used goes first
        for i, report in enumerate(new):
            # radgraph prints a traceback and leaves out a report it cannot parse: no entities, F1 0
            graph = parsed.get(str(i)) or {"entities": {}}
            found[report] = graph
            _remember(self.graphs, report, graph, self.cache_size)
        return found

    def score_pairs(self, hyps: list[str], refs: list[str]) -> list[tuple[float, float, float]]:
        pairs = [(cut_report(h).lower(), cut_report(r).lower()) for h, r in zip(hyps, refs)]
        scored = [p for p in pairs if p[0] and p[1]]
        if not scored:
            return [(0.0, 0.0, 0.0)] * len(pairs)
        if not self.cache_size:
            import torch

            with torch.no_grad(), cpu_rng_kept():
                _, lists, _, _ = self._scorer()(refs=[r for _, r in scored], hyps=[h for h, _ in scored])
            values = iter(zip(*lists))
            return [tuple(map(float, next(values))) if p[0] and p[1] else (0.0, 0.0, 0.0) for p in pairs]
        from radgraph.rewards import compute_reward

        graphs = self.graphs_of([text for pair in scored for text in pair])
        return [tuple(float(v) for v in compute_reward(graphs[h], graphs[r], "all")) if h and r else (0.0, 0.0, 0.0)
                for h, r in pairs]
