"""Lengths checked against the context of the model that reads them, before any work: a new-token budget or a
total length past a model's max_position_embeddings (its config.json) would otherwise stop a run only after the
steps before it ran, or decode past the positions the model was trained on."""
from __future__ import annotations

from omegaconf import DictConfig

from flare_exp.runtime import abspath


def length_checks(cfg: DictConfig, steps: set[str], loading_model: bool) -> list[tuple]:
    """(check, *its arguments) for each length the steps decode or train with, against the context of the model
    that reads it: infer's and the in-training evals' new tokens, the judges' lengths (GREEN's total length,
    CRIMSON's new-token cap). model.max_seq_length is a cap on the records, not a length decoded to: a cap past
    the context refuses nothing that fits it."""
    found = []
    if loading_model:
        found += [(check_decode_budget, cfg.model.path, key, tokens) for key, tokens in decode_budgets(cfg, steps)]
    if "eval" in steps:
        green, crimson = cfg.eval.green, cfg.eval.crimson
        if green.model_path and isinstance(green.max_length, int):
            found.append((check_context, green.model_path, "eval.green.max_length", green.max_length,
                          "the GREEN judge"))
        if crimson.model_path and isinstance(crimson.max_new_tokens, int):
            found.append((check_decode_budget, crimson.model_path, "eval.crimson.max_new_tokens",
                          crimson.max_new_tokens))
    return found


def decode_budgets(cfg: DictConfig, steps: set[str]) -> list[tuple[str, int]]:
    """(the key, its value) of each new-token budget the steps decode with: infer's, and the in-training evals'
    (their own eval_max_new_tokens, else infer.max_new_tokens)."""
    evals = {"sft": cfg.sft.eval_per_task, "rl": cfg.rl.eval_steps}  # when sft's / rl's held-out evals run
    budgets = [("infer.max_new_tokens", cfg.infer.max_new_tokens)] if "infer" in steps else []
    for section in (s for s in ("sft", "rl") if s in steps and evals[s]):
        own = cfg[section].eval_max_new_tokens
        budgets.append((f"{section}.eval_max_new_tokens", own) if own else ("infer.max_new_tokens",
                                                                              cfg.infer.max_new_tokens))
    return list(dict.fromkeys(b for b in budgets if isinstance(b[1], int)))


def model_config(model_path) -> dict | None:
    """model.path's config.json (or a judge's) as a dict; None for a model not there yet (built on first use) or
    an unreadable one (its loading says what is wrong with it)."""
    from flare_exp.models.checkpoint_files import read_config

    folder = abspath(model_path) if model_path else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return read_config("", folder)
    except (OSError, ValueError):
        return None


def check_decode_budget(model_path, key: str, tokens: int) -> None:
    """A new-token budget past the context in model.path's config.json (decoding would stop there only after
    the steps before it ran); a model not there yet or without the key: no check."""
    from flare_exp.models.batch_decoding import check_room

    config = model_config(model_path)
    if config is not None:
        check_room(config, 0, tokens, key)


def check_context(model_path, key: str, tokens: int, whose: str) -> None:
    """A total length decoded to (eval.green.max_length) past the context in the model's config.json: positions
    past it were never trained, and the judge would not stop there but judge on what they give."""
    from flare_exp.models.batch_decoding import max_positions

    config = model_config(model_path)
    found = max_positions(config) if config is not None else None
    if found is not None and tokens > found[0]:
        raise ValueError(f"{key}={tokens} is past {whose}'s context: {found[0]} positions ({found[1]} in "
                         f"{abspath(model_path) / 'config.json'}); pass {key}={found[0]} or less")
