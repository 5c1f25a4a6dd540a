"""rl stage: GRPO (TRL GRPOTrainer) from the SFT adapter, with the reward built from ``reward=...``.

Setup (settings check, model + adapter, GRPO dataset with lazily loaded images, reward) -> train
(resumable from the run dir's last checkpoint) -> save final/ adapter, log history and rl_summary.json
(the numbers a sweep report compares). Same code for model.backend=hf and model.backend=unsloth.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

from flare_exp.card import apply_rl_card, kept_share, sized_infer_batch
from flare_exp.compile_cache import prepare_gpu_run
from flare_exp.data.decoding import check_records_window
from flare_exp.data.vision import VisionChat, emptied, filter_by_length, render_messages
from flare_exp.data.prepared_split import read_prepared_split
from flare_exp.io import write_json
from flare_exp.models.decoding import Decoding, DecodeSettings, decoder_for
from flare_exp.models.grouped_attention import attention_used
from flare_exp.models.loading import load_model
from flare_exp.models.recompute import recompute_every
from flare_exp.models.rollout_weights import SETTINGS as ROLLOUT_WEIGHTS, RolloutWeights, auto_margin_bytes
from flare_exp.rewards.combine import build_reward
from flare_exp.rl_monitor.callbacks import (RewardTermLog, RolloutWeightsLog, build_monitor, check_monitor_settings,
                                           finish_monitor, rollout_weights_spans, with_rollout_watch)
from flare_exp.rl_monitor.heldout_watch import reporting_last
from flare_exp.rl_monitor.reward_summary import ending, reward_line, summarise
from flare_exp.run.layout import summary_name
from flare_exp.run.stage import Stage
from flare_exp.runtime import abspath, check_choice, check_each, ranks
from flare_exp.step_batch import effective_batch
from flare_exp.training import (CheckpointMeta, ProgressLog, cpu_ranks_args, data_fingerprints, half_precision,
                                profiling, schedule_changes, setup_tracking, train_and_save, trainer_arguments,
                                trainer_choice_checks)


STAGE = Stage(
    name="rl",
    help="GRPO from an SFT adapter with task-aware rewards (reward=flare | seed)",
    reads=("rl.train_file", "rl.init_from"),
    deciding=("seed", "data.root", "model", "rl", "reward"),
    free=(
        "model speed", "rl.max_steps", "rl.logging_steps", "rl.save_steps", "rl.save_total_limit",
        "rl.log_rollouts_steps", "rl.rollouts_max_mb", "rl.rollouts_groups_per_step",  # what is logged, not learnt
        "rl.cache_implementation", "rl.compile_generation", "rl.decode_loop", "rl.use_vllm", "rl.profile_steps",
        "rl.rollout_weights", "rl.dataloader_num_workers", "rl.recompute_every_n_layers",
        "rl.report_to", "rl.wandb_project", "rl.wandb_mode", "reward.radgraph.cache_size",
        "reward.radgraph.device", "reward.radgraph.build_tiny"),
    budget=("rl.max_steps",),
    fingerprinted=("rl.train_file", "rl.eval_file"),
    read_when={"rl.eval_file": "rl.eval_steps"},
    starts_from="rl.init_from",
    resumable=("checkpoint-*",),
    ranks="several",
    loads_model=True,
    trains=True,
    feeds_from={"rl.init_from": ("sft",)},
    pipeline_step=True,
    reads_doc="`rl.train_file`, `rl.init_from` (SFT run dir, pipeline dir or adapter)",
    writes_doc="same as sft, `rl_summary.json`",
)

log = logging.getLogger(__name__)


def grpo_dataset(records: list[dict], chat: VisionChat):
    """Prepared records as GRPO rows: conversational prompt with one image placeholder per view, the images,
    and the columns the reward reads. Images are loaded when a row is read (a lazy transform), so the
    dataset never holds every picture in memory. The image names stay (the rollout log shows them)."""
    import json

    from datasets import Dataset

    table = Dataset.from_list([{
        "prompt_json": json.dumps(render_messages([m for m in r["messages"] if m["role"] != "assistant"])),
        "image_paths": r["images"], "task_type": r["task_type"], "answer": r["answer"], "dataset": r["dataset"],
        "id": r["id"], "image_window": r.get("image_window")} for r in records])

    def materialise(batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "prompt_json"}  # the window too: the rollout log shows the views
        out["prompt"] = [json.loads(p) for p in batch["prompt_json"]]
        out["images"] = [chat.load_images({"id": i, "images": paths, "image_window": window})
                         for i, paths, window in zip(batch["id"], batch["image_paths"], batch["image_window"])]
        return out

    return table.with_transform(materialise)


def check_settings(cfg) -> int:
    """Fail at startup, saying what to change, instead of deep inside TRL: every refusal together (one does not
    hide the next). Returns the prompt length limit."""
    rl, backend = cfg.rl, cfg.model.backend
    check_each((check_generation_round, rl), (check_trl_choices, rl), lambda: rollout_settings(rl, backend).check(),
               (check_rollout_weights, rl, backend), (check_recompute, rl, backend), (check_monitor_settings, rl),
               (prompt_length_limit, rl, cfg.model.max_seq_length), (check_vllm_installed, rl),
               *trainer_choice_checks("rl", rl))
    return prompt_length_limit(rl, cfg.model.max_seq_length)


def check_generation_round(rl) -> None:
    generation_batch = rl.per_device_train_batch_size * rl.gradient_accumulation_steps
    if rl.num_generations < 2:
        raise ValueError(f"rl.num_generations={rl.num_generations}: GRPO needs at least 2 completions per prompt")
    if generation_batch % rl.num_generations:
        raise ValueError(
            f"rl.per_device_train_batch_size x rl.gradient_accumulation_steps = {generation_batch} completions per "
            f"generation round is not divisible by rl.num_generations={rl.num_generations}. Make the batch a "
            f"multiple of it, e.g. rl.per_device_train_batch_size={rl.num_generations * max(1, round(rl.per_device_train_batch_size / rl.num_generations))}")


def check_trl_choices(rl) -> None:
    loss_types = trl_loss_types()  # TRL itself would refuse an unknown one only at the first loss, after rollouts
    check_each((check_choice, "rl.scale_rewards", rl.scale_rewards, ("none", "group", "batch")),
               (check_choice, "rl.importance_sampling_level", rl.importance_sampling_level, ("token", "sequence")),
               (check_choice, "rl.on_too_long", rl.on_too_long, ("error", "skip")),
               *([(check_choice, "rl.loss_type", rl.loss_type, loss_types)] if loss_types else []))


def prompt_length_limit(rl, max_seq_length: int) -> int:
    limit = rl.max_prompt_length or max_seq_length - rl.max_completion_length
    if limit <= 0:
        raise ValueError(f"rl.max_completion_length={rl.max_completion_length} leaves no room for the prompt in "
                         f"model.max_seq_length={max_seq_length}")
    return limit


def check_vllm_installed(rl) -> None:
    if rl.use_vllm and importlib.util.find_spec("vllm") is None:  # else TRL's ImportError after the model loads
        raise ValueError("rl.use_vllm=true: vLLM is not installed in this environment (TRL's vLLM rollouts import "
                         "it); install a vllm that matches torch on the GPU nodes, or leave rl.use_vllm=false (the "
                         "graph decode loop)")


def check_rollout_weights(rl, backend: str) -> None:
    """rl.rollout_weights: merged swaps PEFT's LoRA layers of transformers' model (as model.liger_kernel, hf only)
    and decodes with the policy, not with vLLM's own copy of it."""
    check_choice("rl.rollout_weights", rl.rollout_weights, ROLLOUT_WEIGHTS)
    if rl.rollout_weights == "merged" and backend != "hf":
        raise ValueError("rl.rollout_weights=merged is for model.backend=hf (Unsloth patches its LoRA layers its "
                         "own way): pass rl.rollout_weights=adapter")
    if rl.rollout_weights == "merged" and rl.use_vllm:
        raise ValueError("rl.rollout_weights=merged decodes with the policy, rl.use_vllm=true with vLLM: pass one "
                         "of them")


