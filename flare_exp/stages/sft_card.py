"""sft.card_preset: the SFT speed settings sized by the card the run lands on (backend=hf).

``auto`` (the default) sizes them from the card's memory with flare_exp/card.py's rule and per-token memory
model (measured by the bench, docs/performance.md): the same effective batch (micro-batch x accumulation) split
into the largest micro-batch that fits, the token budget below which batches train without recomputation
(sft.recompute_above_tokens), Liger's kernels and compiled blocks with eager's bf16 rounding. None of them
changes what is trained: the same samples per optimizer step and the same losses within bf16 noise (measured and
listed in the performance doc). Without a GPU nothing changes. ``large`` forces the settings of the largest card
measured (an H200: 16 per micro-batch, budget 12,000; a GPU is needed); ``none`` keeps the configured values.
The fingerprint holds the configured values, so a resumed job may land on another card.
"""
from __future__ import annotations

import copy
import logging
from importlib.util import find_spec

from flare_exp.card import MEMORY_MODEL, SFT_CARD_PRESETS, Card, SftChoice, card_memory, divisors_up_to, sft_choice
from flare_exp.models.liger import LIGER_REQUIREMENT
from flare_exp.runtime import check_choice

log = logging.getLogger(__name__)

SETTINGS = SFT_CARD_PRESETS


def split_batch(effective: int, largest: int = MEMORY_MODEL["sft_largest_micro_batch"]) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for ``effective`` samples per device and optimizer step: the
    largest micro-batch of at most ``largest`` samples that divides it."""
    per_device = max(divisors_up_to(effective, largest))
    return per_device, effective // per_device


def largest_card_choice(effective: int) -> SftChoice:
    """sft.card_preset=large: the settings measured fastest on an H200, whatever the card."""
    per_device, accumulation = split_batch(effective)
    return SftChoice(per_device, accumulation, MEMORY_MODEL["sft_largest_budget"], "sft.card_preset=large")


def card_changes(cfg, choice: SftChoice, liger_installed: bool) -> dict[str, tuple]:
    """The keys ``choice`` changes in ``cfg``: {dotted key: (configured, new)}. It only speeds up: a micro-batch
    smaller than configured, recomputation where none was, etc. are left as configured."""
    sft, model, changes = cfg.sft, cfg.model, {}
    if choice.micro_batch > sft.per_device_train_batch_size:
        changes["sft.per_device_train_batch_size"] = (sft.per_device_train_batch_size, choice.micro_batch)
        changes["sft.gradient_accumulation_steps"] = (sft.gradient_accumulation_steps, choice.accumulation)
    if liger_installed and not model.liger_kernel:
        changes["model.liger_kernel"] = (False, True)
    if model.gradient_checkpointing and not sft.recompute_above_tokens and choice.budget:
        changes["sft.recompute_above_tokens"] = (0, choice.budget)
    if not sft.compile_layers:
        changes["sft.compile_layers"] = (False, True)
    return changes


def check_preset(cfg) -> None:
    """sft.card_preset's value, and that ``large`` has a GPU to apply to (checked with the other settings,
    before any work)."""
    check_choice("sft.card_preset", cfg.sft.card_preset, SETTINGS)
    if cfg.sft.card_preset != "large" or cfg.model.backend != "hf":
        return
    import torch  # only here: the other values need no torch to check (a sweep's launcher checks every job)

    if not torch.cuda.is_available():
        raise ValueError("sft.card_preset=large: the large-card settings (Liger's kernels, compiled blocks) need "
                         "a CUDA GPU; use sft.card_preset=auto or none on this machine")


def apply_card_preset(cfg):
    """``cfg`` with sft.card_preset applied (a copy when anything changes) and what was decided, as
    (cfg, {key: [configured, used]}, card or None, why); logged in one line. ``cfg`` passed check_preset."""
    from omegaconf import OmegaConf, read_write

    preset = cfg.sft.card_preset
    as_configured = preset == "none" or cfg.model.backend != "hf"
    card: Card | None = None if as_configured else card_memory()
    if card is None:
        why = (f"sft.card_preset={preset}, model.backend={cfg.model.backend}: as configured" if as_configured
               else "no GPU: as configured")
        log.info("sft.card_preset=%s: %s (%d x %d samples per step)", preset, why,
                 cfg.sft.per_device_train_batch_size, cfg.sft.gradient_accumulation_steps)
        return cfg, {}, None, why
    effective = cfg.sft.per_device_train_batch_size * cfg.sft.gradient_accumulation_steps
    choice = largest_card_choice(effective) if preset == "large" else sft_choice(card, effective)
    liger = find_spec("liger_kernel") is not None
    changes = card_changes(cfg, choice, liger)
    if not liger and not cfg.model.liger_kernel:
        log.info("sft.card_preset: liger-kernel is not installed, so Liger's kernels stay off (~1.3x of the "
                 "large-card speed-up; pip install %s)", LIGER_REQUIREMENT)
    why = f"{card}: {choice.rule}"
    if not changes:
        return cfg, {}, card, why
    used = copy.deepcopy(cfg)
    with read_write(used):
        for key, (_, new) in changes.items():
            OmegaConf.update(used, key, new, merge=False)
    log.info("sft.card_preset=%s on %s: %s (the same %d samples per optimizer step; sft.card_preset=none keeps "
             "the configured values)", preset, why, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()),
             effective)
    return used, {k: list(v) for k, v in changes.items()}, card, why
