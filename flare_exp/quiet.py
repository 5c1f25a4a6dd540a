"""GPU-only library messages, each either one line the user can act on or nothing (installed by the GPU stages'
setup, flare_exp/compile_cache.prepare_gpu_run). flare_exp/logs.py holds the messages every run shares."""
from __future__ import annotations

import logging
import re
import warnings

from flare_exp.logs import _DropText

# Python warnings nobody running the stages can act on (text, what it is)
SILENCED_WARNINGS = (
    # RadGraph's reader, once per parsed report with a one-word sentence ("Normal."): it parses them all the same
    ("has a sentence with a single token or no tokens", "radgraph"),
    # torch's TF32 hints: the stages compute in bf16/fp16; their few float32 matmuls are not worth TF32's rounding
    ("TensorFloat32 tensor cores for float32 matrix multiplication", "torch"),
    ("new API settings to control TF32", "torch"),
    # inductor, compiling a softmax over the vocabulary (the decode loop's pick): a note to torch's developers
    ("Online softmax is disabled on the fly", "torch._inductor"),
    # a dependency's TorchScript decorator, met once at the first training step
    ("`torch.jit.script_method` is deprecated", "torch.jit"),
)
# (logger, text) of log records nobody can act on
SILENCED_RECORDS = (("torch._inductor.compile_fx", "TensorFloat32 tensor cores"),)
RECOMPILE_LOGGER = "torch._dynamo.convert_frame"


class RecompileLimitOnce(logging.Filter):
    """torch's "hit config.recompile_limit" warning (one per compiled function, many lines each), as one line
    the first time, saying what to do; later ones dropped (the function just runs uncompiled)."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "hit config.recompile_limit" not in message and "hit config.cache_size_limit" not in message:
            return True
        self.seen += 1
        if self.seen > 1:
            return False
        function = next((line.strip() for line in message.splitlines() if "function:" in line), "")
        record.msg, record.args = (
            "compiled code met more shapes than torch recompiles for (%s); it runs uncompiled from here on: "
            "the same results, slower. If this is sft's compiled blocks, sft.compile_layers=false skips "
            "compiling; TORCH_LOGS=recompiles says why", function or "a compiled function")
        return True


_installed = False


def quiet_gpu_messages() -> None:
    """Install the filters above once per process."""
    global _installed
    if _installed:
        return
    for text, _ in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=f"(?s).*{re.escape(text)}")  # inductor's begins with a newline
    for name, text in SILENCED_RECORDS:
        logging.getLogger(name).addFilter(_DropText(text))
    logging.getLogger(RECOMPILE_LOGGER).addFilter(RecompileLimitOnce())
    _installed = True
