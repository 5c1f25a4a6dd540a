"""The graph loop's prefill with the model's text decoder compiled (``infer.compile_prefill``, on a GPU).

The prefill is the model's own forward over the whole prompt. Eager, every decoder layer runs its RMSNorms,
rotary embedding and gated activation as separate small kernels; compiled, inductor fuses them. Only the text
decoder is compiled, with dynamic shapes (batch and prompt length vary): the vision encoder and the merging of
image features stay eager, since a compiled graph there would be specialised on each batch's number of images.

The text decoder is also what the compiled decode step runs, so the switch between the two lives on this object,
not on a module: the decoder's forward reads it, the decode step (traced with the switch off) keeps a guard on a
plain value, and turning it on for a prefill changes no module's attributes (which would re-trace the step).
"""
from __future__ import annotations

from contextlib import contextmanager

INSTALLED = "_flare_exp_compiled_prefill"  # the model attribute holding its CompiledPrefill


def text_decoder(model):
    """The module that runs the prompt's tokens through the decoder layers (Qwen3-VL: model.language_model);
    None for a model laid out otherwise."""
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", None)


class CompiledPrefill:
    """Installed once per model (``of``): its text decoder answers compiled while ``active()``, eager otherwise."""

    def __init__(self, decoder, backend: str = "inductor"):
        import torch

        eager = decoder.forward
        self.on = False
        self.compiled = torch.compile(eager, dynamic=True, backend=backend)  # no CUDA graphs: shapes vary

        def forward(*args, **kwargs):
            return self.compiled(*args, **kwargs) if self.on else eager(*args, **kwargs)

        decoder.forward = forward

    @classmethod
    def of(cls, model, backend: str = "inductor") -> "CompiledPrefill | None":
        """The model's switch (installed on first use, with torch.compile's ``backend``); None when it has no text
        decoder to compile."""
        found = getattr(model, INSTALLED, None)
        if found is None:
            decoder = text_decoder(model)
            if decoder is None:
                return None
            found = cls(decoder, backend)
            object.__setattr__(model, INSTALLED, found)  # not a submodule: a plain attribute
        return found

    @contextmanager
    def active(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False
