"""Qwen3-VL's multimodal rope positions computed by the SFT collator (``sft.rope_positions=collator``).

Given no position_ids, Qwen3-VL's forward builds them itself (``get_rope_index``) from the batch on the GPU, in a
Python loop over the samples and their images that reads tensors back to the host about 15 times per sample
(~240 synchronisations for a batch of 16 two-view samples, every step, before the language model's first
kernel). The positions depend on the token ids, the image grids and the padding only, so the collator computes
them with the model's own ``get_rope_index`` on the CPU tensors, in the data loader's workers, and hands them to
the forward, which then skips its own: the same positions (checked on the first batch), no synchronisation.
``model`` keeps transformers' way.
"""
from __future__ import annotations

import logging
import types

log = logging.getLogger(__name__)

SETTINGS = ("collator", "model")


class HostRopeIndex:
    """position_ids (3, batch, length) for a collated batch, by the model class's own ``get_rope_index`` run on
    a stand-in holding only the model's config and the class's position helper (``get_vision_position_ids``,
    which reads no weights): no weights travel to the data loader's workers."""

    def __init__(self, model_class, config):
        self.model_class, self.config = model_class, config

    def stand_in(self):
        owner = types.SimpleNamespace(config=self.config)
        helper = getattr(self.model_class, "get_vision_position_ids", None)
        if helper is not None:
            owner.get_vision_position_ids = types.MethodType(helper, owner)
        return owner

    def __call__(self, batch: dict):
        return rope_index(self.model_class.get_rope_index.__get__(self.stand_in()), batch)


def rope_index(get_rope_index, batch: dict):
    """The positions ``get_rope_index`` (a bound method) gives a processor batch (its mm_token_type_ids tell
    text, image and video tokens apart)."""
    positions, _ = get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                  image_grid_thw=batch.get("image_grid_thw"),
                                  video_grid_thw=batch.get("video_grid_thw"),
                                  attention_mask=batch.get("attention_mask"))
    return positions


def rope_owner(model):
    """The module whose forward builds the rope positions (Qwen3VLModel inside the PEFT / task wrappers)."""
    return next((m for m in model.modules() if callable(getattr(type(m), "get_rope_index", None))
                 and hasattr(m, "config")), None)


def host_rope_index(model, setting: str, sample_batch: dict | None = None):
    """A HostRopeIndex for the collator, or None (setting ``model``, or a model without multimodal rope).
    ``sample_batch`` (a collated batch on the CPU): the stand-in's positions are checked against the model
    module's own on it; a stand-in the model's code cannot run on falls back to ``model`` with a log line."""
    owner = rope_owner(model) if setting == "collator" else None
    if owner is None:
        return None
    rope = HostRopeIndex(type(owner), owner.config)
    if sample_batch is None:
        return rope
    import torch

    try:
        host = rope(sample_batch)
    except AttributeError as e:  # this transformers' get_rope_index reads more than the config
        log.info("sft.rope_positions=collator: the model's rope index needs more than its config (%s); the "
                 "forward computes the positions itself", e)
        return None
    own = rope_index(owner.get_rope_index, sample_batch)
    if not torch.equal(host, own.to(host.device)):
        raise RuntimeError("sft.rope_positions=collator: the collator's rope positions differ from the model's on "
                           "the first batch; rerun with sft.rope_positions=model")
    return rope
