"""A resume refuses every deciding change: for each stage, every deciding key changed in turn (the base model's
name and path among them) and every input file's bytes stop the resume, naming the key; an unchanged rerun, or
one that changes only a key that does not decide the outputs, resumes."""
import copy
import json

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from flare_exp.run.fingerprint import (DECIDING, FREE, RESUMABLE, RunSettingsChangedError, check_resume, fingerprint,
                              settings_of)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.5
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["changed"]
    return "changed" if value is None or value == {} else None


def _set(config: dict, key: str, value) -> dict:
    out = copy.deepcopy(config)
    node, parts = out, key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return out


def _left_to_resume(stage, run_dir):
    """What an interrupted attempt of ``stage`` leaves to continue from."""
    pattern = RESUMABLE[stage][0]
    (run_dir / pattern.replace("*", "1")).mkdir(parents=True) if "*" in pattern else (
        (run_dir / pattern).write_text('{"id": "x"}\n'))


_MODEL = {"model.name", "model.path", "model.dtype", "model.backend", "model.lora.r", "model.max_pixels"}  # the base model
MUST_DECIDE = {
    "sft": _MODEL | {"seed", "data.root", "sft.learning_rate", "sft.train_file", "sft.val_file", "sft.init_from",
                     "sft.per_device_train_batch_size", "sft.gradient_accumulation_steps", "sft.optim"},
    "rl": _MODEL | {"seed", "data.root", "rl.beta", "rl.num_generations", "rl.learning_rate", "rl.temperature",
                    "rl.init_from", "rl.train_file", "rl.max_completion_length", "reward.clip_max",
                    "reward.report_generation.weights.radgraph", "reward.terms.choice.wrong"},
    "infer": _MODEL | {"data.root", "infer.checkpoint", "infer.input_file", "infer.split", "infer.max_new_tokens",
                       "infer.temperature", "infer.do_sample"},
    "eval": {"eval.green.model_path", "eval.green.max_new_tokens", "eval.green.max_length",
             "eval.significance.correction", "eval.significance.ar_trials", "eval.significance.resamples",
             "eval.radgraph", "eval.chexbert.path", "eval.crimson.model_path", "eval.keyword_metrics.module",
             "eval.green.parser"},  # robust leaves unreadable judgments out of the non-official GREEN numbers
}


@pytest.mark.parametrize("stage", sorted(RESUMABLE))
def test_resume_refuses_every_deciding_change(stage, base_overrides, demo_prepared, tmp_path):
    cfg = compose_cfg([f"stage={stage}", *base_overrides, "experiment=flare", "model=tiny", "data=demo"])
    run_dir = tmp_path / stage
    run_dir.mkdir()
    recorded = fingerprint(stage, cfg)
    (run_dir / "fingerprint.json").write_text(json.dumps(recorded))
    _left_to_resume(stage, run_dir)
    check_resume(stage, run_dir, recorded)  # unchanged: resumes
    config = OmegaConf.to_container(cfg, resolve=True)
    deciding = settings_of(stage, config)
    assert MUST_DECIDE[stage] <= set(deciding), sorted(MUST_DECIDE[stage] - set(deciding))
    for key, value in deciding.items():
        new = {**recorded, "settings": settings_of(stage, _set(config, key, _changed(value)))}
        with pytest.raises(RunSettingsChangedError, match=rf"{stage} run .* other settings, .*: {key}: "):
            check_resume(stage, run_dir, new)
    for key in recorded["files"]:  # the input files' bytes (the adapter started from among them)
        new = {**recorded, "files": {**recorded["files"], key: "f" * 64}}
        with pytest.raises(RunSettingsChangedError, match=rf"{key} sha256: \w{{12}} -> ffffffffffff"):
            check_resume(stage, run_dir, new)
    for key in FREE.get(stage, ()):  # speed, logging, budgets: a resume may change them
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:
            continue
        if value is not None and not OmegaConf.is_config(value):
            check_resume(stage, run_dir, {**recorded, "settings": settings_of(stage, _set(config, key, _changed(value)))})


