"""How a stage decodes, decided in one place: transformers' ``generate`` or the graph decode loop
(``graph_decoding.py``), which KV cache, compiled or not, and what happens when the loop cannot follow a
generation config or its compilation fails.

infer (``infer.decode_loop``), GRPO's rollouts (``rl.decode_loop``) and the GREEN judge
(``eval.green.decode_loop``) call this module only:
- ``kv_cache(setting, backend, on_gpu)``: the cache implementation a setting resolves to;
- ``graph_loop_chosen(key, setting, backend, compiled_static_on_gpu)``: whether the graph loop runs at all;
- ``GraphLoop``: the loop for one stage's run; ``for_config`` gives the loop for a generation config, or None
  (said once) when the config asks for processing the loop does not do; ``run`` retries a failed compilation
  uncompiled; ``new_tokens`` decodes a batch (infer, the judge); ``generate`` answers a model's ``generate``
  call (TRL's rollouts); ``used`` names what ran.
"""
from __future__ import annotations

import logging

from flare_exp.models.graph_decoding import COMPILE_ON_GPU, GraphDecoder, sampling_of, unsupported_settings
from flare_exp.runtime import retry_uncompiled

log = logging.getLogger(__name__)

DECODE_LOOPS = ("auto", "generate", "graph")


def kv_cache(setting: str | None, backend: str, on_gpu: bool = True) -> str | None:
    """The KV cache a setting resolves to. auto: a static cache (generate compiles its decode step over it)
    for backend=hf where the model runs on a GPU; infer passes where its model is, the rl rollouts keep TRL's
    static cache on a CPU too (uncompiled there). dynamic / null: generate's dynamic cache."""
    if setting == "auto":
        return "static" if backend == "hf" and on_gpu else None
    return None if setting in (None, "dynamic") else setting


def graph_loop_chosen(key: str, setting: str, backend: str, compiled_static_on_gpu: bool) -> bool:
    """Whether ``key`` (infer.decode_loop / rl.decode_loop / eval.green.decode_loop) runs the graph loop.
    auto: where generate would run a compiled static-cache decode step (backend=hf on a GPU), where the loop
    was measured faster (docs/performance.md); generate elsewhere (Unsloth, CPU, a dynamic cache, compilation
    turned off). graph: the loop for backend=hf, compiled on a GPU only."""
    if setting == "auto":
        return backend == "hf" and compiled_static_on_gpu
    if setting == "graph" and backend != "hf":
        log.warning("%s=graph runs transformers' forward (backend=hf only): decoding with generate for "
                    "model.backend=%s", key, backend)
        return False
    return setting == "graph"


class GraphLoop:
    """The graph decode loop of one run, built on first use. ``compiled``: the token step compiled (on a GPU)
    until a compilation fails; ``loop_options``: GraphDecoder's cache policy (GRPO: caches in steps of 256
    tokens, never shrunk, since prompt lengths vary from step to step in random order)."""

    def __init__(self, key: str, compiled: bool, setting: str = "graph", **loop_options):
        self.key, self.setting, self.compiled, self.options = key, setting, compiled, loop_options
        self.loop: GraphDecoder | None = None
        self.fell_back = False

    def for_config(self, model, generation_config) -> GraphDecoder | None:
        """The loop for a resolved generation config, or None when the config asks for processing the loop
        does not do (a repetition penalty, min-p, ...): the caller then uses generate (said once)."""
        reasons = unsupported_settings(generation_config)
        if reasons:
            if not self.fell_back:
                log.warning("%s=%s: decoding with transformers' generate instead of the graph loop, because of %s",
                            self.key, self.setting, "; ".join(reasons))
                self.fell_back = True
            return None
        if self.loop is None:
            self.loop = GraphDecoder(model, COMPILE_ON_GPU if self.compiled else None,
                                     sampling=sampling_of(generation_config), **self.options)
            log.info("%s=%s: the graph loop, one %s step per token, a static KV cache", self.key, self.setting,
                     "compiled" if self.compiled else "uncompiled")
        return self.loop

    def uncompile(self) -> None:
        """The next loop is built uncompiled (a compilation failed)."""
        self.compiled, self.loop = False, None

    def run(self, call, what: str):
        """``call()``; a failed compilation turns compilation off and calls again, said once."""
        if not self.compiled:
            return call()
        return retry_uncompiled(call, self.uncompile, what, "continuing uncompiled.")

    def new_tokens(self, model, batch: dict, max_new_tokens: int, pad_token_id: int, generation_config, what: str):
        """The loop's new tokens for a left-padded batch under a resolved generation config (a failed
        compilation retried uncompiled), or None when the config sends the caller back to generate."""
        def decode():
            loop = self.for_config(model, generation_config)
            return None if loop is None else loop(batch, max_new_tokens, pad_token_id, generation_config)

        return self.run(decode, what)

    def generate(self, model, fallback, generation_config=None, **batch):
        """``model.generate(generation_config=..., **batch)`` answered by the loop with the config resolved as
        generate resolves it; ``fallback`` (the model's own generate) where the loop cannot follow it."""
        resolved, _ = model._prepare_generation_config(generation_config)
        loop = self.for_config(model, resolved)
        if loop is None:
            return fallback(generation_config=generation_config, **batch)
        return loop.generate(resolved, **batch)

    def release_cache(self) -> None:
        if self.loop is not None:
            self.loop.release_cache()

    @property
    def used(self) -> str:
        """What decoded: "graph", or "generate" once a config sent the loop back to generate."""
        return "generate" if self.fell_back else "graph"
