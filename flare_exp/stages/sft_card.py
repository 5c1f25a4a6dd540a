"""sft.card_preset: the SFT speed settings chosen by the card the run lands on (backend=hf).

On a card with at least LARGE_CARD_GIB of memory (an H200's 141 GB) the settings measured fastest there
replace the small-card ones (docs/performance.md): the same effective batch in one micro-batch of up to 16
samples instead of 4 x 4 accumulated, Liger's kernels, no recomputation for batches of up to 12,000 tokens
(longer ones, large images, recompute), compiled blocks with eager's bf16 rounding. None of them changes what
is trained: the same samples per optimizer step and the same losses within bf16 noise (measured and listed in
the performance doc). ``auto`` picks them by the card, ``large`` always (a GPU is needed), ``none`` keeps the
configured values. The fingerprint holds the configured values, so a resumed job may land on another card.
"""
from __future__ import annotations

import copy
import logging
from importlib.util import find_spec

from flare_exp.models.liger import LIGER_REQUIREMENT
from flare_exp.runtime import check_choice

log = logging.getLogger(__name__)

SETTINGS = ("auto", "large", "none")
LARGE_CARD_GIB = 96  # batch 16 of two 512-px views without recomputation peaks at ~86 GiB on an H200
LARGE_BATCH = 16
LARGE_TOKEN_BUDGET = 12000  # ~9 MiB of activations per token: ~110 GiB on top of the weights


def split_batch(effective: int, largest: int = LARGE_BATCH) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for ``effective`` samples per device and optimizer step: the
    largest micro-batch of at most ``largest`` samples that divides it."""
    per_device = max(d for d in range(1, min(effective, largest) + 1) if effective % d == 0)
    return per_device, effective // per_device


def large_card_changes(cfg, liger_installed: bool) -> dict[str, tuple]:
    """The keys the large-card preset changes in ``cfg``: {dotted key: (configured, new)}. It only speeds up:
    a micro-batch smaller than configured, recomputation where none was, etc. are left as configured."""
    sft, model, changes = cfg.sft, cfg.model, {}
    per_device, accumulation = split_batch(sft.per_device_train_batch_size * sft.gradient_accumulation_steps)
    if per_device > sft.per_device_train_batch_size:
        changes["sft.per_device_train_batch_size"] = (sft.per_device_train_batch_size, per_device)
        changes["sft.gradient_accumulation_steps"] = (sft.gradient_accumulation_steps, accumulation)
    if liger_installed and not model.liger_kernel:
        changes["model.liger_kernel"] = (False, True)
    if model.gradient_checkpointing and not sft.recompute_above_tokens:
        changes["sft.recompute_above_tokens"] = (0, LARGE_TOKEN_BUDGET)
    if not sft.compile_layers:
        changes["sft.compile_layers"] = (False, True)
    return changes


def check_preset(cfg) -> None:
    """sft.card_preset's value, and that ``large`` has a GPU to apply to (checked with the other settings,
    before any work)."""
    import torch

    check_choice("sft.card_preset", cfg.sft.card_preset, SETTINGS)
    if cfg.sft.card_preset == "large" and cfg.model.backend == "hf" and not torch.cuda.is_available():
        raise ValueError("sft.card_preset=large: the large-card settings (Liger's kernels, compiled blocks) need "
                         "a CUDA GPU; use sft.card_preset=auto or none on this machine")


def large_card() -> str | None:
    """'NAME (N GiB)' of this process's CUDA card if it has >= LARGE_CARD_GIB, else None (no GPU, smaller)."""
    import torch

    if not torch.cuda.is_available():
        return None
    card = torch.cuda.get_device_properties(torch.cuda.current_device())
    gib = card.total_memory / 2 ** 30
    return f"{card.name} ({gib:.0f} GiB)" if gib >= LARGE_CARD_GIB else None


def apply_card_preset(cfg):
    """``cfg`` with sft.card_preset applied (a copy when anything changes) and what changed, as
    ({key: [configured, used]}, card); the changes are logged in one line. ``cfg`` passed check_preset."""
    import torch
    from omegaconf import OmegaConf, read_write

    preset = cfg.sft.card_preset
    if preset == "none" or cfg.model.backend != "hf":
        return cfg, {}, None
    card = large_card()
    if preset == "auto" and card is None:
        return cfg, {}, None
    card = card or torch.cuda.get_device_name()
    liger = find_spec("liger_kernel") is not None
    changes = large_card_changes(cfg, liger)
    if not liger and not cfg.model.liger_kernel:
        log.info("sft.card_preset: liger-kernel is not installed, so Liger's kernels stay off (~1.3x of the "
                 "large-card speed-up; pip install %s)", LIGER_REQUIREMENT)
    if not changes:
        return cfg, {}, card
    used = copy.deepcopy(cfg)
    with read_write(used):
        for key, (_, new) in changes.items():
            OmegaConf.update(used, key, new, merge=False)
    log.info("sft.card_preset=%s on %s: %s (the same %d samples per optimizer step; sft.card_preset=none keeps "
             "the configured values)", preset, card, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()),
             cfg.sft.per_device_train_batch_size * cfg.sft.gradient_accumulation_steps)
    return used, {k: list(v) for k, v in changes.items()}, card
