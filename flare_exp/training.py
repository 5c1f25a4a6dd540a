"""What sft and rl share: the trainer's arguments from the stage's settings, the training lifecycle (train
resumably, name an out-of-memory step, save final/ with its metadata, close tracking, write the history and
the summary on rank 0), resume decisions, experiment tracking, per-step log lines, checkpoint metadata."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

from omegaconf import OmegaConf
from flare_exp.callback_base import TrainerCallback

from flare_exp.divergence import SAMPLED_NAN, StopWhenDiverged, diverged
from flare_exp.io import file_fingerprint, shared_as_umask
from flare_exp.logs import log_part
from flare_exp.loss_summary import trainer_loss
from flare_exp.models.checkpoints import checkpoint_step, mark_complete, sort_adapter_config, write_meta
from flare_exp.reports.model_card import write_model_cards
from flare_exp.resume import (STEP_SHAPE, at_the_step_budget, check_step_shape, resume_checkpoint, schedule_change,
                              step_shape)
from flare_exp.run.layout import LOG_HISTORY
from flare_exp.run.lock import check_still_held
from flare_exp.runtime import abspath, world_size

log = logging.getLogger(__name__)


def trainer_arguments(section, args_class, set_by_stage: tuple[str, ...] = ()) -> dict:
    """The stage's settings that ``args_class`` (TrainingArguments, GRPOConfig) has under the same name, as
    they are. ``set_by_stage``: shared names whose value the stage resolves itself (report_to after the
    tracking setup, eval_steps only when evaluating, our own length grouping, a resolved cache, ...)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_class)} - set(set_by_stage)
    out = {name: section[name] for name in section if name in names}
    if "warmup_ratio" in section and "warmup_ratio" not in names and "warmup_steps" in names:
        out["warmup_steps"] = warmup_steps_for(section["warmup_ratio"])
    if out.get("dataloader_num_workers"):
        out["dataloader_num_workers"] = workers_for_cores(out["dataloader_num_workers"])
    return out


def trainer_choice_checks(stage: str, section) -> list[tuple]:
    """check_each's checks of the stage's settings that name one of the Trainer's choices (a scheduler, an
    optimizer): refused before the model loads, not by TrainingArguments once it has."""
    from flare_exp.package_source import trainer_choices
    from flare_exp.runtime import check_choice

    return [(check_choice, f"{stage}.{key}", section[key], choices) for key, choices in trainer_choices().items()
            if key in section]


def warmup_steps_for(ratio: float) -> float:
    """``warmup_ratio`` as transformers 5 takes it: it has no such field (silently left out, no run warmed up),
    and reads a ``warmup_steps`` below 1 as the share of the run's steps (ceil(steps x share)). A ratio of 1 (a
    whole-run warmup) would read as one step: just below 1 is every step of any run under a million steps."""
    return min(float(ratio), 0.999999) if ratio else 0


def workers_for_cores(asked: int) -> int:
    """DataLoader workers beyond this process's CPU cores only add processes (a typo's 100000 would fork for
    minutes before the first step): at most one per core, said."""
    from flare_exp.runtime import usable_cores

    cores = usable_cores()
    if asked > cores:
        log.warning("dataloader_num_workers=%d: this job has %d CPU cores; using %d workers", asked, cores, cores)
    return min(asked, cores)


