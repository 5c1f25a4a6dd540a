"""Which layers recompute their activations in the backward (gradient checkpointing), chosen per training pass.

transformers switches checkpointing on for every layer (GradientCheckpointingLayer) or every n-th, and TRL's
rollouts switch it off and on again around each generation, every layer back on; so the choice is applied to
the layers' flags right before each pass that trains: the layers read their flag at call time.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def checkpointed_layers(model) -> list:
    """The layers gradient_checkpointing_enable switched on, in the model's module order (transformers' count
    for every_n_layers: a vision-language model's vision blocks come first)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def recompute_only(layers: list, which) -> None:
    """``which(index) -> bool``: whether the index-th of ``layers`` recomputes."""
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = which(index)


def recompute_every(trainer_class, every_n_layers: int):
    """A trainer whose loss passes recompute every n-th of the checkpointed layers (n >= 2; the others keep their
    activations: more memory, no second forward through them)."""

    class EveryNthLayerRecomputes(trainer_class):
        checkpointed = None

        def compute_loss(self, model, *args, **kwargs):
            if model.training:
                if self.checkpointed is None:
                    self.checkpointed = checkpointed_layers(model)
                    said = sum(index % every_n_layers == 0 for index in range(len(self.checkpointed)))
                    log.info("every %dth layer recomputes: %d of the %d checkpointed layers in the backward, the "
                             "others keep their activations", every_n_layers, said, len(self.checkpointed))
                recompute_only(self.checkpointed, lambda index: index % every_n_layers == 0)
            return super().compute_loss(model, *args, **kwargs)

    return EveryNthLayerRecomputes
