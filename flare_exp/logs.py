"""Known-harmless library messages, filtered by their text (never all warnings): each is understood, and
none changes a result. Installed once per process by main.run."""
from __future__ import annotations

import logging
import warnings

# (warning text, module it comes from): Python warnings
HARMLESS_WARNINGS = (
    # transformers' Trainer copies its token count with torch.tensor(tensor) every step
    ("To copy construct from a tensor", "transformers.trainer"),
    # transformers orders checkpoints by number when a filesystem's mtimes are coarse (ours are numbered)
    ("mtime may not be reliable on this filesystem", "transformers.trainer"),
)
# (logger, text): library log records
HARMLESS_RECORDS = (
    # FLOPs estimate for a multimodal batch; we count tokens ourselves (ProgressLog)
    ("transformers.modeling_utils", "Could not estimate the number of tokens of the input"),
    ("absl", "Using default tokenizer"),  # rouge-score, at every scorer it builds
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_installed = False


def quiet_known_messages() -> None:
    global _installed
    if _installed:
        return
    for text, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}", module=module)
    for name, text in HARMLESS_RECORDS:
        logging.getLogger(name).addFilter(_DropText(text))
    _installed = True