def train_and_save(trainer, stage: str, cfg, out_dir: Path, meta: "CheckpointMeta", report_to: str,
                   remedies: list[str], explain_failure=None, final_meta=None):
    """The lifecycle both training stages share: train (resumed as ``resume`` says), an out-of-memory step
    named with the stage's remedies, ``explain_failure(e)`` for other errors (a RuntimeError to raise instead,
    or None), final/ with its checkpoint metadata (``final_meta(trainer)`` adds fields), tracking closed, and
    log_history.json. Only rank 0 writes. Returns (the train result, final/, whether this rank writes)."""
    import torch

    quiet_progress(trainer)
    workers_ignore_sigterm(trainer)
    trainer.add_callback(StopWhenDiverged(stage, out_dir))
    trainer.add_callback(AtResume())
    try:
        try:
            checkpoint = resume_checkpoint(cfg.resume, out_dir, stage, cfg, trainer.args.max_steps)
            check_step_shape(checkpoint, trainer.args, stage)
            trainer.resumed_step = checkpoint_step(Path(checkpoint)) or 0 if checkpoint else 0  # loss_summary
            spliced = schedule_change(trainer, checkpoint)
            if spliced:  # in the trainer state: every later checkpoint, log_history.json and final/ carry it
                trainer.add_callback(NotedInHistory(spliced))
            result = at_the_step_budget(trainer, checkpoint) or trainer.train(resume_from_checkpoint=checkpoint)
            if spliced and spliced not in trainer.state.log_history:  # at the budget already: no training began
                trainer.state.log_history.append(spliced)
        except torch.OutOfMemoryError as e:
            raise out_of_memory_error(cfg, stage, trainer.state.global_step + 1, out_dir, remedies) from e
        except Exception as e:
            if SAMPLED_NAN in str(e):  # a rollout of weights gone inf/NaN before a step's end could say so
                raise diverged(stage, trainer.state.global_step + 1, trainer.args, out_dir,
                               "the policy's next-token probabilities are inf or NaN") from e
            explained = explain_failure(e) if explain_failure else None
            if explained is not None:
                raise explained from e
            raise
        final = out_dir / "final"
        check_still_held()
        trainer.save_model(str(final))  # the Trainer saves on the main process only
        lead = trainer.is_world_process_zero()  # a data-parallel job's other ranks write nothing
        if lead:
            check_still_held()  # the save above may have been cut by a stop: not marked, nor carded, if it is lost
            meta.write(final, step=trainer.state.global_step, **(final_meta(trainer) if final_meta else {}),
                       **schedule_changes(trainer.state))
            write_model_cards(out_dir, stage, cfg, meta.base, meta.fingerprints, trainer,  # not TRL's card
                              trainer_loss(trainer, result.training_loss))
            mark_complete(final)  # its files' digests: an adapter damaged in place since is refused where it is used
    finally:
        finish_tracking(report_to)
    if lead:
        from flare_exp.io import write_json

        write_json(out_dir / LOG_HISTORY, trainer.state.log_history)
    return result, final, lead


def schedule_changes(state) -> dict:
    """{"schedule_changed": [...]} for the budget changes a run's attempts made (resume.schedule_change, kept in
    the trainer state), {} for none: for final/'s metadata and the stage's summary."""
    changes = [h for h in state.log_history if "schedule_changed" in h]
    return {"schedule_changed": changes} if changes else {}


