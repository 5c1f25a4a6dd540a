"""How a stage decodes, decided in one place: transformers' ``generate`` or the graph decode loop
(``graph_decoding.py``), which KV cache, compiled or not, and what happens when the loop cannot follow a
generation config or its compilation fails.

infer (``infer.*``), GRPO's rollouts (``rl.*``) and the judges (``eval.green.*``, ``eval.crimson.*``) call
this module only, each the same way: ``decoder_for(model, DecodeSettings.of(section, its config))``, then
the ``Decoding`` it returns decodes (``new_tokens``: the graph loop's tokens, or None for generate;
``attempt_compiled``: a generate call retried uncompiled when its compilation fails; ``used``: what ran).
Inside:
- ``kv_cache(setting, backend, on_gpu)``: the cache implementation a setting resolves to;
- ``graph_loop_chosen(key, setting, backend, compiled_static_on_gpu)``: whether the graph loop runs at all;
- ``GraphLoop``: the loop for one stage's run; ``for_config`` gives the loop for a generation config, or None
  (said once) when the config asks for processing the loop does not do; ``run`` retries a failed compilation
  uncompiled; ``new_tokens`` decodes a batch (infer, the judge); ``generate`` answers a model's ``generate``
  call (TRL's rollouts); ``used`` names what ran.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from flare_exp.models.graph_decoding import COMPILE_ON_GPU, GraphDecoder, sampling_of, unsupported_settings
from flare_exp.runtime import check_choice, retry_uncompiled

log = logging.getLogger(__name__)

DECODE_LOOPS = ("auto", "generate", "graph")


def kv_cache(setting: str | None, backend: str, on_gpu: bool = True) -> str | None:
    """The KV cache a setting resolves to. auto: a static cache (generate compiles its decode step over it)
    for backend=hf where the model runs on a GPU; infer passes where its model is, the rl rollouts keep TRL's
    static cache on a CPU too (uncompiled there). dynamic / null: generate's dynamic cache."""
    if setting == "auto":
        return "static" if backend == "hf" and on_gpu else None
    return None if setting in (None, "dynamic") else setting


def check_cache_implementation(key: str, setting) -> None:
    """auto, null, or a KV cache transformers' generate knows (its own list): a typo would otherwise stop the
    stage at its first generate, after the steps before it ran."""
    if setting in ("auto", None, "static", "dynamic"):
        return  # the usual ones, without importing transformers before any work
    from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

    if setting not in ALL_CACHE_IMPLEMENTATIONS:
        raise ValueError(f"{key}={setting!r}: choose auto, null (dynamic) or one of transformers' caches: "
                         f"{', '.join(ALL_CACHE_IMPLEMENTATIONS)}")


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

    def new_tokens(self, model, batch: dict, max_new_tokens: int, pad_token_id: int, generation_config, what: str,
                   positions=None):
        """The loop's new tokens for a left-padded batch under a resolved generation config (a failed
        compilation retried uncompiled), or None when the config sends the caller back to generate.
        ``positions``: the batch's prompt positions where computed ahead."""
        def decode():
            loop = self.for_config(model, generation_config)
            return None if loop is None else loop(batch, max_new_tokens, pad_token_id, generation_config,
                                                  positions=positions)

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


