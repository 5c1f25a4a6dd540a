"""sft stage: LoRA supervised fine-tuning of Qwen3-VL on the prepared JSONL, loss on the answer tokens only.

Setup (model, data, length check) -> train (transformers Trainer, resumable) -> save final/ adapter with its
config, base path and data fingerprints. Same code for model.backend=hf and model.backend=unsloth.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.data.decoding import check_records_window
from flare_exp.divergence import WarnWhenStuck
from flare_exp.loss_summary import loss_line, trainer_loss
from flare_exp.data.vision import SFTCollator, VisionChat, emptied, filter_by_length
from flare_exp.compile_cache import prepare_gpu_run
from flare_exp.data.prepared_split import read_prepared_split
from flare_exp.io import write_json
from flare_exp.models import rope_positions
from flare_exp.models.loading import PRECISIONS, compile_repeated_blocks, load_model
from flare_exp.models.recompute import checkpointed_layers, recompute_only
from flare_exp.rl_monitor.heldout import HeldOutEval
from flare_exp.rl_monitor.heldout_watch import HeldOutWatch, check_metric_spec, reporting_last, write_curves
from flare_exp.run.layout import summary_name
from flare_exp.run.stage import Stage
from flare_exp.runtime import abspath, check_choice, check_each, is_compilation_error, ranks
from flare_exp.stages import sft_card
from flare_exp.step_batch import effective_batch
from flare_exp.training import (CheckpointMeta, ProgressLog, cpu_ranks_args, data_fingerprints, half_precision,
                                profiling, schedule_changes, setup_tracking, train_and_save, trainer_arguments,
                                trainer_choice_checks)


STAGE = Stage(
    name="sft",
    help="LoRA supervised fine-tuning (resumable; torchrun for several GPUs)",
    reads=("sft.train_file", "sft.val_file", "sft.init_from"),
    deciding=("seed", "data.root", "model", "sft"),
    free=(
        "model speed", "sft.per_device_eval_batch_size", "sft.max_steps", "sft.num_train_epochs",
        "sft.logging_steps", "sft.save_steps", "sft.eval_steps", "sft.save_total_limit",
        "sft.early_stopping_patience", "sft.max_eval_samples", "sft.dataloader_num_workers", "sft.card_preset",
        "sft.compile_layers", "sft.compile_backend", "sft.answer_logits_only", "sft.rope_positions",
        "sft.recompute_above_tokens", "sft.profile_steps", "sft.report_to", "sft.wandb_project",
        "sft.wandb_mode"),
    budget=("sft.max_steps", "sft.num_train_epochs", "sft.early_stopping_patience", "sft.max_eval_samples"),
    fingerprinted=("sft.train_file", "sft.val_file"),
    starts_from="sft.init_from",
    resumable=("checkpoint-*",),
    ranks="several",
    loads_model=True,
    trains=True,
    pipeline_step=True,
    reads_doc="`sft.train_file`, `sft.val_file`",
    writes_doc=("`checkpoint-N/`, `final/` (LoRA adapter + processor + `flare_exp_checkpoint.json`), `README.md` "
        "(our model card: base model, data, settings, how training ended; also in `final/` and each "
        "checkpoint), `log_history.json`, `sft_summary.json`; with `sft.eval_per_task`: `best/`, `heldout/`, "
        "`sft_curves.png`"),
)

log = logging.getLogger(__name__)


class RecordDataset:
    """A list of prepared records and their token counts; the collator does the (lazy) image loading and
    tokenisation."""

    def __init__(self, records: list[dict], lengths: list[int]):
        self.records, self.lengths = records, lengths

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def check_settings(cfg) -> None:
    """Every refusal of the sft settings together (one does not hide the next)."""
    sft = cfg.sft
    check_each((check_early_stopping, sft), (check_heldout_settings, sft), (sft_card.check_preset, cfg),
               (check_choice, "sft.on_too_long", sft.on_too_long, ("skip", "error")),
               (check_choice, "sft.rope_positions", sft.rope_positions, rope_positions.SETTINGS),
               (check_choice, "sft.compile_precision", sft.compile_precision, PRECISIONS),
               (check_recompute_above, sft, cfg.model.backend), *trainer_choice_checks("sft", sft))


def check_early_stopping(sft) -> None:
    # eval_steps=0 with a patience is the ranges' problem (never evaluates), not a division by zero here
    if sft.early_stopping_patience and sft.eval_steps and sft.save_steps % sft.eval_steps:
        raise ValueError(f"sft.early_stopping_patience needs sft.save_steps ({sft.save_steps}) to be a multiple "
                         f"of sft.eval_steps ({sft.eval_steps}) so the best checkpoint can be kept")


def check_recompute_above(sft, backend: str) -> None:
    if sft.recompute_above_tokens < 0:
        raise ValueError(f"sft.recompute_above_tokens={sft.recompute_above_tokens}: a token count, or 0 for "
                         "recomputing every batch; pass sft.recompute_above_tokens=0 or more")
    if sft.recompute_above_tokens and backend != "hf":
        raise ValueError("sft.recompute_above_tokens is for model.backend=hf (Unsloth checkpoints its own way); "
                         "set it to 0")


def check_heldout_settings(sft) -> None:
    """The in-training task metrics' settings (sft.eval_per_task and the keys it reads)."""
    check_each((check_metric_spec, "sft", sft.metric_for_best_model), (_check_eval_per_task, sft))


