"""What a person reads in a run's log. Known-harmless library messages, filtered by their text (never all
warnings): each is understood, and none changes a result. Log lines that never land in the middle of a progress
bar. The short summary a finished run ends with. Installed once per process by main.run."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

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
    # rl's default pair (importance_sampling_level=sequence, loss_type=dr_grpo; why: RLConfig in config.py): our
    # steps are on-policy, where the pair's gradient is token-level Dr. GRPO's, not the objective TRL warns of
    ("trl.trainer.grpo_trainer", "the `'dr_grpo'` loss sums per-token contributions"),
    # the Trainer copies the tokenizer's PAD/BOS/EOS into the model's configs at every rl run (Qwen3-VL's
    # top-level config has none); it keeps every EOS the generation config had, and the decoding reads the same
    # ids from the tokenizer, so nothing a run decodes or trains changes
    ("transformers.trainer_utils", "The tokenizer has new PAD/BOS/EOS tokens"),
    # the model card PEFT writes beside a saved adapter starts without a YAML block; ours (write_model_cards)
    # replaces it, so the empty card data read on the way is never used
    ("huggingface_hub.repocard", "Repo card metadata block was not found"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_installed = False


def quiet_other_ranks() -> None:
    """Under torchrun every rank runs the same code and logged every line once per rank: rank 0 alone says what
    happens (INFO); the others say their warnings and errors (a rank may have its own)."""
    import os

    from flare_exp.runtime import world_size

    if world_size() > 1 and os.environ.get("RANK", "0") not in ("", "0"):  # torchrun's, or SLURM's adopted
        logging.getLogger("flare_exp").setLevel(logging.WARNING)


def quiet_known_messages() -> None:
    global _installed
    for handler in logging.getLogger().handlers:  # each job's (Hydra configures the logging per job)
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, BarSafeStream):
            handler.setStream(BarSafeStream(handler.stream))  # the console, not the job's log file
    if _installed:
        return
    for text, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}", module=module)
    for name, text in HARMLESS_RECORDS:
        logging.getLogger(name).addFilter(_DropText(text))
    _installed = True


class BarSafeStream:
    """A console stream whose lines clear the open progress bars first and redraw them after, so that a log
    line never starts in the middle of a bar (the bars write to stderr, the log to stdout: one terminal)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str):
        from tqdm import tqdm

        if not tqdm._instances:
            return self.stream.write(text)
        try:
            with tqdm.external_write_mode(file=self.stream):
                return self.stream.write(text)
        except RuntimeError as e:
            # A signal's SystemExit (submitit's preemption exit, SLURM's SIGTERM) raised while tqdm took its two
            # locks makes tqdm release one it never held; that RuntimeError would replace the exit, and logging
            # swallows RuntimeErrors: the job would train on after its requeue. The exit goes on instead.
            if isinstance(e.__context__, (SystemExit, KeyboardInterrupt)):
                raise e.__context__ from None
            raise

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def log_part(key: str, value: float) -> str:
    """``key value`` of a training log line, the number to 4 significant digits; float noise around zero (GRPO's
    on-policy loss is 0 up to rounding) reads 0, not -0 or -9.313e-10. A learning rate of 0 (the Trainer logs the
    rate the step used: a linear warmup's first step, a decay's end) is said, not left to look like a bug."""
    text = "0" if abs(value) < 1e-8 else f"{value:.4g}"
    if key == "learning_rate" and text == "0":
        text += " (a linear warmup starts at 0, a decay ends there: this step changes no weight)"
    return f"{key} {text}"


def run_summary(eval_dir: Path) -> str:
    """The official table of an evaluation (FLARE's numbers, one column per run), as plain aligned text: what a
    finished run prints; report.md / report.html hold the rest."""
    from flare_exp.reports.eval_report import caveat_lines, official_table

    metrics = eval_dir / "metrics.json"
    if not metrics.exists():
        return ""
    results = json.loads(metrics.read_text())
    header, rows = official_table(results)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    compared = eval_dir / "significance.json"  # runs side by side that were not scored alike (splits, inputs)
    warnings = json.loads(compared.read_text()).get("warnings", []) if compared.is_file() else []
    caveats = caveat_lines(results, warnings)  # why a number reads 0, Infinity or n/a, as the report says it
    return "\n".join(lines + (["caveats:", *(f"- {c}" for c in caveats)] if caveats else []))