def check_recompute(rl, backend: str) -> None:
    n = rl.recompute_every_n_layers
    if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"rl.recompute_every_n_layers={n!r}: auto, 0 (no layer recomputes), 1 (every layer) or "
                         "n (every n-th layer)")
    if n not in ("auto", 1) and backend != "hf":
        raise ValueError(f"rl.recompute_every_n_layers={n} is for model.backend=hf (Unsloth checkpoints its own "
                         "way): leave it at auto")


def recomputes(cfg) -> bool:
    """GRPOConfig's gradient_checkpointing: TRL's default turns it on whatever the model says, and the Trainer
    enables it again at train(); model.gradient_checkpointing=false and rl.recompute_every_n_layers=0 hold there
    only when passed. Every n-th layer (n >= 2) is chosen per loss pass (flare_exp/models/recompute.py)."""
    return bool(cfg.model.gradient_checkpointing) and cfg.rl.recompute_every_n_layers != 0


def rollout_weights_of(rl, backend: str, graph_loop: bool) -> RolloutWeights:
    """rl.rollout_weights for this run; auto's margin for a rollout of TRL's generation batch (micro-batch x
    accumulation rows) and a training pass of the micro-batch, at the card preset's typical prompt length."""
    from flare_exp.card import MEMORY_MODEL

    tokens = MEMORY_MODEL["infer_prompt_tokens"] + rl.max_completion_length
    rows = rl.per_device_train_batch_size * rl.gradient_accumulation_steps
    return RolloutWeights(rl.rollout_weights, backend, graph_loop, auto_margin_bytes(
        rows, rl.per_device_train_batch_size, tokens, kept_share(rl.recompute_every_n_layers)))