def _check_eval_per_task(sft) -> None:
    if sft.eval_per_task < 0:
        raise ValueError(f"sft.eval_per_task={sft.eval_per_task}: records per task type, or 0 for none")
    if sft.eval_per_task and not (sft.eval_steps and sft.val_file):
        raise ValueError(f"sft.eval_per_task={sft.eval_per_task} decodes val_file records at every sft.eval_steps, "
                         f"but sft.eval_steps={sft.eval_steps} and sft.val_file={sft.val_file}: pass sft.eval_steps=N "
                         "and a val_file, or sft.eval_per_task=0")


def heldout_watch(cfg, out_dir: Path, chat: VisionChat, meta: CheckpointMeta) -> HeldOutWatch:
    """sft.eval_per_task > 0: the held-out subset of sft.val_file (every task type it holds), decoded and scored
    at each eval step; the watch does nothing when it is 0."""
    sft = cfg.sft
    heldout = HeldOutEval(cfg, "sft", out_dir, None, chat, source_key="val_file") if sft.eval_per_task else None
    return HeldOutWatch("sft", sft, out_dir, heldout, meta)


def length_grouped(trainer_class):
    """sft.group_by_length: batches of similar token counts (less padding), from the lengths the length check
    measured. The Trainer's own group_by_length would look for input_ids in the dataset, which holds records."""

    class LengthGroupedTrainer(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)

    return LengthGroupedTrainer


def answer_logits_only(trainer_class):
    """sft.answer_logits_only (both backends): the model returns logits only at the positions whose next token is
    labelled (transformers' `logits_to_keep` with those indices; the union over the batch), and the loss is
    transformers' causal-LM loss on them with the matching targets: the model's own loss, computed without the
    logits of every prompt and image position (for two 512-px views + a short answer, ~550 positions per sample
    of which ~10 are scored). With Unsloth it takes the place of its fused loss op."""

    class AnswerLogitsTrainer(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The loss is ours, not the model's (Qwen3-VL's says it takes no token count): the Trainer then
            # counts the labelled tokens of the whole accumulated batch (over all ranks) and the loss is their
            # mean, not a mean of micro-batch means: any split of the same batch trains the same (tested).
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from transformers.loss.loss_utils import ForCausalLMLoss

            targets = inputs["labels"][:, 1:]  # the token each position predicts
            positions = (targets != -100).any(0).nonzero().squeeze(-1)
            if not len(positions):  # nothing scored: the model's own loss says so (nan) as it would
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=positions)
            # a sum over the accumulated batch's labelled tokens; the Trainer skips its division by the steps
            loss = ForCausalLMLoss(outputs.logits, None, outputs.logits.shape[-1],
                                   num_items_in_batch=num_items_in_batch, shift_labels=targets[:, positions])
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # the count is every rank's, and the ranks' gradients are averaged: as the Trainer's own
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

    return AnswerLogitsTrainer


