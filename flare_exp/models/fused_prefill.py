"""``model.fused_prefill`` (backend=hf, GPU): forwards that need no gradients and run eagerly (infer's and the
rollouts' prefill, the held-out evals' prefill) take RMSNorm, the rotary embedding and SiLU x up as compiled,
fused kernels.

Why: the eager prefill of a batch of 128 two-view reports spends ~0.5 s of its ~2 s in RMSNorm's separate cast,
pow, mean, rsqrt and multiply kernels (145 norms, each pass over all activations in float32), ~0.15 s in the
rotary embedding's cat and multiply-adds and ~0.13 s in SiLU and the gate product (docs/performance.md).
Compiling the whole text decoder for the prefill lost (a graph per prompt length, slower matmuls); here only
these functions are compiled, with dynamic shapes (a graph per tensor rank and dtype), the matmuls stay eager,
and inductor rounds to bf16 wherever eager does (``emulate_precision_casts``), so the results follow eager's
roundings (a reduction may sum in another order: float32 ulps).

Where the wrappers step aside for transformers' own code: inside a compiled region (the graph loop's decode step
traces the original forwards), with gradients on (training keeps its kernels: Liger's or transformers'), and for
tensors off the GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging

log = logging.getLogger(__name__)

# transformers' classes and modules whose forwards are the formulas below, op for op
NORM_CLASSES = ("Qwen3VLTextRMSNorm", "Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm")
MLP_CLASSES = ("Qwen3VLTextMLP", "Qwen3MLP", "Qwen2MLP", "LlamaMLP")
ROPE_MODULES = ("transformers.models.qwen3_vl.modeling_qwen3_vl", "transformers.models.qwen3.modeling_qwen3",
                "transformers.models.qwen2.modeling_qwen2", "transformers.models.llama.modeling_llama")
BACKEND = "inductor"  # the tests trace with "aot_eager" on a CPU
FUSED = "_flare_fused"  # on the rotary wrapper: the function it wraps
PAUSED = [False]  # paused(): transformers' own code everywhere (a reference to compare with)
FAILED = [False]  # a compilation failed in this process (another GPU, another torch): transformers' code from then on


def rms_norm(hidden, weight, eps: float):
    """transformers' RMSNorm: float32 statistics, the normalised value rounded to the input's dtype, times the
    weight."""
    import torch

    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def silu_times(gate, up):
    import torch

    return torch.nn.functional.silu(gate) * up


@functools.cache
def compiled(function):
    import torch

    options = {"emulate_precision_casts": True} if BACKEND == "inductor" else None
    return torch.compile(function, dynamic=True, backend=BACKEND, options=options)


def takes_fused(tensor) -> bool:
    """An eager forward without gradients on a GPU (see the module's docstring)."""
    import torch

    return (on_gpu(tensor) and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not PAUSED[0] and not FAILED[0])


def run_fused(function, *args, **kwargs):
    """``function`` compiled; if torch.compile fails (another GPU, another torch), said once, and transformers'
    own code from then on: the run goes on with the same results, slower."""
    from flare_exp.runtime import retry_uncompiled

    return retry_uncompiled(
        lambda: function(*args, **kwargs) if FAILED[0] else compiled(function)(*args, **kwargs),
        lambda: FAILED.__setitem__(0, True), f"model.fused_prefill's {function.__name__}",
        "the prefill runs transformers' own code from here on (the same results, slower)")


def on_gpu(tensor) -> bool:  # the tests count and force it on a CPU
    return tensor.is_cuda


def gpu_here() -> bool:  # the tests force it on a CPU
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def paused():
    """transformers' own norms, rotary embedding and MLPs while open (bench.same_tokens' reference)."""
    PAUSED[0] = True
    try:
        yield
    finally:
        PAUSED[0] = False


def fused_norm_forward(self, hidden_states):
    if takes_fused(hidden_states):
        return run_fused(rms_norm, hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def fused_mlp_forward(self, x):
    if takes_fused(x):
        return self.down_proj(run_fused(silu_times, self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def fused_rope(original):
    """``apply_rotary_pos_emb`` of a transformers module, compiled where ``takes_fused``."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if takes_fused(q):
            return run_fused(original, q, k, cos, sin, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, FUSED, original)
    return apply_rotary_pos_emb


def use_fused_prefill(model, on: bool) -> int:
    """Patch the model's norms and SiLU MLPs (instances) and its modules' rotary function (module-wide: the
    wrapper is transformers' function wherever it steps aside). Returns how many modules were patched."""
    import types

    if not on:
        return 0
    if not gpu_here():  # it fuses on a GPU only: transformers' code is left untouched (module-wide rope included)
        log.debug("model.fused_prefill=true: no GPU here, so transformers' own forwards run (it fuses on a GPU only)")
        return 0
    patched, modules = 0, set()
    for module in model.modules():
        name = type(module).__name__
        if "forward" in vars(module):  # patched already: by this function, or Liger's norms (kept)
            continue
        if name in NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(fused_norm_forward, module)
        elif name in MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"):
            module.forward = types.MethodType(fused_mlp_forward, module)
        else:
            continue
        patched += 1
        modules.add(type(module).__module__)
    for name in sorted(modules & set(ROPE_MODULES)):
        source = importlib.import_module(name)
        rope = getattr(source, "apply_rotary_pos_emb", None)
        if getattr(rope, "__module__", None) == name:  # transformers' own (not fused yet, not Liger's)
            source.apply_rotary_pos_emb = fused_rope(rope)
    log.info("model.fused_prefill=true: %d norms and MLPs fused in forwards without gradients", patched)
    return patched
