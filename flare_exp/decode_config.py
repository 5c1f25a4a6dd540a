"""The schema's decoding keys, declared once: each config section that decodes (infer, rl, eval.green,
eval.crimson) takes them from here, and ``flare_exp.models.decoding.DecodeSettings.of`` reads them back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DecodeLoopConfig:
    # graph (backend=hf): one compiled step per token (model, mask, the greedy or sampled pick, stop flags; CUDA
    # graphs on a GPU) with a static KV cache, the host checking for the end every 16 tokens instead of waiting
    # on the GPU several times per token (flare_exp/models/graph_decoding.py). Same tokens as generate (tested),
    # faster on a GPU (docs/performance.md); the rollouts sample with TRL's temperature / top-k / top-p, caches
    # in steps of 256 tokens. generate: transformers' generate(). auto: graph where generate would run a
    # compiled static-cache step (backend=hf on a GPU; rl: no vLLM; a judge: where it allows the loop),
    # generate elsewhere.
    decode_loop: str = "auto"


@dataclass
class DecodingConfig(DecodeLoopConfig):
    # auto: a static KV cache (generate compiles its decode step into CUDA graphs) for backend=hf on a GPU, where
    # it is the faster one (docs/performance.md; the rollouts keep TRL's static cache on a CPU too, uncompiled);
    # dynamic elsewhere (Unsloth: TRL's defaults). static | dynamic | null (= dynamic).
    cache_implementation: Optional[str] = "auto"
