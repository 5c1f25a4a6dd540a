"""LoRA input casts only where they change something (``model.lora.input_cast=outside_autocast``, backend=hf).

PEFT keeps the LoRA weights of a bf16 model in float32 and casts every LoRA layer's input to float32 before
``lora_B(lora_A(x))``. Under autocast (the Trainer's bf16 mixed precision, in sft and in GRPO's loss) F.linear
casts that input straight back to bf16, so each of the ~350 LoRA layers of Qwen3-VL-4B copies its activation
twice more per forward (again in the recomputation under gradient checkpointing, and twice in backward) for a
bit-identical result: a large share of the copy kernels of an hf SFT step (the profile and its count are in
docs/performance.md). With ``outside_autocast`` a LoRA layer casts only when autocast is off (GRPO's rollouts,
evaluation): the same numbers everywhere (tested), fewer copies in training. ``always`` is PEFT's behaviour.
"""
from __future__ import annotations

SETTINGS = ("outside_autocast", "always")


class CastOutsideAutocast:
    """PEFT reads a LoRA layer's ``cast_input_dtype_enabled`` as a truth value on every call: true (cast the
    input to the LoRA weights' dtype) unless autocast is on, where F.linear casts it anyway."""

    def __bool__(self) -> bool:
        import torch

        return not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))

    def __repr__(self) -> str:
        return "CastOutsideAutocast()"


def use_lora_input_cast(model, setting: str) -> int:
    """Apply the setting to every PEFT layer that casts its input; returns how many layers changed."""
    if setting == "always":
        return 0
    flag, changed = CastOutsideAutocast(), 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = flag
            changed += 1
    return changed