def test_a_cut_fingerprint_is_named_not_a_json_traceback(base_overrides, tmp_path):
    """An unfinished run whose fingerprint.json was cut short (or edited) cannot be compared: refused, naming the
    file and the way out, before anything resumes; a finished one, when a pipeline would reuse it, likewise."""
    from flare_exp.run.fingerprint import finished_differences

    cfg = compose_cfg(["stage=infer", *base_overrides])
    run_dir = tmp_path / "infer"
    run_dir.mkdir()
    text = json.dumps(fingerprint("infer", cfg))
    (run_dir / "fingerprint.json").write_text(text[: len(text) // 2])
    _left_to_resume("infer", run_dir)
    for check in (lambda: check_resume("infer", run_dir, fingerprint("infer", cfg)),
                  lambda: finished_differences("infer", run_dir, cfg)):
        with pytest.raises(RunSettingsChangedError, match=r"fingerprint.json is unreadable \(JSONDecodeError: .*"
                                                          r"cannot be compared .* overwrite=true"):
            check()
    (run_dir / "fingerprint.json").write_text("[]")  # parses, but is no fingerprint
    with pytest.raises(RunSettingsChangedError, match="unreadable"):
        check_resume("infer", run_dir, fingerprint("infer", cfg))


@pytest.mark.parametrize("stage, key, value", [("sft", "sft.max_steps", 7), ("rl", "rl.max_steps", 7),
                                               ("infer", "infer.num_samples", 5)])
def test_a_budget_change_resumes_but_is_no_finished_step(stage, key, value, base_overrides, tmp_path):
    """Training longer, or answering more records, may continue an unfinished run; a pipeline does not reuse a
    finished step made with another budget (its outputs are not what was asked for), naming the key; a
    fingerprint recorded before budgets were has none to compare."""
    from flare_exp.run.fingerprint import finished_differences

    cfg = compose_cfg([f"stage={stage}", *base_overrides])
    run_dir = tmp_path / stage
    run_dir.mkdir()
    recorded = fingerprint(stage, cfg)
    (run_dir / "fingerprint.json").write_text(json.dumps(recorded))
    _left_to_resume(stage, run_dir)
    other = compose_cfg([f"stage={stage}", *base_overrides, f"{key}={value}"])
    check_resume(stage, run_dir, fingerprint(stage, other))  # a resume may change it
    assert finished_differences(stage, run_dir, cfg) == []
    assert finished_differences(stage, run_dir, other) == [f"{key}: {OmegaConf.select(cfg, key)} -> {value}"]
    (run_dir / "fingerprint.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "budget"}))
    assert finished_differences(stage, run_dir, other) == []


def test_every_stage_that_resumes_has_its_deciding_keys():
    assert set(RESUMABLE) <= set(DECIDING) and {"model"} <= set(DECIDING["sft"]) & set(DECIDING["rl"]) & set(
        DECIDING["infer"])


def test_a_finished_prepare_is_reused_with_more_image_workers_and_not_with_other_splits(base_overrides, tmp_path):
    from flare_exp.run.fingerprint import finished_differences
    from flare_exp.run.lifecycle import start_attempt

    cfg = compose_cfg(["stage=prepare", *base_overrides])
    start_attempt("prepare", cfg, tmp_path / "prepared")
    assert finished_differences("prepare", tmp_path / "prepared", compose_cfg(
        ["stage=prepare", *base_overrides, "data.image_workers=3"])) == []
    assert finished_differences("prepare", tmp_path / "prepared", compose_cfg(
        ["stage=prepare", *base_overrides, "data.val_splits=[training]"])) == [
        "data.val_splits: ['validation-public', 'validation-hidden'] -> ['training']"]


def test_an_eval_recorded_before_its_report_settings_decided_is_compared_on_what_it_recorded(base_overrides,
                                                                                              tmp_path):
    """eval's significance, RadGraph, CheXbert, CRIMSON and keyword settings decide its report now: a finished
    eval made with another correction is not reused; one recorded before they decided (its fingerprint has only
    eval.green.*) is compared on what it has."""
    from flare_exp.run.fingerprint import finished_differences

    cfg = compose_cfg(["stage=eval", *base_overrides])
    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    recorded = fingerprint("eval", cfg)
    (run_dir / "fingerprint.json").write_text(json.dumps(recorded))
    (run_dir / "DONE").write_text("{}")
    assert finished_differences("eval", run_dir, cfg) == []
    other = compose_cfg(["stage=eval", *base_overrides, "eval.significance.correction=none"])
    assert finished_differences("eval", run_dir, other) == ["eval.significance.correction: holm -> none"]
    old = {**recorded, "settings": {k: v for k, v in recorded["settings"].items() if k.startswith("eval.green.")}}
    (run_dir / "fingerprint.json").write_text(json.dumps(old))
    assert finished_differences("eval", run_dir, other) == []
