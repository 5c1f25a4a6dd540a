"""README.md of a training run: our own model card (what the adapter is, from which base model and data, with
which settings and how training ended) in the run dir, its final/ adapter and its checkpoints, in place of
the generic cards that TRL and PEFT write there (placeholders, a "Quick start" that names no model)."""
from __future__ import annotations

import datetime
from pathlib import Path

from flare_exp.io import write_text

CARD = "README.md"
TRAINING_KEYS = {"sft": ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                         "lr_scheduler_type", "warmup_ratio", "optim", "max_steps", "num_train_epochs"),
                 "rl": ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                        "lr_scheduler_type", "warmup_ratio", "optim", "max_steps", "num_generations",
                        "max_completion_length", "loss_type", "scale_rewards", "importance_sampling_level", "beta",
                        "temperature")}
# the last logged value of each, when logged (not transformers' train_loss: its last process's sum over the global
# step, a third of the run's after a resume; the card says the run's own mean, loss_summary)
OUTCOME_KEYS = ("loss", "reward", "eval_loss")


def last_logged(history: list[dict]) -> dict:
    """The last value logged for each of OUTCOME_KEYS and for every eval_* metric."""
    out = {}
    for entry in history:
        out.update({k: v for k, v in entry.items() if (k in OUTCOME_KEYS or k.startswith("eval_"))
                    and isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second"))})
    return out


def number(v) -> str:
    from flare_exp.reports.tables import four_decimals

    return four_decimals(v) if isinstance(v, float) else str(v)


def card_text(stage: str, cfg, base_model: str, data: list[dict], step: int, history: list[dict],
              best: tuple | None = None, heldout: dict | None = None, loss: dict | None = None) -> str:
    """The card: base model, data (with sha256), LoRA and training settings, outcome, how to use it."""
    from flare_exp.loss_summary import said
    from flare_exp.run.record import git_commit

    section = cfg[stage]
    lora = cfg.model.lora
    start = section.get("init_from") or "the base model"
    lines = [f"# {cfg.run_name}: {stage.upper()} LoRA adapter for {cfg.model.name}", "",
             f"Trained by flare-exp ({stage} stage) at commit {(git_commit() or 'unknown')[:12]}, "
             f"{datetime.date.today().isoformat()}; the adapter is in final/.", "",
             "## Base model and data", "",
             f"- base model: {cfg.model.name} ({base_model})", f"- started from: {start}",
             f"- data: {cfg.data.name} ({', '.join(cfg.data.datasets)})",
             *(f"- {Path(d['path']).name}: {d['path']} (sha256 {str(d.get('sha256'))[:12]})" for d in data), "",
             "## Settings", "",
             f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target modules {lora.target_modules}",
             *(f"- {k}: {section[k]}" for k in TRAINING_KEYS[stage] if k in section), f"- seed: {cfg.seed}",
             "- every setting: config.yaml in the run dir", "",
             "## Outcome", "", f"- optimizer steps: {step}"]
    lines += [f"- last {k}: {number(v)}" for k, v in last_logged(history).items()]
    if loss:
        lines.append(f"- mean training loss: {said(loss)}")
    if best and best[0] is not None:  # the Trainer's own (its metric_for_best_model: sft's eval loss)
        lines.append(f"- lowest {best[2]}: {number(best[0])} at {best[1]}")
    if heldout and heldout.get("best_checkpoint"):  # the held-out eval's best/ (sft.eval_per_task, rl.eval_steps)
        lines.append(f"- best held-out {heldout['heldout_metric']}: {number(heldout['best_value'])} at step "
                     f"{heldout['best_step']} ({heldout['best_checkpoint']})")
    lines += ["- official metrics: run stage=infer then stage=eval on this adapter (eval/report.html)", "",
              "## Use", "", "```", "python launch.py stage=infer infer.checkpoint=<this run dir>", "```", ""]
    return "\n".join(lines)


def write_model_cards(out_dir: Path, stage: str, cfg, base_model: str, data: list[dict], trainer,
                      loss: dict | None = None) -> None:
    """Our card in the run dir, final/ and every whole checkpoint-* (after training: nothing overwrites it after);
    a checkpoint's completeness record is renewed for the card's new size."""
    from flare_exp.models.checkpoints import incomplete, mark_complete

    state = trainer.state
    best = (state.best_metric, state.best_model_checkpoint, trainer.args.metric_for_best_model)
    watch = next((c for c in trainer.callback_handler.callbacks  # the held-out eval's (rl_monitor.HeldOutWatch)
                  if hasattr(c, "heldout") and callable(getattr(c, "summary", None))), None)
    text = card_text(stage, cfg, base_model, data, state.global_step, state.log_history, best,
                     watch.summary() if watch is not None else None, loss)
    for where in (out_dir, out_dir / "final"):
        write_text(where / CARD, text)
    for checkpoint in sorted(out_dir.glob("checkpoint-*")):
        if checkpoint.is_dir() and incomplete(checkpoint) is None:  # one cut short while saving stays as it is
            write_text(checkpoint / CARD, text)
            mark_complete(checkpoint)