def recompute_long_batches(trainer_class, above_tokens: int):
    """sft.recompute_above_tokens: each training batch decides whether the checkpointed layers recompute, by its
    token count (batch x padded length, what activation memory grows with). The layers read their flag at call
    time, so a batch over the budget recomputes and the others keep their activations. Counts the batches that
    recomputed (``recomputed_batches``, this attempt's)."""

    class SelectiveRecomputeTrainer(trainer_class):
        recomputed_batches, checkpointed = 0, None

        def training_step(self, model, inputs, *args, **kwargs):
            if self.checkpointed is None:
                self.checkpointed = checkpointed_layers(model)
            recompute = inputs["input_ids"].numel() > above_tokens
            recompute_only(self.checkpointed, lambda index: recompute)
            self.recomputed_batches += recompute
            return super().training_step(model, inputs, *args, **kwargs)

    return SelectiveRecomputeTrainer


def load_split(path, limit, chat, max_len, on_too_long, what) -> tuple[list[dict], list[dict], list[int], list[str]]:
    """(the records that fit, the too-long ones, the fitting ones' lengths, the datasets none of whose records
    fit)."""
    records = [r for r in read_prepared_split(abspath(path)) if r.get("answer") is not None]
    if limit:
        records = records[:limit]
    if not records:
        raise ValueError(f"{path}: no records with answers for {what}")
    kept, too_long, lengths = filter_by_length(chat, records, max_len, on_too_long)
    return kept, too_long, lengths, emptied(records, kept, "dataset")


def compile_layers(sft, backend: str) -> bool:
    """sft.compile_layers (backend=hf): Unsloth compiles its own blocks; with inductor's fused precision in bf16
    on a GPU, say that the run trains to other losses than an uncompiled one."""
    if not sft.compile_layers:
        return False
    if backend == "unsloth":
        log.warning("sft.compile_layers: Unsloth compiles its own blocks; nothing more compiled")
        return False
    import torch

    if torch.cuda.is_available() and sft.compile_backend == "inductor" and sft.compile_precision == "fused":
        log.warning("sft.compile_precision=fused: in bf16 inductor's compiled blocks train to other losses than "
                    "uncompiled ones from the second step (docs/performance.md); compile_precision=eager keeps "
                    "eager's rounding and its losses")
    return True


def applied_config(cfg) -> tuple:
    """The config sft trains with (sft.card_preset applied) and what the preset decided: the run records the
    first as its config.yaml and the second in run_info.json (the configured values stay in its fingerprint)."""
    check_settings(cfg)
    used, changes, card, why = sft_card.apply_card_preset(cfg)
    return used, {"preset": cfg.sft.card_preset, "card": card and str(card), "changed": changes, "why": why}


