"""Liger's Triton kernels for Qwen3-VL (``model.liger_kernel=true``, backend=hf, GPU only): its fused RMSNorm
(text layers and their q/k norms) and rotary embeddings (the text model's multimodal rope and the vision
tower's), patched into the loaded model. Its fused linear + cross-entropy is left out: the answer-position loss
(sft.answer_logits_only) already never builds the full logits, and GRPO computes its own log-probabilities."""
from __future__ import annotations

# the release pinned in pyproject's gpu extra: the newest; liger-kernel 0.7+ runs on transformers 5 only
LIGER_REQUIREMENT = "liger-kernel==0.8.5"


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
    apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, fused_linear_cross_entropy=False,
                                   cross_entropy=False, model=model)