class AtResume(TrainerCallback):
    """The logging/eval/save steps this launch set apply from the checkpoint on (transformers kept the checkpoint's,
    while config.yaml recorded these free keys), said once; the resume's step goes into the log history
    (``resumed_at``, carried by later checkpoints): the run's mean loss knows each resume's gap (loss_summary)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and not any(h.get("resumed_at") == state.global_step for h in state.log_history):
            state.log_history.append({"resumed_at": state.global_step, "step": state.global_step})
        kinds = ("logging", "eval", "save")
        before = {k: getattr(state, f"{k}_steps") for k in kinds}
        state.compute_steps(args, state.max_steps)
        changed = [f"{k}_steps {before[k]} -> {getattr(state, f'{k}_steps')}" for k in kinds
                   if before[k] != getattr(state, f"{k}_steps") and state.global_step > 0]
        if changed:
            log.info("resumed at step %d with this launch's %s (the checkpoint had the former)", state.global_step,
                     ", ".join(changed))


class NotedInHistory(TrainerCallback):
    """Puts an entry into the trainer state's log history when training begins (after a resume loaded it), so
    the checkpoints saved from then on carry it, and a later resume of them too."""

    def __init__(self, entry: dict):
        self.entry = entry

    def on_train_begin(self, args, state, control, **kwargs):
        if self.entry not in state.log_history:
            state.log_history.append(self.entry)


def profiling(section, out_dir) -> list:
    """The profiler callback that ``<stage>.profile_steps`` asks for (none at 0)."""
    if not section.profile_steps:
        return []
    from flare_exp.profiling import profile_steps

    return [profile_steps(Path(out_dir) / "profile.txt", section.profile_steps)]


def cpu_ranks_args() -> dict:
    """Without a GPU the Trainer runs data-parallel only when told it is on the CPU (torchrun on gloo)."""
    import torch

    if world_size() <= 1 or torch.cuda.is_available():
        return {}
    restore_indexed_cpu_storages()
    return {"use_cpu": True, "ddp_backend": "gloo"}


@functools.cache
def restore_indexed_cpu_storages() -> None:
    """accelerate places each CPU rank on torch.device("cpu", i), so a checkpoint's optimizer state is tagged
    "cpu:0", and the Trainer's resume (torch.load with that device as map_location) cannot restore such a
    tag: a preempted several-rank CPU job could not resume. Teach torch.load to read "cpu:N" as the CPU."""
    import torch.serialization as serialization

    def deserialize(storage, location: str):
        return storage if location.startswith("cpu:") else None

    serialization.register_package(30, lambda obj: None, deserialize)  # once per process (functools.cache)


def out_of_memory_error(cfg, stage: str, step: int, out_dir: Path, remedies: list[str]) -> RuntimeError:
    """What a training stage says when the GPU runs out of memory: where and what to lower. A remedy that keeps
    the run (a speed setting: its key is free for the stage) comes with what the same command then does under
    its resume= (resume.rerun_of_training: the checkpoint it continues from, step 0 and why, a refusal under
    resume=never, a checkpoint resume= names); one that changes what the run trains (a batch split, the image
    size) with a new run_name, as the same run_name would refuse the changed settings."""
    import re

    from flare_exp.resume import rerun_of_training
    from flare_exp.run.stage import stage as declared

    free = set(declared(stage).free)
    keeping = [r for r in remedies if (key := re.search(r"([\w.]+)=", r)) and key.group(1) in free]
    changing = [r for r in remedies if r not in keeping]
    said = [f"{'; or '.join(keeping)}, and rerun with the same run_name: it {rerun_of_training(cfg, stage, out_dir)}"
            ] if keeping else []
    said += [f"{'; or '.join(changing)}: that changes what the run trains, so give it a new run_name= (it starts "
             "from step 0; overwrite=true replaces this run)"] if changing else []
    return RuntimeError(f"{stage}: the GPU ran out of memory in step {step}: " + ". Or ".join(said) + ".")


def setup_tracking(section, out_dir: Path) -> str:
    """report_to for TrainingArguments; wandb gets a stable run id derived from the run dir, so a requeued
    SLURM job resumes the same wandb run instead of starting a new one."""
    report_to = section.report_to
    if report_to == "wandb":
        run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:16]
        # Per run, not setdefault: a pipeline's sft and rl (or a bench) share one process.
        os.environ.update(WANDB_PROJECT=section.wandb_project, WANDB_RUN_ID=run_id, WANDB_RESUME="allow",
                          WANDB_DIR=str(out_dir), WANDB_NAME=out_dir.name)
        os.environ.setdefault("WANDB_MODE", section.wandb_mode)  # WANDB_MODE=disabled in the env still wins
    return report_to


def finish_tracking(report_to: str) -> None:
    if report_to == "wandb":
        import wandb

        wandb.finish()  # one run per job: a sweep's next job in this process must not log into this one


def half_precision(model) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments, from the loaded model's dtype (checks.validate has refused half
    precision without a GPU)."""
    import torch

    return model.dtype == torch.bfloat16, model.dtype == torch.float16


def data_fingerprints(*paths) -> list[dict]:
    return [file_fingerprint(abspath(p)) for p in paths if p and abspath(p).exists()]


def add_to_log(state, logs: dict, extras: dict) -> None:
    """Add values to a log line: the Trainer stored a copy of ``logs`` in log_history before calling its
    callbacks, so both must get them (log_history.json and the sweep report read the history)."""
    logs.update(extras)
    if state.log_history:
        state.log_history[-1].update(extras)