def run(cfg, out_dir: Path, applied: dict | None = None) -> dict:
    """``cfg``: the config applied_config made (the Run records it); called alone, it applies it itself."""
    import torch

    if applied is None:
        cfg, applied = applied_config(cfg)
    preset_changes = applied["changed"]
    prepare_gpu_run(cfg)
    sft = cfg.sft
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, init_from=sft.init_from, training=True, seed=cfg.seed)
    compiled = compile_layers(sft, cfg.model.backend)
    if compiled:
        log.info("sft.compile_layers: %d blocks compiled (the first steps compile them: a minute or so)",
                 compile_repeated_blocks(loaded.model, sft.compile_backend, sft.compile_precision))
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    train, val, skipped = datasets(cfg, chat, out_dir)
    report_to = setup_tracking(sft, out_dir)
    meta = CheckpointMeta(loaded.base_path, cfg, data_fingerprints(sft.train_file, sft.val_file), loaded.processor)
    watch = heldout_watch(cfg, out_dir, chat, meta)
    trainer = build_trainer(cfg, loaded, chat, train, val, training_args(cfg, out_dir, report_to, loaded.model,
                                                                          evaluating=val is not None), meta, watch)
    trainer.add_callback(stuck := WarnWhenStuck("sft"))
    batch = effective_batch(sft, trainer.args.world_size, len(train))
    if "effective_batch_configured" not in batch:  # else said as a warning: each step is one epoch
        log.info("sft: %d per device x %d accumulation x %d rank(s) = %d samples per optimizer step",
                 sft.per_device_train_batch_size, sft.gradient_accumulation_steps, batch["world_size"],
                 batch["effective_batch"])
    result, final, lead = train_and_save(
        trainer, "sft", cfg, out_dir, meta, report_to, oom_remedies(cfg, preset_changes), explain_failure=lambda e: RuntimeError(
            f"compiling the model's blocks failed ({type(e).__name__}); rerun with sft.compile_layers=false (the "
            "run resumes from its last checkpoint)") if compiled and is_compilation_error(e) else None,
        final_meta=lambda t: {"best": t.state.best_model_checkpoint})
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"final_adapter": str(final), "global_step": trainer.state.global_step,
               **trainer_loss(trainer, result.training_loss),
               "first_loss": history[0]["loss"] if history else None,
               "last_loss": history[-1]["loss"] if history else None,
               "last_loss_step": history[-1].get("step") if history else None,
               "best_eval_loss_checkpoint": trainer.state.best_model_checkpoint,
               "train_samples": len(train), "skipped_too_long": skipped, **batch,
               "card_preset": applied, **schedule_changes(trainer.state),
               **({"recomputed_batches": trainer.recomputed_batches} if hasattr(trainer, "recomputed_batches")
                  else {}), **({"no_learning_signal": stuck.finding} if stuck.finding else {})}
    if lead:
        summary.update(watch.summary())
        if watch.heldout is not None:
            write_curves(trainer.state.log_history, ["loss", "eval_loss"], watch.key, out_dir / "sft_curves.png",
                         "loss and eval loss", "no eval step")
        write_json(out_dir / summary_name("sft"), summary)
    log.info("sft finished: adapter at %s (%s)%s", final, loss_line(history, summary, sft.logging_steps),
             f"; no learning signal from step {stuck.finding['since_step']} on (said above)" if stuck.finding else "")
    return summary


def datasets(cfg, chat: VisionChat, out_dir: Path) -> tuple["RecordDataset", "RecordDataset | None", int]:
    """The training set and (when evaluating) the eval set, their too-long samples skipped and listed;
    (train, val or None, how many were skipped)."""
    sft, max_len = cfg.sft, cfg.model.max_seq_length
    train, too_long, train_lengths, gone = load_split(sft.train_file, sft.max_train_samples, chat, max_len,
                                                      sft.on_too_long, "training")
    check_records_window(train, cfg.data.image_window, sft.train_file)
    val, val_too_long, val_lengths = ([], [], [])
    if sft.val_file and abspath(sft.val_file).exists():
        val, val_too_long, val_lengths, _ = load_split(sft.val_file, sft.max_eval_samples, chat, max_len,
                                                       sft.on_too_long, "eval")
    if not train:  # the trainer would fail on an empty dataset, deep inside the tokenizer
        raise ValueError(f"all {len(too_long)} training samples of {sft.train_file} are longer than "
                         f"model.max_seq_length={max_len}, e.g. {too_long[0]['id']} with {too_long[0]['tokens']} "
                         "tokens: none is left to train on. Raise model.max_seq_length or lower model.max_pixels")
    if too_long or val_too_long:
        log.warning("skipped %d train / %d val samples longer than model.max_seq_length=%d (listed in "
                    "too_long.json)%s", len(too_long), len(val_too_long), max_len,
                    f"; every training sample of {', '.join(gone)} was: SFT does not learn "
                    f"{'that dataset' if len(gone) == 1 else 'those datasets'} here"
                    if gone else "")
        if ranks()[0] == 0:
            write_json(out_dir / "too_long.json", {"train": too_long, "val": val_too_long})
    log.info("sft: %d train / %d val samples, backend=%s", len(train), len(val), cfg.model.backend)
    evaluating = bool(val) and sft.eval_steps > 0
    return (RecordDataset(train, train_lengths), RecordDataset(val, val_lengths) if evaluating else None,
            len(too_long) + len(val_too_long))


