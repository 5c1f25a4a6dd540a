"""Liger's Triton kernels for Qwen3-VL (``model.liger_kernel=true``, backend=hf, GPU only): its fused RMSNorm
(text layers and their q/k norms) and rotary embeddings (the text model's multimodal rope and the vision
tower's), patched into the loaded model. Its fused linear + cross-entropy is left out: the answer-position loss
(sft.answer_logits_only) already never builds the full logits, and GRPO computes its own log-probabilities."""
from __future__ import annotations

# the release pinned in pyproject's gpu extra: the newest; liger-kernel 0.7+ runs on transformers 5 only
LIGER_REQUIREMENT = "liger-kernel==0.8.5"


# Liger patches this module's names (its RMSNorm class, the rotary functions) for the whole process, besides
# the norms of the model it is given; _ORIGINALS keeps transformers' names from before its first patch
PATCHED_MODULE = "transformers.models.qwen3_vl.modeling_qwen3_vl"
_ORIGINALS: dict = {}

GPU_ONLY = ("model.liger_kernel=true: Liger's kernels are written in Triton and run on a GPU only; pass "
            "model.liger_kernel=false on this machine")


def use_liger_kernels(model) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ValueError(GPU_ONLY)
    model_type = getattr(model.config, "model_type", None)
    if model_type != "qwen3_vl":
        raise ValueError(f"model.liger_kernel=true is wired for Qwen3-VL; this model is {model_type!r}")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    except ModuleNotFoundError as e:  # liger's own ImportErrors (a transformers it does not support) pass through
        raise ImportError(f"model.liger_kernel=true needs the liger-kernel package: pip install "
                          f"{LIGER_REQUIREMENT} (in the gpu extra; offline nodes: the wheelhouse has it)") from e
    remember_transformers_code()
    apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, fused_linear_cross_entropy=False,
                                   cross_entropy=False, model=model)


def remember_transformers_code() -> None:
    import importlib

    if not _ORIGINALS:
        _ORIGINALS.update(vars(importlib.import_module(PATCHED_MODULE)))


def restore_transformers_code() -> None:
    """transformers' own names back in the module Liger patched, before a model is built without Liger: a
    pipeline's rl and infer steps run in the process of its sft step, which the large-card preset trains with
    Liger, and would otherwise build their models with Liger's kernels (which broke the compiled decode step).
    Models built before keep their norms' kernels."""
    import importlib

    if not _ORIGINALS:
        return
    module = importlib.import_module(PATCHED_MODULE)
    for name, value in _ORIGINALS.items():
        if vars(module).get(name) is not value:
            setattr(module, name, value)