def trl_loss_types() -> tuple[str, ...]:
    """The GRPO loss types the installed TRL supports, as its GRPOConfig documents them ("Supported values are
    'grpo', 'dr_grpo', ..."; the list grows between TRL versions); empty when that text is not found. Read from
    TRL's source where it can be: importing GRPOConfig imports transformers' trainer (~8 s), and a sweep's
    launcher runs this check for every job before it submits any."""
    import re

    from flare_exp.package_source import field_help, parsed

    text = field_help(parsed("trl", "trainer/grpo_config.py"), "GRPOConfig", "loss_type")
    if text is None:
        import dataclasses

        from trl import GRPOConfig

        text = next((f.metadata.get("help", "") for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type"), "")
    supported = re.search(r"Supported values are (.*?)\.\s", text)
    return tuple(re.findall(r"'(\w+)'", supported.group(1))) if supported else ()


def rollout_settings(rl, backend: str) -> DecodeSettings:
    """The rollouts' decoding (rl.decode_loop, rl.cache_implementation, rl.compile_generation, rl.use_vllm).
    TRL keeps its static cache on a CPU too (uncompiled there). With the graph loop, prompts vary in length
    from step to step, so caches come in steps of 256 tokens (a few compiled graphs), and in random order the
    longest is kept (shrinking and growing again would recompile)."""
    return DecodeSettings.of("rl", rl, backend, static_on_cpu=True, cache_multiple=256, shrink_cache=False)


def with_rollouts_in_eval_mode(trainer_class):
    """TRL generates with the policy in training mode. Eval mode for the rollout (restored afterwards) keeps
    dropout and the gradient-checkpointing wrappers out of the decode loop, and lets a compiled decode step
    be traced once for inference instead of for training. If compiling the decode step fails (another GPU,
    another torch), training goes on with eager rollouts and says so once. Where ``decoding`` (the rollouts'
    ``decoder_for``) chose the graph loop, the policy's generate is answered by it during the rollout. With
    ``rollout_weights`` (rl.rollout_weights) the rollout decodes with the policy's merged copy where it chose
    one. Only the rollout: the held-out eval (rl.eval_steps) runs between steps with the adapter, so the metric
    that picks best/, raises the alarm and prunes trials is the same whichever rollout_weights a run takes."""

    class FlareGRPOTrainer(trainer_class):
        decoding: Decoding | None = None
        rollout_weights: RolloutWeights | None = None

        def _generate_single_turn(self, *args, **kwargs):
            config = getattr(self, "generation_config", None)
            rollout = lambda: super(FlareGRPOTrainer, self)._generate_single_turn(*args, **kwargs)  # noqa: E731
            was_training = self.model.training
            self.model.eval()
            graph = self.decoding.graph if self.decoding is not None else None
            policy = self.accelerator.unwrap_model(self.model_wrapped)  # each DDP rank merges its own copy
            if graph:  # TRL calls the unwrapped policy's generate
                policy.generate = functools.partial(graph.generate, policy, policy.generate)
            weights = self.rollout_weights or RolloutWeights("adapter", "hf", False)
            if getattr(self, "first_rollout_step", None) is None:  # this attempt's (a resume: its first step)
                self.first_rollout_step = self.state.global_step + 1
            try:
                with weights.around_rollout(policy):
                    if self.decoding is None:
                        return rollout()
                    return self.decoding.attempt_compiled(rollout, "the rollout decode step", also_off=lambda: (
                        config is not None and setattr(config, "disable_compile", True)))
            finally:
                if graph:
                    del policy.generate
                self.model.train(was_training)

    if not hasattr(trainer_class, "_generate_single_turn"):  # another TRL layout: keep its own behaviour
        log.warning("this TRL version has no GRPOTrainer._generate_single_turn: rollouts stay in training mode")
        return trainer_class
    return FlareGRPOTrainer


def vision_token_ids(model_config) -> list[int]:
    """The image/video placeholder and vision start/end tokens: a rollout must never sample them. TRL
    suppresses only the image token; a sampled <|vision_start|> as a completion's last token makes
    transformers' rope index read past the sequence in the loss forward (IndexError; seen with the tiny demo
    model), and any of them would be read as an image slot."""
    names = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    return sorted({getattr(model_config, n) for n in names if getattr(model_config, n, None) is not None})


def grpo_args(cfg, out_dir: Path, report_to: str, bf16: bool, suppress_tokens: list[int] | None = None):
    import torch
    from trl import GRPOConfig

    rl = cfg.rl
    cache, _ = rollout_settings(rl, cfg.model.backend).generate_settings(on_gpu=True)  # TRL's, on any device
    # vLLM takes generation_kwargs as its sampling parameters, which have no suppress_tokens
    generation_kwargs = {"suppress_tokens": suppress_tokens} if suppress_tokens and not rl.use_vllm else None
    return GRPOConfig(
        output_dir=str(out_dir),
        # the prompt length limit is checked here (rl.on_too_long); a resolved cache; tracking set up first
        # eval_steps / metric_for_best_model are the held-out eval's (rl_monitor), not the Trainer's evaluation
        **trainer_arguments(rl, GRPOConfig, ("report_to", "cache_implementation", "max_prompt_length", "eval_steps",
                                             "metric_for_best_model")),
        report_to=report_to, cache_implementation=cache, generation_kwargs=generation_kwargs,
        bf16=bf16, remove_unused_columns=False, seed=cfg.seed, disable_tqdm=False, logging_first_step=True,
        dataloader_pin_memory=torch.cuda.is_available(), **cpu_ranks_args(), gradient_checkpointing=recomputes(cfg),
    )


def applied_config(cfg) -> tuple:
    """The config rl trains with (rl.card_preset applied: the run records it as its config.yaml) and what the
    preset decided (run_info.json's ``applied``); the configured values stay in its fingerprint."""
    return apply_rl_card(cfg)


def run(cfg, out_dir: Path, applied: dict | None = None) -> dict:
    """``cfg``: the config applied_config made (the Run records it); called alone, it applies it itself."""
    import torch
    from trl import GRPOTrainer

    prompt_limit = check_settings(cfg)
    prepare_gpu_run(cfg)
    if applied is None:
        cfg, applied = applied_config(cfg)
    card_choice = applied
    cfg, _ = sized_infer_batch(cfg)  # the held-out evals' decode batch (rl.eval_steps)
    rl = cfg.rl
    reward = build_reward(cfg.reward)
    records, wanted = training_records(cfg, reward)
    torch.manual_seed(cfg.seed)
    if rl.init_from is None:
        log.info("rl: no rl.init_from: GRPO starts from the base model (model.path=%s) with a fresh LoRA; "
                 "rl.init_from=<an sft run dir> starts from its adapter", cfg.model.path)
    loaded = load_model(cfg.model, init_from=rl.init_from, training=True, seed=cfg.seed)
    if cfg.model.gradient_checkpointing and rl.recompute_every_n_layers == 0:
        loaded.model.gradient_checkpointing_disable()  # rl.recompute_every_n_layers=0: every layer keeps its own
        log.info("rl.recompute_every_n_layers=0: no layer recomputes in the backward (every layer keeps its "
                 "activations: the most memory)")
    # TRL pads the prompts on the left and encodes their images again for the loss with the processor's own
    # padding side: both must agree, or the mm_token_type_ids (transformers 5) are shifted against the prompt
    # tokens in a batch of unequal prompts (the processor saved by SFT pads on the right)
    loaded.processor.tokenizer.padding_side = "left"
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    records, skipped = prompts_that_fit(chat, records, prompt_limit, rl.on_too_long, out_dir)
    # torch.compile runs on GPUs only here; the trainer moves the policy there
    decoding = decoder_for(loaded.model, rollout_settings(rl, cfg.model.backend), on_gpu=torch.cuda.is_available())
    cache, compiled, graph = decoding.cache, decoding.compiled, decoding.graph is not None
    compiled_on_gpu = compiled and torch.cuda.is_available()
    log.info("rl: %d prompts (%s), init_from=%s, backend=%s, rollouts: %s%s", len(records), ", ".join(wanted),
             loaded.adapter, cfg.model.backend, "graph decode loop, static KV cache" if graph else
             f"generate, {cache or 'dynamic'} KV cache", ", compiled decode" if compiled_on_gpu else "")
    if cfg.model.backend == "unsloth" and not compiled:
        # generation is most of a GRPO step and Unsloth does not speed up TRL's decode loop
        log.warning("rl with model.backend=unsloth: its rollouts are TRL's own generate loop, several times slower "
                    "per GRPO step than backend=hf's graph decode loop (docs/performance.md) for a few GiB less "
                    "memory. model.backend=hf is the faster choice for this stage unless memory is short")
    report_to = setup_tracking(rl, out_dir)
    meta = CheckpointMeta(loaded.base_path, cfg, data_fingerprints(rl.train_file), loaded.processor)
    monitor = build_monitor(cfg, out_dir, reward, wanted, chat, meta)
    trainer_class = with_rollout_watch(with_rollouts_in_eval_mode(GRPOTrainer), monitor)
    if recomputes(cfg) and rl.recompute_every_n_layers not in (1, "auto"):
        trainer_class = recompute_every(trainer_class, rl.recompute_every_n_layers)
    trainer = trainer_class(
        model=loaded.model, reward_funcs=[reward], processing_class=loaded.processor,
        args=grpo_args(cfg, out_dir, report_to, half_precision(loaded.model)[0], vision_token_ids(loaded.model.config)),
        train_dataset=grpo_dataset(records, chat),
        callbacks=[RewardTermLog(reward), monitor, ProgressLog(), meta, *profiling(rl, out_dir)])
    reporting_last(trainer)
    if hasattr(trainer, "generation_config"):  # TRL turns compilation off for its rollouts
        trainer.generation_config.disable_compile = not compiled
    trainer.decoding = decoding
    trainer.rollout_weights = rollout_weights_of(rl, cfg.model.backend, graph)
    trainer.add_callback(RolloutWeightsLog(trainer))
    _, final, lead = train_and_save(trainer, "rl", cfg, out_dir, meta, report_to, oom_remedies(cfg),
                                    final_meta=lambda t: {"init_from": str(loaded.adapter or "")})
    summary = {**summarise(trainer.state.log_history, trainer.state.global_step), **schedule_changes(trainer.state)}
    summary.update(final_adapter=str(final), prompts=len(records), skipped_too_long=skipped,
                   decode_loop=decoding.used, decode_attention=attention_used(loaded.model),
                   rollout_weights=trainer.rollout_weights.used, card_preset=card_choice,
                   **rollout_weights_spans(trainer.state.log_history, trainer.rollout_weights.used),
                   **effective_batch(rl, trainer.args.world_size))
    if lead:
        summary.update(finish_monitor(monitor, trainer.state.log_history, out_dir, rl.max_steps))
        write_json(out_dir / summary_name("rl"), summary)
    log.info("rl %s: adapter at %s; %s", ending(summary), final, reward_line(summary))
    return summary


def training_records(cfg, reward) -> tuple[list[dict], list[str]]:
    """The prepared records with answers of the task types trained (rl.task_types, else the reward's)."""
    rl = cfg.rl
    records = [r for r in read_prepared_split(abspath(rl.train_file)) if r.get("answer") is not None]
    check_records_window(records, cfg.data.image_window, rl.train_file)
    wanted = list(rl.task_types) or reward.task_types()
    records = [r for r in records if r["task_type"] in wanted]
    missing = sorted({r["task_type"] for r in records} - set(reward.task_types()))
    if missing:
        raise ValueError(f"reward={cfg.reward.name} has no weights for task types {missing}; set "
                         f"reward.<task>.weights or restrict rl.task_types")
    if rl.max_train_samples:
        records = records[:rl.max_train_samples]
    if not records:
        raise ValueError(f"{rl.train_file}: no records for task types {wanted}")
    return records, wanted


def prompts_that_fit(chat: VisionChat, records: list[dict], limit: int, on_too_long: str,
                     out_dir: Path) -> tuple[list[dict], int]:
    """The records whose prompts fit in ``limit`` tokens; the others stop the run (rl.on_too_long=error) or are
    skipped and listed in too_long.json."""
    kept, too_long, _ = filter_by_length(chat, records, limit, "skip", with_answer=False)
    records, gone = kept, emptied(records, kept, "task_type") if kept else []
    if too_long:
        msg = (f"{len(too_long)} prompts are longer than {limit} tokens (model.max_seq_length - "
               f"rl.max_completion_length), e.g. {too_long[0]['id']} with {too_long[0]['tokens']}")
        if on_too_long == "error":
            raise ValueError(msg + ". Raise model.max_seq_length, lower model.max_pixels or "
                             "rl.max_completion_length, or pass rl.on_too_long=skip")
        if not records:  # else a run of 0 steps whose final/ is the adapter it started from, marked DONE
            raise ValueError(f"all {msg}: none is left to train on. Raise model.max_seq_length, lower "
                             "model.max_pixels or rl.max_completion_length")
        log.warning("%s: skipped%s", msg, f"; every prompt of {', '.join(gone)} was, so GRPO does not train "
                    f"{'that task type' if len(gone) == 1 else 'those task types'} here (their reward weights change "
                    "nothing)" if gone else "")
        if ranks()[0] == 0:
            write_json(out_dir / "too_long.json", too_long)
    return records, len(too_long)


def oom_remedies(cfg) -> list[str]:
    rl = cfg.rl
    return [*([] if cfg.model.gradient_checkpointing else ["set model.gradient_checkpointing=true"]),
            *(["set rl.recompute_every_n_layers=1 (every layer recomputes)"]
              if cfg.model.gradient_checkpointing and rl.recompute_every_n_layers not in (1, "auto") else []),
            f"lower rl.per_device_train_batch_size={rl.per_device_train_batch_size} (raise "
            "rl.gradient_accumulation_steps to keep the completions per step; their product stays a multiple "
            f"of rl.num_generations={rl.num_generations})",
            f"lower rl.max_completion_length={rl.max_completion_length}",
            "lower model.max_pixels (fewer image tokens per view)"]
