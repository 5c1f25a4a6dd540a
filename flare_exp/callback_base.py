"""The base of the stages' Trainer callbacks, without importing transformers' trainer.

transformers' own TrainerCallback lives in a module that imports the trainer's stack (torch, accelerate, peft:
~8 s of a 2-core node's time), and the modules that define our callbacks are also imported by the settings
checks that a sweep's launcher runs for every job before it submits any (on a login node, without a GPU). The
Trainer needs no base class: its CallbackHandler calls ``getattr(callback, "on_<event>")(args, state, control,
**kwargs)`` for each event and keeps a result that is not None as the new control. This base answers every event
a callback does not define with nothing, as TrainerCallback's own empty methods do."""
from __future__ import annotations


def _nothing(*args, **kwargs) -> None:
    return None


class TrainerCallback:
    """Subclass it and define the ``on_<event>`` methods you need; the others do nothing."""

    def __getattr__(self, name: str):
        if name.startswith("on_"):  # an event this callback has no method for (new transformers add some)
            return _nothing
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