class ProgressLog(TrainerCallback):
    """A readable log line per logging step: loss, lr, tokens/s, peak memory, and how long the loop waited
    for its next batch (``data_wait_seconds`` per step: from one step's end to the next one's start, where the
    Trainer fetches and collates the batch, evaluation and checkpointing left out; near zero when DataLoader
    workers keep up)."""

    def __init__(self):
        self._t = time.time()
        self._tokens = 0
        self._step = 0
        self._step_end = None
        self._wait = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self._step_end is not None:
            self._wait += time.perf_counter() - self._step_end

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):  # evaluation and saving are not waiting for data
        self._step_end = time.perf_counter()

    on_save = on_evaluate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        now, seen = time.time(), getattr(state, "num_input_tokens_seen", 0) or 0
        if "eval_loss" in logs:
            log.info("step %d/%d | eval_loss %.4g", state.global_step, state.max_steps, logs["eval_loss"])
        if "loss" not in logs and "reward" not in logs:  # eval / final summary lines: no new steps
            return
        tok_s = (seen - self._tokens) / max(now - self._t, 1e-9) if seen else None
        extras = {}
        if state.global_step > self._step:
            steps = state.global_step - self._step
            extras["step_seconds"] = round((now - self._t) / steps, 4)
            extras["data_wait_seconds"] = round(self._wait / steps, 4)
        self._t, self._tokens, self._step, self._wait = now, seen, state.global_step, 0.0
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key in ("loss", "reward", "reward_std", "learning_rate", "grad_norm"):
            if key in logs:
                parts.append(log_part(key, logs[key]))
        if "data_wait_seconds" in extras:
            parts.append(f"data wait {extras['data_wait_seconds']:.3f} s/step")
        if tok_s:
            parts.append(f"{tok_s:,.0f} tok/s")
            extras["tokens_per_second"] = round(tok_s, 1)
        mem = _peak_memory_gib()
        if mem is not None:
            parts.append(f"peak mem {mem:.1f} GiB")
            extras["peak_memory_gib"] = round(mem, 2)
        add_to_log(state, logs, extras)
        log.info(" | ".join(parts))


class WorkerIgnoresSigterm:
    """A DataLoader worker's init: SIGTERM ignored, then the Trainer's own init (its seeding). A scheduler's stop
    (preemption, time limit, scancel) sends SIGTERM to every process of the job: the main process stops the run
    and then its workers; workers that died first were printed by torch as a traceback after the clean stop
    message. Workers still end with the main process (torch's workers watch it) or at SIGKILL."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def workers_ignore_sigterm(trainer) -> None:
    """Every DataLoader the trainer builds with workers gets WorkerIgnoresSigterm as its worker init."""
    build = trainer._get_dataloader

    def built(*args, **kwargs):
        loader = build(*args, **kwargs)
        inner = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the DataLoader it holds
        if getattr(inner, "num_workers", 0) and not isinstance(inner.worker_init_fn, WorkerIgnoresSigterm):
            inner.worker_init_fn = WorkerIgnoresSigterm(inner.worker_init_fn)
        return loader

    trainer._get_dataloader = built


def quiet_progress(trainer) -> None:
    """One progress bar per stage: the Trainer's bar stays, without the raw log dict it prints under it at
    every logging step (ProgressLog writes a readable line instead) and without the nested evaluation bar."""
    from transformers.trainer_callback import ProgressCallback

    class TrainingBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass

    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TrainingBar)


def _peak_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return None


class CheckpointMeta(TrainerCallback):
    """Writes flare_exp_checkpoint.json (base path, config YAML, data fingerprints) into every checkpoint; a
    process whose run-dir lock was taken over while it was stopped saves none (each step's end, before the
    Trainer's save: the run dir is another's now)."""

    def __init__(self, base_model_path: Path, cfg, fingerprints: list[dict], processor=None):
        self.base = str(base_model_path)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.fingerprints = fingerprints
        self.processor = processor

    def write(self, adapter_dir: Path, **extra) -> None:
        sort_adapter_config(adapter_dir)  # PEFT's set order: one adapter, one config sha256 in later fingerprints
        if self.processor is not None:
            self.processor.save_pretrained(adapter_dir)
        write_meta(adapter_dir, self.base, self.config_yaml, data=self.fingerprints, **extra)
        shared_as_umask(adapter_dir)  # safetensors writes its weights 0600: a teammate could not read them

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            check_still_held()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            check_still_held()  # a save a stop cut into: not completed (nor marked) in a dir that is another's
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                self.write(ckpt, step=state.global_step, **{STEP_SHAPE: step_shape(args)})
                mark_complete(ckpt)  # last: the Trainer's files and ours are all written
