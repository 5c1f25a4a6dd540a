"""The settings every step of a run would otherwise trip over late, checked before any work: numeric ranges
(a batch of 0, a negative learning rate, ``sft.max_steps=0``: a ZeroDivisionError or a run that trains nothing
and says DONE), the reward's terms and parameters, and (with ``inputs``) the judge and scorer files the later
steps load. A pipeline checks the sections of all its steps, so a bad rl or eval setting stops it before its
sft step runs for hours.
"""
from __future__ import annotations

import math

from omegaconf import OmegaConf

# rule -> (test, what the message asks for). A learning rate of 0 is allowed: a measurement of drift without updates.
RULES = {
    "count": (lambda v: v >= 1, "an integer >= 1"),
    "count0": (lambda v: v >= 0, "an integer >= 0"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer from 0 to 2**32 - 1 (numpy's range)"),
    "batch": (lambda v: v >= 1, "an integer >= 1 or auto (sized by the card's memory)"),
    "limit": (lambda v: v >= 0, "an integer >= 0 (0 or null: no limit)"),
    "every": (lambda v: v >= 0, "an integer >= 0 (0: never)"),
    "steps": (lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1: sft.num_train_epochs decides)"),
    "positive": (lambda v: v > 0, "a number > 0"),
    "non_negative": (lambda v: v >= 0, "a number >= 0"),
    "ratio": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "dropout": (lambda v: 0 <= v < 1, "a number from 0 to below 1"),
    "probability": (lambda v: 0 < v <= 1, "a number above 0, at most 1"),
    "generations": (lambda v: v >= 2, "an integer >= 2 (GRPO compares completions of one prompt)"),
    "trials": (lambda v: 0 <= v <= 1_000_000, "an integer from 0 to 1,000,000 (0: none; a p-value resolves to "
                                                "1/(1 + trials), more only takes longer)"),
}
# rules of counts: a float is refused even where the schema's type lets one through (a batch is int or "auto")
WHOLE_NUMBERS = {"count", "count0", "batch", "limit", "every", "steps", "generations", "seed", "trials"}
TRAINER = {"per_device_train_batch_size": "count", "gradient_accumulation_steps": "count",
           "learning_rate": "non_negative", "warmup_ratio": "ratio", "max_steps": "count", "logging_steps": "count",
           "save_steps": "count", "save_total_limit": "count", "max_train_samples": "limit",
           "profile_steps": "count0"}
# section -> key -> rule; None values (optional settings) are not checked
RANGES = {
    "sft": {**TRAINER, "max_steps": "steps", "per_device_eval_batch_size": "count", "weight_decay": "non_negative",
            "num_train_epochs": "positive", "eval_steps": "every", "early_stopping_patience": "count",
            "max_eval_samples": "limit", "dataloader_num_workers": "count0", "eval_per_task": "count0",
            "eval_max_new_tokens": "count"},
    "rl": {**TRAINER, "num_generations": "generations", "max_completion_length": "count",
           "max_prompt_length": "count", "dataloader_num_workers": "count0", "beta": "non_negative",
           "temperature": "positive", "top_p": "probability", "eval_steps": "every", "eval_per_task": "count0",
           "eval_max_new_tokens": "count", "log_rollouts_steps": "every", "rollouts_max_mb": "non_negative",
           "rollouts_groups_per_step": "count"},
    "infer": {"batch_size": "batch", "max_new_tokens": "count", "min_new_tokens": "count0",
              "temperature": "positive", "top_p": "probability", "profile_batch": "count"},
    "eval": {"green.batch_size": "batch", "green.max_length": "count", "green.max_new_tokens": "count",
             "crimson.batch_size": "count", "crimson.max_new_tokens": "count",
             "significance.resamples": "trials", "significance.ar_trials": "trials", "significance.seed": "count0",
             "chexbert.batch_size": "count"},
    "model": {"max_seq_length": "count", "min_pixels": "count", "max_pixels": "count", "lora.r": "count",
              "lora.alpha": "positive", "lora.dropout": "dropout"},
    "data": {"image_workers": "count0"},
    "reward": {"radgraph.cache_size": "count0"},
}
# the sections each step reads
SECTIONS = {"prepare": ("data",), "sft": ("sft", "model"), "rl": ("rl", "model", "reward"),
            "infer": ("infer", "model"), "eval": ("eval",), "runs": ("eval",)}  # runs.compare: eval.significance


def range_problems(cfg, steps: set[str]) -> list[str]:
    """Every numeric setting the steps read that is out of its range, each with its key and value (the run's
    seed too: numpy refuses a negative one only once the trainer seeds it)."""
    sections = sorted({s for step in steps for s in SECTIONS.get(step, ())})
    checked = [("seed", "seed")] + [(f"{section}.{key}", rule) for section in sections
                                      for key, rule in RANGES[section].items()]
    problems = []
    for key, rule in checked:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        test, wanted = RULES[rule]
        if (value is None and rule != "batch") or (rule == "batch" and value == "auto"):
            continue  # an optional setting left unset; a batch sized by the card
        if value is None or isinstance(value, (str, bool)) or (rule in WHOLE_NUMBERS and not isinstance(value, int)):
            problems.append(f"{key}={value!r}: must be {wanted}")
        elif not math.isfinite(value) or not test(value):
            problems.append(f"{key}={value}: must be {wanted}")
    return problems + _pair_problems(cfg, steps)


def _pair_problems(cfg, steps: set[str]) -> list[str]:
    """Settings whose range depends on another setting."""
    from flare_exp.data.decoding import check_window

    problems = []
    if steps & {"sft", "rl", "infer"}:
        low, high = cfg.model.min_pixels, cfg.model.max_pixels
        if low is not None and high is not None and low > high:
            problems.append(f"model.min_pixels={low} is above model.max_pixels={high}")
    least, most = cfg.infer.min_new_tokens, cfg.infer.max_new_tokens
    if "infer" in steps and least is not None and least > most:
        problems.append(f"infer.min_new_tokens={least} is above infer.max_new_tokens={most}")
    if "infer" in steps:
        from flare_exp.models.batch_decoding import check_image_device, check_inputs_ahead
        from flare_exp.models.image_reading import check_image_threads

        problems += _refusal(check_inputs_ahead, cfg.infer.inputs_ahead)
        problems += _refusal(check_image_threads, cfg.infer.image_threads)
        problems += _refusal(check_image_device, cfg.infer.image_device, False)  # its spelling: no GPU looked at
    problems += _cache_problems(cfg, steps)
    if "sft" in steps and cfg.sft.early_stopping_patience and cfg.sft.eval_steps == 0:
        problems.append(f"sft.early_stopping_patience={cfg.sft.early_stopping_patience} stops on the validation loss, "
                        "but sft.eval_steps=0 never evaluates: set sft.eval_steps >= 1 (or "
                        "sft.early_stopping_patience=null)")
    if "rl" in steps and not cfg.reward.clip_min < cfg.reward.clip_max:
        problems.append(f"reward.clip_min={cfg.reward.clip_min} must be below reward.clip_max={cfg.reward.clip_max}")
    if "prepare" in steps:
        problems += _refusal(check_window, cfg.data.image_window)
        problems += _split_name_problems(cfg.data) + _dataset_name_problems(cfg.data) + _demo_problems(cfg.data)
    if steps & {"sft", "rl"}:
        problems += _resume_problems(cfg.resume)
    if steps & {"eval", "runs"}:  # runs.compare corrects its family of tests too
        from flare_exp.metrics.significance import CORRECTIONS
        from flare_exp.runtime import check_choice

        problems += _refusal(check_choice, "eval.significance.correction", cfg.eval.significance.correction,
                             CORRECTIONS)
    named = list(cfg.runs.compare or []) if "runs" in steps else []
    if len(set(map(str, named))) < len(named):
        problems.append(f"runs.compare={named} names a run more than once: each run is compared once (a run beside "
                        "itself adds tests of no difference to the correction's family)")
    for section in sorted(steps & {"sft", "rl"}):  # an in-training metric no scorer makes: no best/, no pruning
        held = cfg[section]
        on = held.eval_steps and (section == "rl" or held.eval_per_task)
        if on and held.metric_for_best_model == "report_generation.green_score" and not cfg.eval.green.model_path:
            problems.append(f"{section}.metric_for_best_model=report_generation.green_score needs the GREEN judge: "
                            "set eval.green.model_path (the held-out evals score with eval's settings), or choose "
                            "another metric")
    if "eval" in steps:
        problems += _judge_choice_problems(cfg.eval)
        green = cfg.eval.green
        if isinstance(green.max_new_tokens, int) and isinstance(green.max_length, int) \
                and green.max_new_tokens >= green.max_length:
            problems.append(f"eval.green.max_new_tokens={green.max_new_tokens} caps nothing: the judgment shares "
                            f"eval.green.max_length={green.max_length} tokens with its prompt; lower it or leave it "
                            "null")
    return problems


def _cache_problems(cfg, steps: set[str]) -> list[str]:
    """The decoding sections' KV cache settings, for the steps that generate with them."""
    from flare_exp.models.decoding import check_cache_implementation

    return [problem for section in ("rl", "infer") if section in steps
            for problem in _refusal(check_cache_implementation, f"{section}.cache_implementation",
                                    cfg[section].cache_implementation)]


def _judge_choice_problems(evaluation) -> list[str]:
    """The judges' named settings: a typo in eval.green.parser was found only after GREEN had judged every report,
    one in a judge's decode_loop only once the judge had loaded."""
    from flare_exp.metrics.crimson_judge import JUDGE_DTYPES as CRIMSON_DTYPES
    from flare_exp.metrics.green import PARSERS
    from flare_exp.metrics.green_judge import JUDGE_DTYPES as GREEN_DTYPES
    from flare_exp.models import grouped_attention
    from flare_exp.models.decoding import DECODE_LOOPS
    from flare_exp.runtime import check_choice

    green, crimson = evaluation.green, evaluation.crimson
    return [problem for key, value, choices in (
        ("eval.green.parser", green.parser, PARSERS), ("eval.green.decode_loop", green.decode_loop, DECODE_LOOPS),
        ("eval.green.decode_attention", green.decode_attention, grouped_attention.SETTINGS),
        ("eval.green.dtype", green.dtype, GREEN_DTYPES), ("eval.crimson.decode_loop", crimson.decode_loop, DECODE_LOOPS),
        ("eval.crimson.dtype", crimson.dtype, CRIMSON_DTYPES)) for problem in _refusal(check_choice, key, value, choices)]


def _refusal(check, *args) -> list[str]:
    """A check that raises ValueError, as a list of problems (listed with the others, not the first alone)."""
    try:
        check(*args)
    except ValueError as e:
        return [str(e)]
    return []


def _demo_problems(data) -> list[str]:
    """data.demo's sizes: a negative count or a tiny image would make an empty or unreadable demo tree."""
    demo = data.get("demo")
    if demo is None:
        return []
    least = {"train_per_dataset": 1, "val_per_dataset": 1, "test_per_dataset": 0, "image_size": 32}
    return [f"data.demo.{key}={demo[key]}: must be an integer >= {low}" for key, low in least.items()
            if not isinstance(demo[key], int) or isinstance(demo[key], bool) or demo[key] < low]


def _dataset_name_problems(data) -> list[str]:
    """A FLARE dataset written in other case (chestDR): question files are found by their name as written, so
    it would match none (another name may be a dataset of the user's own, in FLARE's layout)."""
    from flare_exp.data.records import FLARE_DATASETS

    flare = {name.casefold(): name for name in FLARE_DATASETS}
    meant = {name: flare.get(str(name).casefold()) for name in data.datasets or []}
    return [f"data.datasets: {name!r} is FLARE's {right!r} in other case (question files are found by their name "
            f"as written): write {right!r}" for name, right in meant.items() if right and name != right]


def _split_name_problems(data) -> list[str]:
    """data.*_splits name FLARE's split folders: another name matches no folder and leaves its file empty."""
    import difflib

    from flare_exp.data.question_files import FLARE_SPLITS

    problems, roles = [], {}
    for key in ("train_splits", "val_splits", "test_splits"):
        for name in data[key] or []:
            roles.setdefault(name, []).append(f"data.{key}")
            if name not in FLARE_SPLITS:
                close = difflib.get_close_matches(str(name), FLARE_SPLITS, n=1)
                problems.append(f"data.{key}: {name!r} is not a FLARE split folder"
                                + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; FLARE's are {', '.join(FLARE_SPLITS)}")
    for name, keys in roles.items():
        if len(set(keys)) == 1 and len(keys) > 1:
            problems.append(f"{keys[0]} lists the split {name!r} {len(keys)} times: list it once")
        elif len(keys) > 1:  # its records would go to one file and be rejected as duplicates in the other
            problems.append(f"the split {name!r} is named in {' and '.join(dict.fromkeys(keys))}: give each split "
                            "one role")
    return problems


def _resume_problems(resume) -> list[str]:
    """resume is auto, never or a complete checkpoint: a word like false or no would be read as a path, an empty
    value as the working directory, a run dir as a checkpoint."""
    from flare_exp.models.checkpoints import incomplete, list_checkpoints
    from flare_exp.runtime import abspath

    value = str(resume).strip()
    if value in ("auto", "never"):
        return []
    if not value:
        return ["resume= is empty: pass resume=auto (continue from the run dir's last checkpoint), resume=never or "
                "a checkpoint's path"]
    path = abspath(value)
    if path.exists():
        why = incomplete(path)
        if not why:
            return []
        inside = list_checkpoints(path) if path.is_dir() else []
        return [f"resume={value}: {path} is not a complete Trainer checkpoint ({why})"
                + (f"; it is a run dir: name one of its checkpoints, e.g. resume={value.rstrip('/')}/{inside[-1].name}"
                   if inside else "")]
    meant = {"false": "never", "no": "never", "0": "never", "off": "never", "none": "never", "true": "auto",
             "yes": "auto", "1": "auto", "on": "auto"}.get(value.lower())
    return [f"resume={value}: not auto, never or a checkpoint that exists (no such path: {path})"
            + (f"; did you mean resume={meant}?" if meant else "; resume=auto continues from the run dir's last "
               "checkpoint, resume=never starts fresh")]


def judge_path_problems(cfg, steps: set[str]) -> list[str]:
    """The scorer and judge files a step will load (rl's RadGraph term, eval's RadGraph, GREEN judge, CheXbert,
    keyword module): each that is set must be there (a tiny RadGraph built on demand excepted)."""
    from flare_exp.rewards.combine import active_weights
    from flare_exp.metrics.radgraph_f1 import check_model_dir
    from flare_exp.models.checkpoint_files import check_model_folder
    from flare_exp.runtime import abspath, inside_cache

    problems = []
    rg = cfg.reward.radgraph
    rl_uses = "rl" in steps and any("radgraph" in w for w in active_weights(cfg.reward).values())
    eval_uses = "eval" in steps and cfg.eval.radgraph and rg.model_dir
    builds_tiny = rg.build_tiny and rg.model_dir and inside_cache(cfg, rg.model_dir)
    if (rl_uses or eval_uses) and not builds_tiny:
        try:
            check_model_dir(abspath(rg.model_dir) if rg.model_dir else None, rg.model_type)
        except FileNotFoundError as e:
            problems.append(str(e) + (" (reward.radgraph.build_tiny builds its tiny RadGraph only under "
                                      "paths.cache_dir: a folder you name is never written into)"
                                      if rg.build_tiny and rg.model_dir else ""))
    if "eval" in steps:
        for key in ("eval.green.model_path", "eval.crimson.model_path", "eval.chexbert.path",
                    "eval.chexbert.encoder_path", "eval.keyword_metrics.module"):
            value = OmegaConf.select(cfg, key)
            if value and not abspath(value).exists():
                problems.append(f"{key}={value}: no such file or directory ({abspath(value)})")
            elif value and key.endswith("model_path") and (abspath(value) / "config.json").is_file():
                # a judge copied half-way reads as "install sentencepiece" at its load otherwise
                problems += _refusal(check_model_folder, key, abspath(value),
                                     False if key == "eval.green.model_path" else None)
    return problems


def problems(cfg, steps: set[str], inputs: bool = False) -> list[ValueError]:
    """Every problem above for the steps of this run, one ValueError each (reported together)."""
    from flare_exp.rewards.combine import reward_problems

    found = range_problems(cfg, steps)
    if "rl" in steps:
        found += reward_problems(cfg.reward, list(cfg.rl.task_types))
    if inputs:
        found += judge_path_problems(cfg, steps)
    return [ValueError(p) for p in found]


def unknown_reward_term(key: str) -> str | None:
    """The problem with a command line's reward.<task>.weights.<term> or reward.terms.<term>.* key (any key for the
    schema: a dict), None when the term is one of the reward registry's, which every term must be (Hydra's advice
    for a new key, "use +", adds a term refused later); the closest term named."""
    import difflib

    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "reward" and parts[2] == "weights":
        name, stem = parts[3], ".".join(parts[:3])
    elif len(parts) >= 3 and parts[:2] == ["reward", "terms"]:
        name, stem = parts[2], "reward.terms"
    else:
        return None
    from flare_exp.rewards import TERMS, term_parameters

    if name in TERMS:
        if stem != "reward.terms" or len(parts) != 4:
            return None
        accepted = term_parameters(name)  # reward.terms.<term>.<parameter>: one the term takes
        if parts[3] in accepted:
            return None
        close = difflib.get_close_matches(parts[3], accepted, n=1)
        return f"{key}: the {name} term takes no parameter {parts[3]!r}" + (
            f" (did you mean {stem}.{name}.{close[0]}?)" if close else f"; it takes {', '.join(accepted)}")
    close = difflib.get_close_matches(name, sorted(TERMS), n=1)
    return f"{key}: no reward term {name!r}" + (f" (did you mean {stem}.{close[0]}?)" if close else
                                                 f"; the terms: {', '.join(sorted(TERMS))}")