@dataclass(frozen=True)
class DecodeSettings:
    """How one stage asks to decode, as its config section says it (the keys users type stay in their
    sections: infer.decode_loop, rl.decode_loop, eval.green.decode_loop, ...). ``compile``: rl.compile_generation
    (None: a static cache's step is compiled with backend=hf; the graph loop compiles on a GPU unless it is
    false). ``static_on_cpu``: auto keeps a static cache off the GPU too (TRL's rollouts, uncompiled there).
    ``vllm``: another engine decodes (rl.use_vllm): auto never takes the loop. ``refusal``: why the loop
    cannot decode this model (a judge's layers), None when it can. ``cache_multiple`` / ``shrink_cache``: the
    loop's cache policy, ``shared_prefix`` its reading of the prompts' common beginning (GraphDecoder)."""
    section: str
    decode_loop: str = "auto"
    cache_implementation: str | None = "auto"
    backend: str = "hf"
    compile: bool | None = None
    static_on_cpu: bool = False
    vllm: bool = False
    refusal: str | None = None
    cache_multiple: int = 1
    shrink_cache: bool = True
    shared_prefix: bool = False
    off_switch: str = "cache_implementation=dynamic"  # the setting that skips compiling, named when it fails

    @classmethod
    def of(cls, section: str, node, backend: str = "hf", **options) -> "DecodeSettings":
        """The settings of a config section (infer, rl, eval.green, eval.crimson: its decode_loop, and where
        it has them cache_implementation, compile_generation, use_vllm)."""
        switch = ("compile_generation=false" if hasattr(node, "compile_generation") else
                  "cache_implementation=dynamic" if hasattr(node, "cache_implementation") else "decode_loop=generate")
        return cls(section, node.decode_loop, getattr(node, "cache_implementation", "auto"), backend,
                   getattr(node, "compile_generation", None), vllm=bool(getattr(node, "use_vllm", False)),
                   off_switch=switch, **options)

    @property
    def key(self) -> str:
        return f"{self.section}.decode_loop"

    def check(self) -> None:
        """The settings' own errors, before any model loads."""
        check_choice(self.key, self.decode_loop, DECODE_LOOPS)
        if self.decode_loop == "graph" and self.vllm:
            raise ValueError(f"{self.key}=graph decodes with the policy, {self.section}.use_vllm=true with vLLM: "
                             f"pass one of them ({self.key}=auto picks generate's path when vLLM is on)")
        if self.decode_loop == "graph" and self.refusal:
            raise ValueError(f"{self.key}=graph: the graph decode loop cannot decode this model, because of "
                             f"{self.refusal}; use auto or generate")
        self.generate_settings(on_gpu=True)

    def generate_settings(self, on_gpu: bool) -> tuple[str | None, bool]:
        """(the KV cache generate runs with, whether its static-cache step is compiled), "auto" resolved."""
        cache = kv_cache(self.cache_implementation, self.backend, on_gpu or self.static_on_cpu)
        compiled = self.compile if self.compile is not None else self.backend == "hf" and cache == "static"
        if compiled and cache != "static":
            raise ValueError(f"{self.section}.compile_generation=true compiles the decode step over a fixed-size "
                             f"KV cache: also pass {self.section}.cache_implementation=static")
        return cache, compiled


class Decoding:
    """How one stage decodes on its model (``decoder_for``): ``cache`` / ``compiled`` for generate, ``graph``
    the graph loop (None: generate decodes)."""

    def __init__(self, model, settings: DecodeSettings, on_gpu: bool):
        self.model, self.settings = model, settings
        self.cache, self.compiled = settings.generate_settings(on_gpu)
        chosen = settings.refusal is None and graph_loop_chosen(
            settings.key, settings.decode_loop, settings.backend,
            on_gpu and self.compiled and self.cache == "static" and not settings.vllm)
        self.graph = GraphLoop(settings.key, on_gpu and settings.compile is not False, settings.decode_loop,
                               cache_multiple=settings.cache_multiple,
                               shrink_cache=settings.shrink_cache,
                               shared_prefix=settings.shared_prefix) if chosen else None

    @property
    def loop(self) -> GraphDecoder | None:
        """The graph loop that decodes, or None (generate)."""
        return None if self.graph is None or self.graph.fell_back else self.graph.loop

    @property
    def takes_loop(self) -> bool:
        """Whether batches go to the graph loop (it was chosen and no config sent it back to generate)."""
        return self.graph is not None and not self.graph.fell_back

    @property
    def used(self) -> str:
        """What decoded: "graph", or "generate"."""
        return self.graph.used if self.graph is not None else "generate"

    def new_tokens(self, batch: dict, max_new_tokens: int, pad_token_id: int, generation_config, what: str,
                   positions=None):
        """The graph loop's new tokens for a left-padded batch, or None: the caller decodes with generate."""
        if self.graph is None:
            return None
        return self.graph.new_tokens(self.model, batch, max_new_tokens, pad_token_id, generation_config, what,
                                     positions)

    def attempt_compiled(self, call, what: str, also_off=None):
        """``call()``: a decode (generate with ``cache`` / ``compiled``, or a caller's that reaches the graph
        loop, as TRL's rollouts do); a failed compilation turns compilation off for the rest of the run (and
        ``also_off()``: a caller's own switch) and calls again, said once."""
        compiling = (self.graph is not None and self.graph.compiled) or (self.cache == "static" and self.compiled)
        if not compiling:
            return call()

        def uncompile():
            self.compiled = False
            if self.graph is not None:
                self.graph.uncompile()
            if also_off is not None:
                also_off()

        return retry_uncompiled(call, uncompile, what, f"continuing uncompiled. Pass {self.settings.section}."
                                f"{self.settings.off_switch} to skip the attempt.")

    def release_cache(self) -> None:
        if self.graph is not None:
            self.graph.release_cache()


def decoder_for(model, settings: DecodeSettings, on_gpu: bool | None = None) -> Decoding:
    """How ``model`` decodes under a stage's settings (checked here); ``on_gpu``: where it runs (default: the
    model's device; a trainer's policy may be moved there later)."""
    settings.check()
    return Decoding(model, settings, model.device.type == "cuda" if on_gpu is None else on_gpu)
