"""Structured configs: the schema every YAML file in conf/ and every command-line override is checked against.

Registered in Hydra's ConfigStore as ``config_schema``; conf/config.yaml lists it first in its defaults, so a
misspelt key (``data.roott=x``) or a wrong type (``sft.max_steps=ten``) fails at compose time with a message
naming the key, before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from flare_exp.data.records import FLARE_DATASETS
from flare_exp.decode_config import DecodingConfig
from flare_exp.eval_config import (CheXbertConfig, CrimsonConfig, EvalConfig, GreenConfig,  # noqa: F401
                                   KeywordMetricsConfig, RunsConfig, SignificanceConfig, SweepReportConfig)
from flare_exp.reward_config import RewardConfig


@dataclass
class StageConfig:
    name: str = "pipeline"
    # For the pipeline stage: the stages run in order, each in its own sub-directory of the run dir.
    steps: List[str] = field(default_factory=list)
    # For the pipeline stage: also infer these (base: the model without adapter; sft, rl: that step's adapter),
    # each in infer-<name>/, and evaluate them beside the last model, with the significance of each move.
    compare: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    # Relative paths are taken from the directory launch.py was started in.
    output_root: str = "outputs"
    cache_dir: str = "${oc.env:FLARE_EXP_CACHE,.cache/flare_exp}"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    # "all-linear" or an explicit list of module-name suffixes.
    target_modules: Any = "all-linear"
    finetune_vision_layers: bool = True
    finetune_language_layers: bool = True
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
    modules_to_save: List[str] = field(default_factory=list)
    # backend=hf: PEFT casts each LoRA layer's input to the float32 LoRA weights; under autocast (bf16 training)
    # F.linear casts it straight back, so outside_autocast skips those copies there (same results); always:
    # PEFT's behaviour.
    input_cast: str = "outside_autocast"


@dataclass
class ModelConfig:
    name: str = MISSING
    # A local directory. A hub id works only where the machine reaches a hub (compute nodes usually don't).
    path: str = MISSING
    # What to fetch when `path` is missing, shown in the error message.
    download_hint: str = ""
    backend: str = "hf"  # hf | unsloth
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn_implementation: str = "sdpa"
    # SDPA may use cuDNN's attention kernels (PyTorch's first choice on Hopper GPUs). false: flash / memory-
    # efficient kernels instead, process-wide. An escape hatch: cuDNN SDPA errors with masks on sm90 are known
    # upstream (NaN query gradients at some lengths, pytorch/pytorch #196678, torch 2.11-2.13).
    cudnn_attention: bool = True
    # batched: the vision encoder attends over all images of one size in one call (sdpa) and builds
    # position embeddings once per image size; per_image: transformers' own per-image loops. Same math.
    vision_encoder: str = "batched"
    # The attention of decode steps (backend=hf, sdpa; prefill and training unchanged). split_kv: on a GPU a
    # Triton kernel reads each row's KV cache in slices over many programs (flare_exp/models/split_kv_attention.py;
    # 1.7x SDPA's attention at batch 128, 2.9x at 8: docs/performance.md), elsewhere as grouped. grouped: the query
    # heads that share a key/value head attend together in SDPA, reading the cache once (transformers copies it
    # per query head whenever a mask is present, 4x for Qwen3-VL-4B). transformers: its own. Same math.
    decode_attention: str = "split_kv"
    # backend=hf on a GPU: eager forwards without gradients (infer's and the rollouts' prefill) run RMSNorm, the
    # rotary embedding and SiLU x up as small compiled kernels (flare_exp/models/fused_prefill.py); the compiled
    # decode step and training keep transformers' own. Same math, eager's bf16 roundings (float32 tokens equal to
    # generate's on the 4B shapes); infer 1.17x, a GRPO step 1.10x (docs/performance.md).
    fused_prefill: bool = True
    gradient_checkpointing: bool = False
    # backend=hf on a GPU: Liger's Triton RMSNorm and rotary kernels (flare_exp/models/liger.py) for training
    # (sft, rl); infer loads without them (they broke its compiled decode step: docs/performance.md).
    liger_kernel: bool = False
    # backend=unsloth with gradient_checkpointing: also offload the checkpointed activations to CPU memory
    # (Unsloth's "unsloth" mode, the least GPU memory); false = plain recomputation, no host copies.
    unsloth_offload_activations: bool = True
    # Image token budget, applied identically in sft, rl and infer (None = the processor's own default).
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_seq_length: int = 12000
    # model=tiny: build a tiny random Qwen3-VL at `path` when it is missing, only under paths.cache_dir (a path
    # the user names elsewhere is never written into: a missing one is an error).
    build_tiny: bool = False
    # torch's CPU threads per process (None = torch's default, one per core). model=tiny: 1; its matrices are
    # too small to split, so a second thread only spins waiting (on a shared machine: 2-3x the CPU time).
    cpu_threads: Optional[int] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DemoConfig:
    seed: int = 0
    train_per_dataset: int = 8
    val_per_dataset: int = 4
    test_per_dataset: int = 2
    image_size: int = 96


@dataclass
class DataConfig:
    name: str = MISSING
    # The raw FLARE download (after unzipping, or holding the zips: prepare unzips them in place).
    root: str = MISSING
    # Where prepare writes train/val/test.jsonl and where sft/rl/infer read them.
    prepared_dir: str = MISSING
    datasets: List[str] = field(
        default_factory=lambda: list(FLARE_DATASETS))
    # Which FLARE split folders feed which output file.
    train_splits: List[str] = field(default_factory=lambda: ["training"])
    val_splits: List[str] = field(default_factory=lambda: ["validation-public"])
    test_splits: List[str] = field(default_factory=lambda: ["testing"])
    # Optional instruction put before the question, per normalised task type ("" = none).
    instructions: Dict[str, str] = field(default_factory=dict)
    unzip: bool = True
    # Decode every image in full at prepare (a broken one is a reject, not a crash in the first SFT batch).
    verify_images: bool = True
    image_workers: int = 0  # processes decoding images at prepare; 0 = one per core the job may use, at most 16
    # High-bit-depth images (16-bit, 32-bit, float) are scaled from this [low, high] to 0..255, in the images' own
    # units (e.g. [0, 4095] for 12-bit data in 16-bit files); null: each image from its own minimum and maximum.
    # Prepare records it in every record, so sft, rl and infer decode alike (docs/stages.md, Data layout).
    image_window: Optional[List[float]] = None
    strict: bool = False
    allow_overlap: bool = False
    # data=demo: generate a synthetic FLARE-layout tree at `root` when it is missing.
    demo: Optional[DemoConfig] = None


@dataclass
class TrainerSettings:
    """What sft and rl share. The settings named as in transformers' TrainingArguments / TRL's GRPOConfig are
    passed to them as they are (flare_exp.training.trainer_arguments); each stage's class below sets its own
    defaults."""
    train_file: str = "${data.prepared_dir}/train.jsonl"
    # continue from an adapter (an sft run dir or checkpoint); None = the base model with a fresh LoRA
    init_from: Optional[str] = None
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_torch"
    max_steps: int = 1500
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = 3
    max_train_samples: Optional[int] = None
    # A sample longer than the length limit: skip (and count; listed in too_long.json) or error.
    on_too_long: str = "skip"
    report_to: str = "none"  # none | wandb | tensorboard
    wandb_project: str = "flare_exp"
    wandb_mode: str = "offline"
    # > 0: torch.profiler over this many steps after the fifth; the top GPU and CPU ops go to <run dir>/profile.txt
    profile_steps: int = 0


@dataclass
class SFTConfig(TrainerSettings):
    val_file: Optional[str] = "${data.prepared_dir}/val.jsonl"
    gradient_accumulation_steps: int = 4
    per_device_eval_batch_size: int = 4
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    eval_steps: int = 100
    early_stopping_patience: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # Task metrics while training, as rl's (docs/stages.md, "Watching GRPO"): at each eval_steps step (and the
    # last) eval_per_task val_file records per task type are decoded and scored with eval's code; best/ follows
    # metric_for_best_model. 0: eval loss only (the default until its GPU cost is measured: docs/performance.md).
    eval_per_task: int = 0
    eval_max_new_tokens: Optional[int] = None
    metric_for_best_model: str = "official_mean"
    # Images are decoded and processed by the collator, a noticeable share of a GPU step when it runs in the
    # training process (docs/performance.md). Workers do it alongside the GPU.
    dataloader_num_workers: int = 4
    # Batches of similar token counts (transformers' LengthGroupedSampler over the measured lengths): less
    # padding on mixed FLARE data, but batches then tend to hold one task each. Off: plain shuffling.
    group_by_length: bool = False
    # auto (backend=hf, a GPU): sized by the card's memory (flare_exp/card.py): the same effective batch in the
    # largest micro-batch that fits, recomputation only above the tokens that fit, Liger, compiled blocks
    # (flare_exp/stages/sft_card.py; the log and sft_summary.json say what changed and why). large: the H200's
    # settings on any GPU; none: as configured.
    card_preset: str = "auto"
    # backend=hf: compile each repeated block (decoder layers, vision blocks) with torch.compile, fusing the
    # many small kernels a LoRA step launches (on by card_preset on large cards). Unsloth compiles its own.
    compile_layers: bool = False
    compile_backend: str = "inductor"  # torch.compile backend for compile_layers (aot_eager: trace only, to debug)
    # eager: inductor rounds to bf16 wherever eager does (its emulate_precision_casts), so compiled blocks train
    # to eager's losses. fused: inductor keeps fused intermediates in float32, a few % faster, but in bf16 the
    # forward and the backward then see differently rounded values and training takes another course (measured:
    # a loss of 12.31 instead of 12.57 after one step, docs/performance.md).
    compile_precision: str = "eager"
    # The LM head and the loss run only at the positions whose next token is labelled (the answer), instead of
    # at every prompt and image position: the same loss and gradients without the (batch x length x
    # vocabulary) float32 logits, faster and much smaller (docs/performance.md). false = the model's own loss
    # (Unsloth's fused op).
    answer_logits_only: bool = True
    # collator (backend=hf): Qwen3-VL's multimodal rope positions computed by the collator on the CPU (the
    # model's own code), not in the forward, where they cost ~15 GPU synchronisations per sample; model:
    # transformers' way (and Unsloth's). Same positions (flare_exp/models/rope_positions.py).
    rope_positions: str = "collator"
    # With model.gradient_checkpointing=true: a batch of at most this many tokens (per device: batch x padded
    # length) trains without recomputation, a longer one recomputes: the speed of no recomputation on the short
    # batches, the memory of recomputation on the long ones. 0 = every batch recomputes (hf backend).
    recompute_above_tokens: int = 0


@dataclass
class RLConfig(TrainerSettings, DecodingConfig):
    num_generations: int = 2
    per_device_train_batch_size: int = 2
    learning_rate: float = 5e-6
    warmup_ratio: float = 0.1
    max_completion_length: int = 256
    max_prompt_length: Optional[int] = None
    loss_type: str = "dr_grpo"
    # Dr. GRPO does not divide advantages by the group's reward std. Passed explicitly so both backends agree:
    # TRL's default is "group", and Unsloth silently switches "group" to "none" when loss_type=dr_grpo (the
    # original FLARE Task 5 GRPO script, trained with Unsloth, ran with "none").
    scale_rewards: str = "none"  # none | group | batch
    # The original script's setting. Each GRPO step here is on-policy (one pass over each generation's
    # completions: the importance ratio is 1), where "sequence" with dr_grpo's token sum gives exactly
    # token-level Dr. GRPO's gradient; TRL's warning that this pair is not GSPO's per-sequence objective (every
    # rl run) is therefore left out of the logs (flare_exp/logs.py). loss_type=grpo gives GSPO's objective.
    importance_sampling_level: str = "sequence"
    beta: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_steps: int = 800
    logging_steps: int = 1
    save_steps: int = 100
    task_types: List[str] = field(default_factory=list)  # empty = all
    # A prompt longer than max_prompt_length (default: model.max_seq_length - max_completion_length):
    # error (at startup, naming the fix) or skip.
    on_too_long: str = "error"
    # Rollouts are most of a GRPO step. They run in eval mode, decoded as cache_implementation and decode_loop
    # say (flare_exp/decode_config.py): with model.backend=hf a static KV cache and a compiled decode step (CUDA
    # graphs; GPU only, the first step pays about a minute of compilation; docs/performance.md for the
    # speed-up); with backend=unsloth TRL's defaults.
    compile_generation: Optional[bool] = None  # null = auto: on for backend=hf with a static cache
    use_vllm: bool = False
    # The weights the rollouts decode with (flare_exp/models/rollout_weights.py). adapter: the policy's unmerged
    # LoRA, whose float32 products (PEFT's dtype) cost nearly as much per decode token as the bf16 model itself
    # (docs/performance.md). merged: before each rollout W + scaling * B @ A is rounded once into a bf16 copy
    # of the LoRA layers' weights (fixed buffers, kept for the run: their size in GPU memory, 7.6 GiB for
    # Qwen3-VL-4B) and the rollout decodes with it, the adapter off; the loss still uses the adapter (1.27x a
    # GRPO step on an H200). auto: merged where the rollouts run the graph decode loop on a GPU and the copy
    # fits beside training, else adapter. backend=hf only (auto keeps the adapter elsewhere).
    rollout_weights: str = "auto"
    # Each row's images are decoded when the DataLoader reads it (grpo_dataset's lazy transform); workers do it
    # beside the GPU instead of between steps (0.15 s of an H200's 2.9 s step waited for them in the training
    # process; with 2 workers 0.001 s: docs/performance.md).
    dataloader_num_workers: int = 2
    wandb_project: str = "flare_exp_rl"
    # Watching GRPO (docs/stages.md, "Watching GRPO"). Every log_rollouts_steps steps (0: never), a few prompts'
    # groups (completions, reward terms, totals, advantages) go to <run dir>/rollouts.jsonl and rollouts.html;
    # the file stops growing at rollouts_max_mb (said once).
    log_rollouts_steps: int = 10
    rollouts_groups_per_step: int = 2
    rollouts_max_mb: float = 20.0
    # Every eval_steps steps (0: never) the policy decodes, greedily, a fixed stratified subset of eval_file
    # (eval_per_task records per task type trained, spread over its datasets, the same records every time) with
    # infer's decode loop, scored with eval's code. eval_max_new_tokens: null = infer.max_new_tokens.
    eval_steps: int = 0
    eval_per_task: int = 16
    eval_file: str = "${data.prepared_dir}/val.jsonl"
    eval_max_new_tokens: Optional[int] = None
    # The held-out number the best/ checkpoint, the alarm and Optuna's pruning follow: '<task>.<metric>' as in
    # eval's metrics.json (official block first, e.g. classification.balanced_accuracy, report_generation.rouge_l),
    # or official_mean (the mean of the official numbers that are higher-is-better: balanced accuracy, F1, GREEN).
    metric_for_best_model: str = "official_mean"
    # The reward-hacking alarm over the last alarm_window logged steps: the reward rose by alarm_min_rise (mean of
    # the window's second half over its first) while the held-out metric fell, one term saturated while another
    # fell, or the completions collapsed to alarm_length_collapse (above 0, below 1) x their first steps' length or
    # hit the cap in most groups. Said in the log and rl_summary.json; stop_on_alarm=true also stops the run.
    alarm_window: int = 20
    alarm_min_rise: float = 0.05
    alarm_length_collapse: float = 0.5
    stop_on_alarm: bool = False
    # auto (a GPU): the completions per step (micro-batch x accumulation) kept, split into the largest micro-batch
    # the card's memory fits (flare_exp/card.py; the log and rl_summary.json say why); none: as configured.
    card_preset: str = "auto"
    # With model.gradient_checkpointing=true (backend=hf), which layers recompute their activations in the
    # backward instead of keeping them (transformers' every_n_layers): 1 = every layer (the least memory), n = every
    # n-th (the others keep theirs), 0 = none. auto: as few as the card's memory allows (flare_exp/card.py); 1
    # without a GPU or under card_preset=none. Speed only: the loss and gradients are the same.
    recompute_every_n_layers: Any = "auto"
    # Set by the Optuna sweeper when it prunes (hydra.sweeper.pruner): the study file and this job's trial.
    optuna_study: Optional[str] = None
    optuna_trial: Optional[int] = None


@dataclass
class InferConfig(DecodingConfig):
    checkpoint: Optional[str] = None  # None = the base model at model.path
    label: Optional[str] = None  # column header in the sheet; default: derived from the checkpoint
    split: str = "val"
    input_file: Optional[str] = None  # default: ${data.prepared_dir}/<split>.jsonl
    # Prompts per generate call (length-sorted): larger batches make more reports/s until memory runs out
    # (docs/performance.md); a static cache of 32 x ~900 tokens takes ~4 GiB. auto: sized by the card's memory
    # (flare_exp/card.py: 128 on an 80 GiB card; 32 without a GPU); a number is used as it is.
    batch_size: Any = "auto"
    num_samples: int = 0  # <= 0: all
    max_new_tokens: int = 256
    # Every report at least this many new tokens (the end token held back until then); null: none. The
    # benchmark sets it to max_new_tokens, so every report costs the same.
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    sort_by_length: bool = True
    # Group the records by task type before batching, the longest answers first (reports, label lists, labels,
    # numbers): a batch ends when its longest answer does, so short answers no longer wait on a report in their
    # batch. The output keeps the input's order and the same predictions (tested); off until measured on a GPU.
    bucket_by_task: bool = False
    # cache_implementation and decode_loop: flare_exp/decode_config.py.
    # The graph loop keeps a KV cache while it is long enough, at most twice the need (prompts come longest
    # first: a large batch's cache would slow every later short batch); true keeps any long enough one, as
    # generate does (for comparison).
    keep_long_cache: bool = False
    # Profile the N-th batch (1 = the first) into <run dir>/profile.txt; null: none.
    profile_batch: Optional[int] = None
    # Fold a LoRA checkpoint into the weights (backend=hf): same outputs up to rounding, fewer kernels per token.
    merge_adapter: bool = True
    # Where images are resized and patched: auto = the model's device (GPU when there is one), or cpu.
    image_device: str = "auto"
    # The next batch's input (image processing, upload) built in the reader thread on a second CUDA stream while
    # this batch decodes (model and image_device on a GPU): auto wherever the batch fits the card.
    inputs_ahead: Any = "auto"  # auto | true | false
    # Threads reading and decoding the next batch's image files while this batch decodes: auto = this process's
    # share of its CPU cores, at most 8 (large X-rays take ~0.1 s each to decode; 1 = one thread, as before).
    image_threads: Any = "auto"


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep_report: SweepReportConfig = field(default_factory=SweepReportConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Set by conf/experiment/*.yaml; "demo" guards against running demo budgets on real data.
    experiment_name: str = "none"
    run_name: str = "${stage.name}-${data.name}-${model.name}"
    seed: int = 42
    # A finished run (DONE marker) is never overwritten unless this is true.
    overwrite: bool = False
    # auto: continue from the last checkpoint in the run dir if there is one; never: start fresh
    # (refusing if checkpoints exist); or a checkpoint path.
    resume: str = "auto"
    # A stage starts from a training run's finished adapter; true lets sft.init_from / rl.init_from /
    # infer.checkpoint name an intermediate checkpoint-N of it on purpose.
    allow_intermediate_checkpoint: bool = False


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


register_configs()