def training_args(cfg, out_dir: Path, report_to: str, model, evaluating: bool):
    import torch
    from transformers import TrainingArguments

    sft = cfg.sft
    bf16, fp16 = half_precision(model)
    return TrainingArguments(
        # metric_for_best_model: the held-out eval's (heldout_watch); the Trainer's best (early stopping) is eval_loss
        output_dir=str(out_dir), **trainer_arguments(sft, TrainingArguments, ("eval_steps", "group_by_length",
                                                                              "report_to", "metric_for_best_model")),
        eval_strategy="steps" if evaluating else "no", eval_steps=sft.eval_steps if evaluating else None,
        load_best_model_at_end=bool(sft.early_stopping_patience and evaluating),
        metric_for_best_model="eval_loss" if evaluating else None, greater_is_better=False,
        bf16=bf16, fp16=fp16, remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(),
        **cpu_ranks_args(),
        include_num_input_tokens_seen="non_padding", report_to=report_to,
        seed=cfg.seed, disable_tqdm=False, logging_first_step=True,
    )


def build_trainer(cfg, loaded, chat: VisionChat, train, val, args, meta: CheckpointMeta, watch=None):
    from transformers import EarlyStoppingCallback, Trainer

    sft = cfg.sft
    callbacks = [*([watch] if watch is not None else []), ProgressLog(), meta, *profiling(sft, args.output_dir)]
    if sft.early_stopping_patience and val is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=sft.early_stopping_patience))
    trainer_class = length_grouped(Trainer) if sft.group_by_length else Trainer
    if sft.answer_logits_only:
        trainer_class = answer_logits_only(trainer_class)
    if sft.recompute_above_tokens and cfg.model.gradient_checkpointing:
        log.info("sft: batches of up to %d tokens train without recomputation, longer ones recompute "
                 "(sft.recompute_above_tokens)", sft.recompute_above_tokens)
        trainer_class = recompute_long_batches(trainer_class, sft.recompute_above_tokens)
    elif sft.recompute_above_tokens:
        log.info("sft.recompute_above_tokens=%d: no batch recomputes anyway (model.gradient_checkpointing=false)",
                 sft.recompute_above_tokens)
    trainer = trainer_class(model=loaded.model, args=args, train_dataset=train, eval_dataset=val,
                            data_collator=collator(sft.rope_positions, loaded, chat, train), callbacks=callbacks)
    reporting_last(trainer)  # the held-out numbers the watch adds to a log line reach the trackers too
    return trainer


def collator(positions: str, loaded, chat: VisionChat, train) -> SFTCollator:
    """The batches, with the rope positions when sft.rope_positions=collator (hf; checked on two samples)."""
    if positions == "collator" and loaded.backend != "hf":  # Unsloth's rewritten forward: not tried with them
        log.info("sft.rope_positions=collator is for model.backend=hf; Unsloth's forward builds them itself")
        positions = "model"
    if positions != "collator":  # no check batch to load
        return SFTCollator(chat)
    return SFTCollator(chat, rope_positions.host_rope_index(loaded.model, positions,
                                                            sample_batch=SFTCollator(chat)(train.records[:2])))


def oom_remedies(cfg, preset_changes: dict | None = None) -> list[str]:
    sft = cfg.sft
    preset = [f"pass sft.card_preset=none (it set {', '.join(f'{k}={v[1]}' for k, v in preset_changes.items())} "
              "for this card; the keys below then apply)"] if preset_changes else []
    return [*preset, f"lower sft.per_device_train_batch_size={sft.per_device_train_batch_size} (raise "
            f"sft.gradient_accumulation_steps={sft.gradient_accumulation_steps} to keep the effective batch)",
            "lower model.max_pixels (fewer image tokens per view)",
            *([] if cfg.model.gradient_checkpointing else ["set model.gradient_checkpointing=true"]),
            *([f"lower sft.recompute_above_tokens={sft.recompute_above_tokens} (more batches recompute)"]
              if cfg.model.gradient_checkpointing and sft.recompute_above_tokens else [])]
