"""Our sft / rl settings reach transformers' TrainingArguments and TRL's GRPOConfig: a key the trainer lacks is
left out there, so every such key is either ours (used by the stage itself) or translated. transformers 5 has no
warmup_ratio: it was left out, and no run warmed up."""
import dataclasses
import math

import pytest
from transformers import TrainingArguments
from trl import GRPOConfig

from conftest import compose_cfg
from flare_exp.config import RLConfig, SFTConfig
from flare_exp.training import trainer_arguments

# the stages' own settings: read by flare-exp, never meant for the trainer
OURS = {
    SFTConfig: {"answer_logits_only", "card_preset", "compile_backend", "compile_layers", "compile_precision",
                "early_stopping_patience", "eval_max_new_tokens", "eval_per_task", "group_by_length", "init_from",
                "max_eval_samples", "max_train_samples", "on_too_long", "profile_steps", "recompute_above_tokens",
                "rope_positions", "train_file", "val_file", "wandb_mode", "wandb_project"},
    RLConfig: {"alarm_length_collapse", "alarm_min_rise", "alarm_window", "card_preset", "compile_generation",
               "decode_loop", "eval_file", "eval_max_new_tokens", "eval_per_task", "init_from", "log_rollouts_steps",
               "max_prompt_length", "max_train_samples", "on_too_long", "optuna_study", "optuna_trial",
               "profile_steps", "recompute_every_n_layers", "rollout_weights", "rollouts_groups_per_step",
               "rollouts_max_mb", "stop_on_alarm", "task_types", "train_file", "wandb_mode", "wandb_project"},
}
TRANSLATED = {"warmup_ratio"}  # -> warmup_steps below 1 (transformers 5's share of the steps)


@pytest.mark.parametrize("section, args_class", [(SFTConfig, TrainingArguments), (RLConfig, GRPOConfig)])
def test_every_setting_the_trainer_lacks_is_ours_or_translated(section, args_class):
    theirs = {f.name for f in dataclasses.fields(args_class)}
    lacking = {f.name for f in dataclasses.fields(section)} - theirs
    assert lacking == OURS[section] | (TRANSLATED - theirs), sorted(lacking ^ (OURS[section] | TRANSLATED))


@pytest.mark.parametrize("stage, args_class", [("sft", TrainingArguments), ("rl", GRPOConfig)])
@pytest.mark.parametrize("ratio, steps", [(0.1, 12), (0.5, 4), (1.0, 8), (0.0, 8)])
def test_the_warmup_ratio_warms_up_that_share_of_the_steps(tmp_path, stage, args_class, ratio, steps):
    cfg = compose_cfg([f"stage={stage}", f"{stage}.warmup_ratio={ratio}"])
    args = trainer_arguments(cfg[stage], args_class)
    kept = {k: v for k, v in args.items() if k in ("warmup_steps", "warmup_ratio")}
    made = TrainingArguments(output_dir=str(tmp_path), report_to=[], **kept)
    assert made.get_warmup_steps(steps) == math.ceil(steps * ratio)


def test_a_scheduler_or_optimizer_the_trainer_lacks_is_refused_before_any_work():
    """rl.lr_scheduler_type=foo, rl.optim=foo: refused by TrainingArguments once the model had loaded (a FAILED run
    dir ~20 s in); now with the other settings, the names read from transformers' source as its enums hold them."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from flare_exp.checks import setting_problems
    from flare_exp.package_source import trainer_choices

    assert trainer_choices() == {"lr_scheduler_type": tuple(e.value for e in SchedulerType),
                                 "optim": tuple(e.value for e in OptimizerNames)}
    said = [str(p) for p in setting_problems(compose_cfg(["stage=pipeline", "rl.lr_scheduler_type=foo",
                                                          "sft.optim=adam"]))]
    assert any(p.startswith("rl.lr_scheduler_type='foo': choose linear, cosine,") for p in said), said
    assert any(p.startswith("sft.optim='adam': choose adamw_torch,") for p in said), said
