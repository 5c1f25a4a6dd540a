"""What a new user hears first: a misspelt key named with the fix before Hydra composes, every problem of the
settings in one list, paths the user names never written into, and logs a person reads (in-process: fast)."""
from __future__ import annotations

import io
import json
import logging
import re
import sys

import pytest

from conftest import CONF, REPO, compose_cfg

GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


def key_problems(*overrides: str) -> list[str]:
    from flare_exp.config import Config
    from flare_exp.config_keys import override_key_problems

    return list(override_key_problems(list(overrides), Config, GROUPS).values())


@pytest.mark.parametrize("override, meant", [
    ("sft.max_step=10", "sft.max_steps"),
    ("+sft.max_step=10", "sft.max_steps"),
    ("rl.num_generation=4", "rl.num_generations"),
    ("sft.num_generations=4", "rl.num_generations"),  # the right name in the wrong section
    ("model.pathh=/m", "model.path"),
    ("data.roott=/d", "data.root"),
    ("reward.radgraph.model_dirr=/r", "reward.radgraph.model_dir"),
    ("eval.green.model_pat=/g", "eval.green.model_path"),
    ("paths.output_rot=/o", "paths.output_root"),
    ("infer.batch_sizes=1,2", "infer.batch_size"),  # a sweep's values
    ("sf.max_steps=1", "sft"),
])
def test_an_unknown_key_is_named_with_the_closest_key(override, meant):
    (problem,) = key_problems(override)
    assert f"did you mean {meant}?" in problem and "+" not in problem


@pytest.mark.parametrize("override, said", [
    ("lora.r=4", "unknown config key lora.r (did you mean model.lora.r?)"),  # a section left out: named whole
    ("+lora.r=4", "unknown config key lora.r (did you mean model.lora.r?)"),
    ("green.batch_size=2", "unknown config key green.batch_size (did you mean eval.green.batch_size?)"),
    ("eval.lora.r=4", "unknown config key eval.lora.r (did you mean model.lora.r?)"),  # the wrong section
    ("max_steps=3", "unknown config key max_steps (did you mean sft.max_steps or rl.max_steps?)"),  # several
])
def test_a_key_of_another_section_typed_without_it_is_named_whole_with_the_full_key(override, said):
    (problem,) = key_problems(override)
    assert problem == said


@pytest.mark.parametrize("override, said", [
    ("reward.regression.weights.numerc=1", "did you mean reward.regression.weights.numeric?"),  # Hydra: "use +"
    ("+reward.regression.weights.numerc=1", "did you mean reward.regression.weights.numeric?"),
    ("reward.terms.choise.correct=2", "did you mean reward.terms.choice?"),
    ("+reward.classification.weights.my_term=1", "no reward term 'my_term'; the terms: "),
    ("reward.terms.choice.corect=2", "no parameter 'corect' (did you mean reward.terms.choice.correct?)"),
    ("reward.terms.numeric.zzz=2", "no parameter 'zzz'; it takes "),
])
def test_a_reward_term_the_registry_lacks_is_named_before_hydra(override, said):
    (problem,) = key_problems(override)
    assert said in problem


@pytest.mark.parametrize("override, meant", [
    ("hydra.job.chdr=true", "hydra.job.chdir"),  # Hydra's own advice would be +hydra.job.chdr=true: ignored
    ("+hydra.jb.name=x", "hydra.job"),
    ("hydra.run.dri=/tmp/x", "hydra.run.dir"),
    ("hydra.sweep.subdirr=x", "hydra.sweep.subdir"),
])
def test_a_misspelt_hydra_key_is_named_with_the_closest(override, meant):
    (problem,) = key_problems(override)
    assert problem.startswith("unknown Hydra key") and f"did you mean {meant}?" in problem


def test_known_keys_group_choices_and_free_form_dicts_pass():
    assert key_problems("sft.max_steps=10", "model=tiny", "+experiment=flare", "~experiment", "hydra/launcher=local",
                        "hydra.job.chdir=false", "+hydra.job.env_set.WANDB_MODE=offline", "hydra.verbose=true",
                        "hydra.launcher.timeout_min=30", "+hydra.launcher.additional_parameters.qos=high",
                        "~hydra.job.chdir", "+reward.report_generation.weights.rouge_l=0.5", "data.demo.seed=1",
                        "data.demo.image_size=512",  # data.demo is null in the schema, set by data=demo
                        "data.instructions.report_generation=x", "model.lora.target_modules=[q_proj]",
                        "~reward.report_generation.weights.rouge_l") == []  # a dict's entry can go


@pytest.mark.parametrize("override", ["~model.decode_attention", "~rl.num_generations=4", "~model.lora.r"])
def test_deleting_a_setting_of_the_schema_is_one_line_saying_how_to_set_it(override):
    (problem,) = key_problems(override)
    key = override.lstrip("~").split("=")[0]
    assert f"{key} is a setting of the schema" in problem and f"{key}=VALUE" in problem


@pytest.mark.parametrize("override, said", [
    ("sft.learning_rate=abc", "sft.learning_rate=abc: must be a number"),
    ("sft.max_steps=1.5", "sft.max_steps=1.5: must be an integer"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing=maybe: must be true or false"),
    ("model.fused_prefill=2", "model.fused_prefill=2: must be true or false"),  # OmegaConf reads any int as true
    ("overwrite=-1", "overwrite=-1: must be true or false"),
    ("infer.sort_by_length='7'", "infer.sort_by_length=7: must be true or false"),
    ("sft.max_steps=null", "sft.max_steps=null: needs a value"),
    ("model.decode_attention=[grouped]", "model.decode_attention=['grouped']: must be a single value, not a list"),
    ("eval.predictions=outputs/runs/x", "eval.predictions=outputs/runs/x: a list: write eval.predictions=[outputs/runs/x]"),
    ("stage.steps=prepare", "stage.steps=prepare: a list: write stage.steps=[prepare]"),
    ("data.image_window=0", "data.image_window=0: a list [low, high] in the images' own units: write "
                            "data.image_window=[0,4095]"),
    ('eval.predictions="a b.xlsx"', """eval.predictions=a b.xlsx: a list: write 'eval.predictions=["a b.xlsx"]'"""),
])
def test_a_value_of_the_wrong_type_is_named_before_hydra(override, said):
    (problem,) = key_problems(override)
    assert problem.startswith(said)


def test_values_hydra_takes_pass():
    assert key_problems("sft.learning_rate=1e-4", "sft.max_steps=10", "model.gradient_checkpointing=yes", "overwrite=1", "model.fused_prefill=0", "infer.sort_by_length=Off",
                        "infer.batch_size=auto", "sft.learning_rate=${rl.learning_rate}", "rl.beta=0",
                        "rl.learning_rate=1e-4,2e-4", "eval.predictions=[a,b]", "data.image_window=null",
                        "model.lora.target_modules=all-linear") == []


def test_a_wrong_type_a_misspelt_key_and_a_bad_range_are_one_list(capsys, base_overrides):
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):  # base_overrides: the prepared demo, so no missing-file problems join in
        launch.check_command_line(["stage=sft", "sft.learning_rate=abc", "sft.max_step=5", "sft.max_steps=-3",
                                   *base_overrides])
    message = capsys.readouterr().err
    assert "3 problems with the settings" in message and "sft.learning_rate=abc: must be a number" in message
    assert "did you mean sft.max_steps?" in message and "sft.max_steps=-3" in message


def test_the_command_line_hears_the_unknown_key_and_every_other_problem_at_once(capsys, tmp_path):
    """The unknown key and the model path in one message, before Hydra makes any run dir."""
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit) as exit_:
        launch.check_command_line(["experiment=flare", "stage=sft", "sft.max_step=10", "model.path=/nope",
                                   "data.root=/nonexistent", f"paths.output_root={tmp_path}"])
    message = capsys.readouterr().err
    assert exit_.value.code == 1 and "To append to your config" not in message
    assert "unknown config key sft.max_step (did you mean sft.max_steps?)" in message
    assert "model.path=/nope holds no model" in message and "problems with the settings" in message
    assert list(tmp_path.iterdir()) == []


def test_a_model_path_from_an_unset_flare_exp_models_says_so(monkeypatch, tmp_path):
    """The README's real run starts with export FLARE_EXP_MODELS=...; without it model.path is ./models/...,
    and the error named only that path."""
    from flare_exp.models.loading import check_model_path

    monkeypatch.delenv("FLARE_EXP_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["experiment=flare", "stage=sft"])
    with pytest.raises(FileNotFoundError, match=r"model.path=\S+/models/Qwen3-VL-4B-Instruct holds no model \(no "
                                                r"config.json\). FLARE_EXP_MODELS is not set, so model.path is under "
                                                r"./models: export FLARE_EXP_MODELS="):
        check_model_path(cfg.model)
    monkeypatch.setenv("FLARE_EXP_MODELS", str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError) as named:
        check_model_path(compose_cfg(["experiment=flare", "stage=sft"]).model)
    assert "FLARE_EXP_MODELS is not set" not in str(named.value)


def test_an_unset_mandatory_value_is_a_line_of_the_list_not_a_traceback():
    from flare_exp.checks import validate

    with pytest.raises(ValueError, match=r"data.root must be set \(Download FLARE"):
        validate(compose_cfg(["experiment=flare", "stage=prepare"]), inputs=True)
    for steps in (["stage=infer"], ["stage=pipeline", "stage.steps=[sft,eval]"]):  # they read the images
        with pytest.raises(ValueError, match=r"data.root must be set"):
            validate(compose_cfg(["experiment=flare", *steps]))
    # eval and the listings read no image: a compute node with the prepared records only needs no download
    validate(compose_cfg(["experiment=flare", "stage=eval", "eval.predictions=[p.jsonl]"]))
    validate(compose_cfg(["experiment=flare", "stage=runs"]))


def test_a_model_path_the_user_names_is_never_built_into(tmp_path):
    from flare_exp.models.loading import builds_tiny_at, resolve_model_path
    from flare_exp.runtime import abspath

    named = tmp_path / "somewhere-new"
    with pytest.raises(FileNotFoundError, match=r"model.path=.*somewhere-new.*never written into"):
        resolve_model_path(compose_cfg([f"model.path={named}"]).model)
    assert not named.exists()
    cfg = compose_cfg([f"paths.cache_dir={tmp_path / 'cache'}"])  # model=tiny's default: inside the cache
    assert builds_tiny_at(cfg.model, abspath(cfg.model.path))


def test_training_log_numbers_read_plainly():
    from flare_exp.logs import log_part

    assert log_part("loss", -9.313e-10) == "loss 0" and log_part("loss", -0.0) == "loss 0"
    assert log_part("loss", 6.4522) == "loss 6.452"
    assert log_part("learning_rate", 0.0).startswith("learning_rate 0 (a linear warmup starts at 0")


def test_a_finished_run_prints_the_official_table(tmp_path):
    import json

    from flare_exp.logs import run_summary

    block = {"official": {"classification": {"balanced_accuracy": 0.5}}, "official_by_dataset": {}, "n": 4}
    (tmp_path / "metrics.json").write_text(json.dumps({"base": block, "sft": block}))
    lines = run_summary(tmp_path).splitlines()
    assert re.fullmatch(r"official \(FLARE\) +base +sft", lines[0])
    assert re.fullmatch(r"classification: balanced_accuracy +0\.5000 +0\.5000", lines[1])
    assert "caveats:" not in lines
    # two runs scored on different splits: the printed caveats say so, as the report does
    (tmp_path / "significance.json").write_text(json.dumps({"warnings": ["base and sft come from different splits: "
                                                                          "val and train"]}))
    assert "- base and sft come from different splits: val and train" in run_summary(tmp_path).splitlines()


def test_a_log_line_never_lands_inside_a_progress_bar():
    from tqdm import tqdm

    from flare_exp.logs import BarSafeStream

    out = io.StringIO()
    handler = logging.StreamHandler(BarSafeStream(out))
    logger = logging.getLogger("flare_exp.test_bars")
    logger.addHandler(handler)
    try:
        with tqdm(total=3, file=out, mininterval=0) as bar:
            bar.update(1)
            logger.warning("a log line")
    finally:
        logger.removeHandler(handler)
    assert re.search(r"it/s\]a log line", out.getvalue()) is None and "\ra log line" in out.getvalue()


def test_trls_warning_about_our_default_rl_loss_is_left_out(caplog):
    from flare_exp.logs import quiet_known_messages

    quiet_known_messages()
    trl_log = logging.getLogger("trl.trainer.grpo_trainer")
    with caplog.at_level(logging.WARNING, logger=trl_log.name):
        trl_log.warning("When using `importance_sampling_level='sequence'`, the `'dr_grpo'` loss sums per-token "
                        "contributions, which effectively weights each sequence by its completion length")
        trl_log.warning("When using `importance_sampling_level='sequence'`, the `'dapo'` loss sums per-token")
    assert len(caplog.records) == 1 and "`'dapo'`" in caplog.records[0].getMessage()


def test_the_trainers_token_alignment_notice_is_left_out_and_keeps_every_end_token(caplog):
    """transformers' Trainer aligns the model's special tokens with the tokenizer's at every rl run and says so;
    the notice is left out because the alignment keeps every end token decoding stops at (checked here)."""
    import types

    from transformers import GenerationConfig
    from transformers.trainer_utils import align_special_tokens

    from flare_exp.logs import quiet_known_messages

    quiet_known_messages()
    model = types.SimpleNamespace(config=types.SimpleNamespace(), generation_config=GenerationConfig(
        eos_token_id=[151645, 151643], pad_token_id=151643))
    tokenizer = types.SimpleNamespace(eos_token_id=151645, bos_token_id=None, pad_token_id=151643)
    source = logging.getLogger("transformers.trainer_utils")
    with caplog.at_level(logging.WARNING, logger=source.name):
        source.addHandler(caplog.handler)
        try:
            align_special_tokens(model, tokenizer)
            source.warning("The tokenizer has a new chat template")  # another notice still shows
        finally:
            source.removeHandler(caplog.handler)
    assert set(model.generation_config.eos_token_id) == {151645, 151643}
    # (the record may also reach caplog through the root logger, where transformers' logger propagates)
    assert {r.getMessage() for r in caplog.records} == {"The tokenizer has a new chat template"}


def test_a_training_stage_names_a_data_root_that_is_not_there(tmp_path):
    from flare_exp.checks import input_problems

    cfg = compose_cfg(["experiment=flare", "stage=infer", f"data.root={tmp_path / 'nonexistent'}",
                       f"model.path={tmp_path}"])
    assert any(str(p).startswith("data.root=") and "nonexistent" in str(p) for p in input_problems(cfg))


def test_a_sweep_hears_its_unknown_keys_before_any_job(capsys):
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["-m", "sft.max_step=1,2", "rl.num_generations=2,4"])
    message = capsys.readouterr().err
    assert "unknown config key sft.max_step (did you mean sft.max_steps?)" in message and "rl.num_gen" not in message


def test_a_typed_dict_entry_and_every_value_of_a_sweep_are_checked():
    """A reward weight is an entry of a Dict[str, float]: a word there joins the list like any number key; a
    sweep's values are each checked, so one bad value stops the sweep before Hydra (naming that value)."""
    assert key_problems("reward.report_generation.weights.radgraph=abc") == [
        "reward.report_generation.weights.radgraph=abc: must be a number"]
    assert key_problems("reward.report_generation.weights.radgraph=0.7") == []
    assert key_problems("reward.report_generation.weights.radgraph=0.5,abc", "sft.max_steps=3,4") == [
        "reward.report_generation.weights.radgraph=abc: must be a number"]
    assert key_problems("sft.max_steps=3,x") == ["sft.max_steps=x: must be an integer"]
    assert key_problems("sft.learning_rate=interval(1e-5,1e-3)") == []  # Optuna draws these later


@pytest.mark.parametrize("argv", [["hydra.sweeper.params.rl.learning_rate=1e-5,2e-5"],
                                  ["-m", "+hydra.sweeper.params.rl.learning_rate=1e-5,2e-5"]])
def test_sweeper_params_on_the_command_line_are_answered_with_the_sweep_itself(argv, capsys):
    """Hydra answers hydra.sweeper.params.KEY=... with OmegaConf's AssertionError traceback."""
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(argv)
    err = capsys.readouterr().err
    assert "python launch.py -m rl.learning_rate=1e-5,2e-5" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, said", [
    (["run_name=my eval \u00fc"], """write 'run_name="my eval \u00fc"'"""),
    (["stage=eval", "eval.predictions=[preds (Dr M\u00fcller).xlsx]"],
     """write 'eval.predictions=["preds (Dr M\u00fcller).xlsx"]'"""),
    (["stage=eval", "eval.predictions=preds (Dr M\u00fcller).xlsx"],  # a list key without its brackets too
     """write 'eval.predictions=["preds (Dr M\u00fcller).xlsx"]'"""),
])
def test_a_value_hydras_grammar_cannot_read_bare_is_one_line_saying_how_to_quote_it(argv, said, capsys):
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(argv)
    err = capsys.readouterr().err
    assert "Hydra's grammar cannot read this value bare" in err and said in err and "Lexer" not in err


@pytest.mark.parametrize("body, said", [
    ("sft:\n  learning_rate: 1e-4\n   max_steps: 3\n", r"mine.yaml, line 4, column 13: not valid YAML: mapping values"),
    ("sft:\n  max_steps: 3\n  max_steps: 4\n", r"mine.yaml, line 4, column 3: not valid YAML: found duplicate key"),
    ("sft:\n  lerning_rate: 1e-4\n", r"unknown config key sft.lerning_rate \(did you mean sft.learning_rate\?\), set in "
                                     r"\S+/experiment/mine.yaml"),
    ("sft:\n  learning_rate: abc\n", r"sft.learning_rate: Value 'abc' .* converted to Float, set in \S+/experiment/mine.yaml"),
    # a section written at the top, without its parent
    ("lora:\n  r: 4\n", r"unknown config key lora.r \(did you mean model.lora.r\?\), set in \S+/experiment/mine.yaml"),
    # every unknown key of the file in one message (Hydra stops at the first)
    ("sft:\n  max_step: 3\nlora:\n  r: 4\n", r"unknown config keys sft.max_step \(did you mean sft.max_steps\?\); "
                                              r"lora.r \(did you mean model.lora.r\?\), set in \S+/experiment/mine.yaml"),
    # the header forgotten: the keys land under experiment. ("# @package _global_" written after them is no header)
    ("sft:\n  max_steps: 2\n# x\n", None),
    # a group option its defaults list picks that does not exist: Hydra said "In 'config'", not the file
    ("defaults:\n  - override /model: tinyy\n", r"experiment/mine.yaml: its defaults list picks model=tinyy, and "
                                                 r"there is no model/tinyy.yaml in the config dirs; model has "
                                                 r"qwen3vl_4b, tiny \(did you mean model=tiny\?\)"),
    # without `override` too (an option that exists would be "reward appears more than once"): both said
    ("defaults:\n  - /reward: nope\n", r"experiment/mine.yaml: `- /reward: nope` picks reward without `override`, "
                                       r"but conf/config.yaml chooses reward already: write `- override /reward: nope`"
                                       r".*; and there is no reward/nope.yaml in the config dirs"),
    # OmegaConf reads any integer as true: said, every such value in one list
    ("sft:\n  group_by_length: 2\nmodel:\n  fused_prefill: -1\n",
     r"(?s)problems with the settings.*mine.yaml: sft.group_by_length=2: must be true or false.*mine.yaml: model.fused_prefill=-1"),
])
def test_a_users_config_file_with_a_yaml_or_key_error_is_one_line(body, said, tmp_path, capsys):
    """An experiment file of the user's (found through hydra.searchpath): Hydra printed a YAML traceback of
    ~80 lines, or its struct error with no suggestion."""
    import re

    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(("# @package _global_\n" if said else "") + body)
    said = said or r"experiment/mine.yaml: its keys land under 'experiment.' .* needs '# @package _global_' as its first"
    for found_by, extra in (([f"hydra.searchpath=[file://{tmp_path}]"], []),
                            ([f"hydra.searchpath=[file://{tmp_path}]"], ["--cfg", "job"]),  # as its message advises
                            ([f"--config-dir={tmp_path}"], []),  # Hydra's flag for the same
                            ([f"--config-dir={tmp_path}"], ["-m"])):  # a sweep of one job: Hydra's sweeper composes it
        with pytest.raises(SystemExit):
            launch.check_command_line([*found_by, "experiment=mine", "stage=runs", *extra])
        err = capsys.readouterr().err
        assert re.search(said, err) and "Traceback" not in err
    with pytest.raises(SystemExit):  # a sweep over the user's files and ours: each composed once
        launch.check_command_line(["-m", f"--config-dir={tmp_path}", "experiment=demo,mine", "stage=runs"])
    err = capsys.readouterr().err
    assert re.search(said, err) and "demo.yaml" not in err


def test_a_headerless_file_with_a_defaults_list_is_told_its_header(tmp_path, capsys):
    """Without '# @package _global_', a defaults list's `override /model: tiny` became Hydra's "Could not override
    'model@experiment.model'. Did you mean to override model?" (a file without one had our message)."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("defaults:\n  - override /model: tiny\nsft:\n  max_steps: 2\n")
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "experiment=mine", "stage=sft"])
    err = capsys.readouterr().err
    assert "experiment/mine.yaml: its defaults list picks groups under 'experiment.'" in err and \
        "needs '# @package _global_' as its first line" in err and "Did you mean" not in err, err


def test_a_group_option_that_does_not_exist_is_named_with_the_groups_options(capsys):
    sys.path.insert(0, str(REPO))
    import launch

    for argv, said in ((["model=tinyy", "stage=runs"], "model=tinyy"),
                       (["-m", "model=tiny,tinyy", "stage=runs"], "model=tinyy (in model=tiny,tinyy)")):
        with pytest.raises(SystemExit):
            launch.check_command_line(argv)
        err = capsys.readouterr().err
        assert (f"{said} on the command line: no model/tinyy.yaml in the config dirs; model has qwen3vl_4b, "
                "tiny (did you mean model=tiny?)") in err and "Config search path" not in err
    said = {  # Hydra's own groups and its plugins' options are listed too; null is no option (Hydra: a traceback)
        ("-m", "hydra/sweeper=basc", "stage=runs"): "hydra/sweeper has basic, optuna (did you mean "
                                                     "hydra/sweeper=basic?)",
        ("-m", "hydra/launcher=submitit_lokal", "stage=runs"): "(did you mean hydra/launcher=submitit_local?)",
        ("model=null", "stage=runs"): "model=null: a config group takes one of its options, not null: qwen3vl_4b, tiny",
        ("+clustr=a", "stage=runs"): "unknown config key clustr",
    }
    for argv, expected in said.items():
        with pytest.raises(SystemExit):
            launch.check_command_line(list(argv))
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_a_missing_option_picked_in_a_file_another_user_file_includes_names_that_file(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "base.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: tinny\n")
    (tmp_path / "experiment" / "child.yaml").write_text("# @package _global_\ndefaults:\n  - /experiment/base\n")
    for extra in (["experiment=child"], ["-m", "experiment=child"], ["-m", "experiment=glob(ch*)"]):
        with pytest.raises(SystemExit):
            launch.check_command_line([*extra[:-1], f"--config-dir={tmp_path}", "stage=runs", extra[-1]])
        err = capsys.readouterr().err
        assert (f"{tmp_path}/experiment/base.yaml: its defaults list picks model=tinny, and there is no "
                "model/tinny.yaml") in err


def test_every_missing_option_a_users_file_picks_is_named_at_once(tmp_path, capsys):
    """Hydra stops at the first option it cannot find: a file picking two that do not exist said one, and the
    next launch the other; now both, each with the file and its group's options, from the file or one that
    includes it."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "base.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tinny\n  - override /data: demo\n"
        "  - override /reward: nope\n")
    (tmp_path / "experiment" / "child.yaml").write_text("# @package _global_\ndefaults:\n  - /experiment/base\n")
    # the including file's own missing pick too, and an include written relative to its group (- base)
    (tmp_path / "experiment" / "sibling.yaml").write_text(
        "# @package _global_\ndefaults:\n  - base\n  - override /stage: inferr\n")
    base = tmp_path / "experiment" / "base.yaml"
    for extra in (["experiment=base"], ["experiment=child"], ["-m", "experiment=child"], ["experiment=sibling"]):
        with pytest.raises(SystemExit):
            launch.check_command_line([*extra[:-1], f"--config-dir={tmp_path}", "stage=runs", extra[-1]])
        err = capsys.readouterr().err
        root = tmp_path / "experiment" / f"{extra[-1].split('=')[1]}.yaml"
        count = 3 if "sibling" in extra[-1] else 2
        assert f"{count} options the defaults lists of {root} and its includes pick do not exist:" in err, err
        assert (f"{base}: its defaults list picks model=tinny, and there is no model/tinny.yaml in the config dirs; "
                "model has qwen3vl_4b, tiny (did you mean model=tiny?)") in err
        assert (f"{base}: its defaults list picks reward=nope, and there is no reward/nope.yaml in the config dirs; "
                "reward has flare, seed") in err and "data=demo" not in err
    assert f"{root}: its defaults list picks stage=inferr, and there is no stage/inferr.yaml" in err


def test_a_group_of_the_users_own_config_dir_is_a_known_key(tmp_path, capsys):
    """--config-dir D (or hydra.searchpath) with a group of D's own (+cluster=a): not an unknown key; its
    values are checked as the run composes them. A file of D that conf/ hides, or a D Hydra would not find, is
    refused before Hydra."""
    import re

    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "a.yaml").write_text("# @package _global_\ninfer:\n  batch_size: 16\n")
    (tmp_path / "cluster" / "bad.yaml").write_text("# @package _global_\ninfer:\n  batch_size: -2\n")
    for found_by in (f"--config-dir={tmp_path}", f"hydra.searchpath=[file://{tmp_path}]"):
        launch.check_command_line([found_by, "+cluster=a", "stage=runs"])
        assert capsys.readouterr().err == ""
        with pytest.raises(SystemExit):
            launch.check_command_line([found_by, "+clustr=a", "stage=runs"])
        assert "unknown config key clustr (did you mean the group cluster: +cluster=a?)" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            launch.check_command_line([found_by, "+cluster=bad", "stage=infer"])
        assert "infer.batch_size=-2" in capsys.readouterr().err
    # a copy of the repo's experiment edited under its own name: Hydra would compose the repo's (conf/ first)
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "demo.yaml").write_text("# @package _global_\ninfer:\n  max_new_tokens: 99\n")
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "experiment=demo", "stage=runs"])
    assert re.search(r"experiment/demo.yaml: experiment=demo composes \S+conf/experiment/demo.yaml instead",
                     capsys.readouterr().err)
    with pytest.raises(SystemExit):  # Hydra reads the flag without expanding ~
        launch.check_command_line(["--config-dir=~/my_conf", "stage=runs"])
    assert "--config-dir ~/my_conf: no such directory" in capsys.readouterr().err


def test_a_single_runs_settings_are_checked_before_hydra_as_the_run_would(capsys, tmp_path):
    """A refused single run leaves no run dir; a value that resolves only in Hydra's runtime, or another primary
    config (--config-name, which the run checks itself), is not refused here."""
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["stage=infer", "infer.batch_size=-3"])
    assert "infer.batch_size=-3" in capsys.readouterr().err
    for argv, said in ((["stage=sweep_report"], "sweep_report.sweep_dir is not set"),  # a view stage's own check
                       (["stage=sweep_report", f"sweep_report.sweep_dir={tmp_path}/nope"], "no such file")):
        with pytest.raises(SystemExit):
            launch.check_command_line(argv)
        assert said in capsys.readouterr().err
    launch.check_command_line(["stage=eval", "eval.predictions=[${hydra:runtime.cwd}/outputs/runs/x/infer]"])
    (tmp_path / "mine.yaml").write_text("defaults: [config, _self_]\nrl:\n  per_device_train_batch_size: 12\n")
    launch.check_command_line([f"--config-dir={tmp_path}", "--config-name=mine", "stage=rl", "rl.num_generations=3"])
    assert capsys.readouterr().err == ""


def test_the_slurm_launcher_off_the_cluster_is_one_line(capsys, monkeypatch):
    sys.path.insert(0, str(REPO))
    import launch

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit):
        launch.check_command_line(["-m", "hydra/launcher=slurm", "stage=prepare"])
    err = capsys.readouterr().err
    assert "srun is not on this machine's PATH" in err and "hydra/launcher=local" in err
    with pytest.raises(SystemExit):  # without -m Hydra would run the job right here, on the login node
        launch.check_command_line(["hydra/launcher=slurm", "stage=prepare"])
    assert "without -m this job would run here" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "-x", ".hidden", "tab\tname", "~x"])
def test_a_bad_run_name_is_one_line_before_hydra(name, capsys):
    """run_name places Hydra's run dir: refused before Hydra resolves it (else Hydra's formatting traceback)."""
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["stage=infer", f"run_name={name}"])
    err = capsys.readouterr().err
    assert f"run_name={name!r}" in err and "nothing was run or written" in err and "Traceback" not in err
    launch.check_command_line(["-m", "stage=infer", "run_name=a.b_c-1"])  # a sweep of one good name passes


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])  # SIGHUP: the terminal closed
def test_sigterm_stops_a_run_with_its_failed_marker(name, code, base_overrides, tmp_path):
    """A scheduler's SIGTERM (preemption, time limit) stops a single run as Ctrl-C does: FAILED says it was
    stopped from outside, one line says so, exit 143; the same command would resume."""
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "out" / "runs" / "term"
    proc = subprocess.Popen([sys.executable, "launch.py", "stage=sft", *base_overrides, "run_name=term",
                             "sft.max_steps=100000", "sft.save_steps=100000", "sft.eval_steps=0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "launch.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "stage=sft" in log.read_text(errors="replace")):
        time.sleep(0.5)  # the run has started: its run dir is checked and recorded
    time.sleep(3)  # into the training loop
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"flare-exp: stopped ({name})" in err and "Traceback" not in err
    # no checkpoint saved yet (save_steps=100000): said, not a resume that would start at step 0 unannounced
    assert "the same command starts it again from step 0 (no checkpoint was saved yet: one is saved every " \
           "sft.save_steps=100000 steps)" in err
    assert (run_dir / "FAILED").read_text().startswith(f"stopped from outside (KeyboardInterrupt: {name})")


def test_a_refused_relaunch_leaves_the_runs_hydra_record_as_it_was(base_overrides, tmp_path):
    """Hydra writes .hydra/ before any check: a relaunch refused by a finished run gets its record put back; with
    overwrite=true the earlier attempt's record moves to attempts/01/.hydra/ with the rest of it. (An eval of a
    file: the lightest stage to launch three times; the record is every stage's.)"""
    import subprocess

    files = []
    for name, prediction in (("first.jsonl", "A"), ("second.jsonl", "B")):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps({"id": "d/1", "dataset": "dental", "task_type": "classification",
                                         "answer": "A", "prediction": prediction}) + "\n")
    hydra = tmp_path / "out" / "runs" / "rec" / ".hydra"
    launch = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "launch.py", "stage=eval", *base_overrides, "run_name=rec", "eval.radgraph=false", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    first = launch(f"eval.predictions=[{files[0]}]")
    assert first.returncode == 0, first.stderr[-2000:]
    record = {name: (hydra / name).read_text() for name in ("config.yaml", "overrides.yaml")}
    refused = launch(f"eval.predictions=[{files[1]}]")
    assert refused.returncode != 0 and "already holds a finished eval run" in refused.stderr, refused.stderr[-2000:]
    assert {name: (hydra / name).read_text() for name in record} == record  # as the finished run left it
    again = launch(f"eval.predictions=[{files[1]}]", "overwrite=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "second.jsonl" in (hydra / "overrides.yaml").read_text()
    kept = hydra.parent / "attempts" / "01" / ".hydra"
    assert {name: (kept / name).read_text() for name in record} == record


def test_a_launch_refused_for_the_lock_puts_the_runs_hydra_record_back(base_overrides, tmp_path, monkeypatch):
    """Another writer holds the run dir: the refused launch's .hydra/ (Hydra wrote it first) goes, the accepted
    launch's comes back."""
    from flare_exp.run import lifecycle
    from flare_exp.run.lock import RunLockedError

    run_dir = tmp_path / "run"
    (run_dir / ".hydra" / "accepted").mkdir(parents=True)
    (run_dir / ".hydra" / "accepted" / "overrides.yaml").write_text("- sft.logging_steps=1\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- sft.logging_steps=7\n")  # the refused launch's

    def held(self):
        raise RunLockedError("held by another launch")

    monkeypatch.setattr(lifecycle.RunLock, "acquire", held)
    with pytest.raises(RunLockedError):
        with lifecycle.Run(compose_cfg(["stage=sft", *base_overrides]), "sft", run_dir):
            pass
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- sft.logging_steps=1\n"


def test_the_card_presets_names_are_in_the_one_list(base_overrides):
    """A misspelt sft.card_preset / rl.card_preset is listed with the other problems, not found one launch later."""
    from flare_exp.checks import setting_problems

    problems = [str(p) for p in setting_problems(compose_cfg(
        ["stage=pipeline", "stage.steps=[sft,rl]", *base_overrides, "sft.card_preset=big", "rl.card_preset=big",
         "sft.learning_rate=-1"]))]
    assert "sft.card_preset='big': choose auto, large or none" in problems
    assert "rl.card_preset='big': choose auto or none" in problems and len(problems) == 3, problems


def test_the_empty_model_card_notice_is_left_out(caplog):
    """huggingface_hub's notice about the YAML-less card PEFT writes beside an adapter: nothing to act on."""
    from flare_exp.logs import quiet_known_messages

    quiet_known_messages()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("huggingface_hub.repocard").warning(
            "Repo card metadata block was not found. Setting CardData to empty.")
        logging.getLogger("huggingface_hub.repocard").warning("another notice")
    assert "Repo card metadata" not in caplog.text and "another notice" in caplog.text


def test_a_signals_exit_during_a_log_line_beside_a_bar_still_exits():
    """submitit exits (SystemExit) from its preemption handler at any bytecode; landing inside tqdm's taking of its
    locks, tqdm releases one it never took, and that RuntimeError (which logging swallows) used to replace the
    exit: the job trained on after its requeue."""
    from tqdm import tqdm

    from flare_exp.logs import BarSafeStream

    class InterruptedLock:
        def acquire(self, *a, **k):
            raise SystemExit(-1)

        def release(self):
            raise RuntimeError("cannot release un-acquired lock")

    out, saved = io.StringIO(), tqdm.get_lock()
    handler = logging.StreamHandler(BarSafeStream(out))
    logger = logging.getLogger("flare_exp.test_bars_exit")
    logger.addHandler(handler)
    bar = tqdm(total=3, file=out, mininterval=0)
    tqdm.set_lock(InterruptedLock())
    try:
        with pytest.raises(SystemExit):
            logger.warning("a log line")
    finally:
        tqdm.set_lock(saved)
        bar.close()
        logger.removeHandler(handler)


def test_a_home_folder_written_with_a_tilde_is_told_to_use_home(capsys):
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["data.root=~/FLARE_Task5"])
    err = capsys.readouterr().err
    assert "'~' is not expanded after data.root=" in err and "write data.root=$HOME/FLARE_Task5" in err


def test_an_error_raised_in_a_dataloader_worker_is_said_as_its_own_message():
    """torch re-raises a worker's error with the worker's whole traceback inside the message: the one-line refusal
    says the error's own message and names the worker."""
    import launch
    from torch.utils.data._utils.worker import ExceptionWrapper

    try:
        raise ValueError("data/raw/x.png: cut short (10 of 100 bytes)")
    except ValueError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(ValueError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert launch.own_message(raised.value) == ("data/raw/x.png: cut short (10 of 100 bytes) "
                                                "(ValueError in DataLoader worker process 1)")
    assert launch.own_message(ValueError("a: b\nc")) == "a: b\nc"


def test_a_missing_path_that_is_a_link_says_so(tmp_path):
    """A checkpoint or data path that is a broken or looping link is named as one, not as "no such file"."""
    import os

    from flare_exp.checks import _check_exists

    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for name, said in (("loop", "a symbolic link that loops"),
                       ("dangling", f"a symbolic link to {tmp_path / 'gone'}, which does not exist"),
                       ("absent", "no such file or directory")):
        with pytest.raises(FileNotFoundError, match=f"infer.checkpoint={tmp_path / name}: {said} "):
            _check_exists("infer.checkpoint", str(tmp_path / name), True, "")


def test_an_output_root_that_cannot_be_written_is_named_before_any_run(base_overrides, tmp_path, monkeypatch):
    """A read-only mount (or no permission) under paths.output_root: one line naming the key, not Hydra's
    logging traceback; a run whose root does not exist yet is fine where its parent takes new folders."""
    import os

    from flare_exp.checks import problems_of

    root = tmp_path / "archive" / "out"
    cfg = compose_cfg(["stage=eval", *base_overrides, f"paths.output_root={root}"])
    assert not [p for p in problems_of(cfg, inputs=True) if "paths.output_root" in str(p)]
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    (problem,) = [p for p in problems_of(cfg, inputs=True) if "paths.output_root" in str(p)]
    assert str(problem).startswith(f"paths.output_root={root}: {tmp_path} cannot be written (a read-only mount")
    # the run's own dir read-only under a writable root (a finished run archived, mounted back read-only)
    run_dir = root / "runs" / cfg.run_name
    run_dir.mkdir(parents=True)
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(run_dir) else real(path, mode))
    (problem,) = [p for p in problems_of(cfg, inputs=True) if "paths.output_root" in str(p)]
    assert f"{run_dir} cannot be written" in str(problem)
    step_dir = run_dir / "eval"  # a pipeline's step dir read-only inside its writable run dir
    step_dir.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(step_dir) else real(path, mode))
    (problem,) = [p for p in problems_of(cfg, inputs=True) if "paths.output_root" in str(p)]
    assert f"{step_dir} cannot be written" in str(problem)


def test_a_sweep_on_an_output_root_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """-m: the sweep's dir goes under the output root before any job: one line, not Hydra's OSError traceback."""
    import os

    sys.path.insert(0, str(REPO))
    import launch

    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    with pytest.raises(SystemExit):
        launch.check_command_line(["-m", f"paths.output_root={tmp_path / 'out'}", "stage=sft", "sft.max_steps=1,2"])
    err = capsys.readouterr().err
    assert f"paths.output_root={tmp_path / 'out'}: {tmp_path} cannot be written" in err and "Traceback" not in err


def test_a_read_only_finished_prepared_dir_is_reused_by_a_pipeline(base_overrides, demo_prepared, tmp_path,
                                                                    monkeypatch):
    """A shared prepare, finished and mounted read-only: a pipeline with a prepare step reuses it (nothing to
    write there), while one that would write it (unfinished, or overwrite=true) is refused naming the key."""
    import os
    import shutil

    from flare_exp.checks import problems_of

    prepared = tmp_path / "prepared"
    shutil.copytree(demo_prepared, prepared)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).startswith(str(prepared))
                        else real(path, mode))
    cfg = compose_cfg([*base_overrides, f"data.prepared_dir={prepared}", "stage.steps=[prepare,sft]"])
    assert not [p for p in problems_of(cfg, inputs=True) if "data.prepared_dir" in str(p)]
    again = compose_cfg([*base_overrides, f"data.prepared_dir={prepared}", "stage.steps=[prepare,sft]", "overwrite=true"])
    assert [p for p in problems_of(again, inputs=True) if "data.prepared_dir" in str(p) and "cannot be written" in str(p)]


def test_a_list_value_refused_on_the_command_line_is_not_blamed_on_a_file(capsys):
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["stage=runs", "data.image_window=[a,b]"])
    err = capsys.readouterr().err
    assert "set on the command line (data.image_window=[a,b])" in err and "config file" not in err


def test_an_empty_eval_list_or_a_training_run_dir_is_refused_before_hydra(capsys, tmp_path):
    """eval.predictions=[] and an sft run dir (no predictions) are refused before any run dir is made, as a
    path listed twice is."""
    sys.path.insert(0, str(REPO))
    import launch

    sft_dir = tmp_path / "runs" / "mine" / "sft"
    sft_dir.mkdir(parents=True)
    (sft_dir / "config.yaml").write_text("stage:\n  name: sft\n")
    adapter, sweep = sft_dir / "final", tmp_path / "sweeps" / "sw"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("")
    (tmp_path / "empty").mkdir()
    for value, said in (("[]", "eval.predictions is empty"),
                        (f"[{sft_dir}]", f"eval.predictions entry {sft_dir}: the run dir of a stage=sft run"),
                        (f"[{adapter}]", f"an adapter (LoRA weights), not predictions: run stage=infer "
                                         f"infer.checkpoint={adapter} first"),
                        (f"[{sweep}]", f"a sweep dir: name the jobs whose predictions to score, e.g. "
                                       f"eval.predictions=[{sweep}/0]"),
                        (f"[{sft_dir / 'config.yaml'}]", "a yaml file (a run's config, log or report?), not "
                                                          "predictions"),
                        (f"[{tmp_path}/empty]", "no predictions.jsonl or predictions.xlsx there")):
        with pytest.raises(SystemExit):
            launch.check_command_line(["stage=eval", f"eval.predictions={value}",
                                       f"paths.output_root={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert said in err and "before Hydra started" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # not a list: that one problem, not also "empty"
        launch.check_command_line(["stage=eval", f"eval.predictions={sft_dir}"])
    err = capsys.readouterr().err
    assert "a list: write" in err and "is empty" not in err


def test_a_value_out_of_range_in_the_users_file_names_the_file(tmp_path, capsys):
    """A range refusal (not a type error) of a value set in the user's experiment file (built on the repo's demo)
    names the file; the same key given on the command line is the command line's."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "neg.yaml").write_text("# @package _global_\ndefaults: [demo]\nsft:\n  max_steps: -7\n")
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "experiment=neg", "stage=sft"])
    assert f"sft.max_steps=-7: must be an integer >= 1 (or -1: sft.num_train_epochs decides), set in " \
           f"{tmp_path / 'experiment' / 'neg.yaml'}" in capsys.readouterr().err
    (tmp_path / "experiment" / "order.yaml").write_text(  # its own 5 first, then neg's -7 over it
        "# @package _global_\ndefaults: [_self_, neg]\nsft:\n  max_steps: 5\n")
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "experiment=order", "stage=sft"])
    assert f"sft.max_steps=-7: must be an integer >= 1 (or -1: sft.num_train_epochs decides), set in " \
           f"{tmp_path / 'experiment' / 'neg.yaml'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "experiment=neg", "stage=sft", "sft.max_steps=-3"])
    err = capsys.readouterr().err
    assert "sft.max_steps=-3" in err and "neg.yaml" not in err


def test_a_range_error_names_the_file_hydra_took_the_value_from(tmp_path, capsys):
    """A group appended on the command line (+cluster=a) is composed after the experiment, so its value is the
    one refused; a file with its own package header (# @package sft) is named too."""
    sys.path.insert(0, str(REPO))
    import launch

    for group, name, body in (("experiment", "good", "# @package _global_\nrl:\n  num_generations: 4\n"),
                              ("cluster", "a", "# @package _global_\nrl:\n  num_generations: 1\n"),
                              ("cluster", "c", "# @package sft\nlearning_rate: -1.0\n")):
        (tmp_path / group).mkdir(exist_ok=True)
        (tmp_path / group / f"{name}.yaml").write_text(body)
    for argv, said in (
            (["experiment=good", "+cluster=a", "stage=rl"], f"rl.num_generations=1: must be an integer >= 2 (GRPO "
                                                             f"compares completions of one prompt), set in "
                                                             f"{tmp_path}/cluster/a.yaml"),
            (["+cluster=c", "stage=sft"], f"sft.learning_rate=-1.0: must be a number >= 0, set in "
                                          f"{tmp_path}/cluster/c.yaml")):
        with pytest.raises(SystemExit):
            launch.check_command_line([f"--config-dir={tmp_path}", *argv])
        err = capsys.readouterr().err
        assert said in err and "experiment/good.yaml" not in err, err


def test_a_range_error_of_a_group_placed_under_a_package_names_the_file(tmp_path, capsys):
    """+cluster@sft=c (the file's keys placed under sft by the choice, over its own header): the range error
    named the key alone, as if the command line had set it; it names the file, as +cluster=c's does."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "bare.yaml").write_text("learning_rate: -1.0\n")
    (tmp_path / "cluster" / "headed.yaml").write_text("# @package rl\nlearning_rate: -2.0\n")
    (tmp_path / "cluster" / "global.yaml").write_text("sft:\n  learning_rate: -3.0\n")
    for choice, value in (("+cluster@sft=bare", "-1.0"), ("+cluster@sft=headed", "-2.0"),
                          ("+cluster@_global_=global", "-3.0")):
        with pytest.raises(SystemExit):
            launch.check_command_line([f"--config-dir={tmp_path}", choice, "stage=sft"])
        name = choice.split("=")[1]
        assert (f"sft.learning_rate={value}: must be a number >= 0, set in {tmp_path}/cluster/{name}.yaml"
                in capsys.readouterr().err), choice


def test_every_missing_choice_on_the_command_line_is_named_at_once(tmp_path, capsys):
    """data=demoo model=tinyy: Hydra stops at the first, so the second came one launch later; both are named now,
    each with its group's options. A choice placed under a package (+cluster@sft=nope) is named as
    +cluster=nope is (Hydra's raw "Could not find 'cluster/nope'" before)."""
    sys.path.insert(0, str(REPO))
    import launch

    with pytest.raises(SystemExit):
        launch.check_command_line(["data=demoo", "model=tinyy", "stage=sft"])
    err = capsys.readouterr().err
    assert "2 choices on the command line do not exist:" in err, err
    assert "- data=demoo on the command line: no data/demoo.yaml in the config dirs; data has demo" in err
    assert "- model=tinyy on the command line: no model/tinyy.yaml in the config dirs; model has qwen3vl_4b, tiny" in err
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "small.yaml").write_text("learning_rate: 1.0\n")
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "+cluster@sft=nope", "stage=sft"])
    err = capsys.readouterr().err
    assert "+cluster@sft=nope on the command line: no cluster/nope.yaml in the config dirs; cluster has small" in err
    with pytest.raises(SystemExit):
        launch.check_command_line([f"--config-dir={tmp_path}", "+cluster@sft=smal", "stage=sft"])
    assert "(did you mean +cluster@sft=small?)" in capsys.readouterr().err  # as the command line spells it
    (tmp_path / "experiment").mkdir()
    mine = tmp_path / "experiment" / "mine.yaml"
    mine.write_text("# @package _global_\ndefaults:\n  - override /model: tinny\n")
    with pytest.raises(SystemExit):  # a file's miss and the command line's: one launch, not two
        launch.check_command_line([f"--config-dir={tmp_path}", "experiment=mine", "data=demoo", "stage=sft"])
    err = capsys.readouterr().err
    assert (f"2 options picked on the command line and in the defaults lists of {mine} and its includes do not "
            "exist:") in err, err
    assert f"- {mine}: its defaults list picks model=tinny" in err and "- data=demoo on the command line" in err


def test_a_hydra_group_picked_in_a_users_file_that_the_launch_does_not_take_is_refused(tmp_path, capsys):
    """conf/config.yaml's own `override hydra/launcher: watched` wins over an experiment file's
    `override /hydra/launcher: slurm`, without a word from Hydra: a SLURM sweep would run on the login node. A
    pick that is taken (reward_search's sweeper) passes."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    demo = (CONF / "experiment" / "demo.yaml").read_text()
    picked = demo.replace("  - override /data: demo\n", "  - override /data: demo\n  - override /hydra/launcher: slurm\n")
    assert picked != demo
    (tmp_path / "experiment" / "mine.yaml").write_text(picked)
    (tmp_path / "experiment" / "search.yaml").write_text((CONF / "experiment" / "reward_search.yaml").read_text())
    with pytest.raises(SystemExit):
        launch.check_command_line(["-m", f"--config-dir={tmp_path}", "experiment=mine", "stage=sft"])
    err = capsys.readouterr().err
    assert (f"{tmp_path}/experiment/mine.yaml: its defaults list picks hydra/launcher=slurm, which this launch does "
            "not take (the repo's conf/config.yaml chooses hydra/launcher=watched); choose it on the command line: "
            "-m hydra/launcher=slurm") in err
    (tmp_path / "experiment" / "lokal.yaml").write_text(picked.replace("launcher: slurm", "launcher: lokal"))
    (tmp_path / "experiment" / "part.yaml").write_text(demo + "hydra:\n  launcher:\n    partition: gpu\n")
    for argv, said in ((["experiment=mine", "hydra/launcher=local"], "(the command line's hydra/launcher=local wins)"),
                       (["experiment=lokal"], "nor is lokal a hydra/launcher option: basic, local, slurm"),
                       (["experiment=part"], "hydra.launcher.partition is no setting of the launcher this launch "
                                             f"composes, set in {tmp_path}/experiment/part.yaml")):
        with pytest.raises(SystemExit):
            launch.check_command_line(["-m", f"--config-dir={tmp_path}", *argv, "stage=sft"])
        assert said in capsys.readouterr().err
    cfg, in_files, _ = launch.composed([f"hydra.searchpath=[file://{tmp_path}]", "experiment=search", "stage=rl"])
    assert cfg is not None and not [p for p in in_files if "hydra/" in str(p)]


def test_a_hydra_group_picked_without_override_after_a_files_overrides_is_said_as_not_taken(tmp_path, capsys):
    """`- /hydra/launcher: slurm` (no `override`) after the file's `override` entries: Hydra's raw "Overrides must
    be at the end of the defaults list"; now the line the same pick with `override` gets (the launch would not
    take it anywhere in the file), which says to choose it on the command line and drop it from the file."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    demo = (CONF / "experiment" / "demo.yaml").read_text()
    for name, pick in (("plain", "  - /hydra/launcher: slurm\n"), ("keyword", "  - override /hydra/launcher: slurm\n")):
        picked = demo.replace("  - override /data: demo\n", "  - override /data: demo\n" + pick)
        assert picked != demo
        (tmp_path / "experiment" / f"{name}.yaml").write_text(picked)
        for extra in (["-m"], []):
            with pytest.raises(SystemExit):
                launch.check_command_line([*extra, f"--config-dir={tmp_path}", f"experiment={name}", "stage=sft"])
            err = capsys.readouterr().err
            assert (f"{tmp_path}/experiment/{name}.yaml: its defaults list picks hydra/launcher=slurm, which this "
                    "launch does not take (the repo's conf/config.yaml chooses hydra/launcher=watched); choose it on "
                    "the command line: -m hydra/launcher=slurm; drop it from the file") in err, err
            assert "Overrides must be at the end" not in err


def test_a_hydra_group_picked_in_a_copy_inside_conf_is_said_as_not_taken(tmp_path, monkeypatch, capsys):
    """The docs say to copy an experiment into conf/experiment/: a copy there that picks hydra/launcher=slurm
    gets the same line as one in a --config-dir (before, files under conf/ were taken for the repo's and a SLURM
    sweep ran its jobs where it was launched, silently)."""
    import shutil

    sys.path.insert(0, str(REPO))
    import launch
    from flare_exp import command_line

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)  # the repo's conf/ stays as it is for the tests running beside this one
    monkeypatch.setattr(command_line, "CONF_DIR", conf)
    demo = (CONF / "experiment" / "demo.yaml").read_text()
    for name, pick in (("plain", "  - /hydra/launcher: slurm\n"), ("keyword", "  - override /hydra/launcher: slurm\n")):
        (conf / "experiment" / f"{name}.yaml").write_text(
            demo.replace("  - override /data: demo\n", "  - override /data: demo\n" + pick))
        with pytest.raises(SystemExit):
            launch.check_command_line(["-m", f"experiment={name}", "stage=sft"])
        err = capsys.readouterr().err
        assert (f"{conf}/experiment/{name}.yaml: its defaults list picks hydra/launcher=slurm, which this launch does "
                "not take") in err, err
    # the pick in a file the chosen one includes (relative or absolute), not in the chosen one itself
    for include in ("plain", "/experiment/keyword"):
        (conf / "experiment" / "outer.yaml").write_text(f"# @package _global_\ndefaults:\n  - {include}\n")
        with pytest.raises(SystemExit):
            launch.check_command_line(["-m", "experiment=outer", "stage=sft"])
        err = capsys.readouterr().err
        assert f"{conf}/experiment/{include.rpartition('/')[2]}.yaml: its defaults list picks hydra/launcher=slurm" \
            in err, err
    launch.check_command_line(["-m", "experiment=demo", "stage=sft"])  # the repo's own files: nothing to say
    launch.check_command_line(["-m", "experiment=reward_search", "stage=sft",  # its GREEN objective needs a judge
                               "hydra.sweeper.objectives=[classification.balanced_accuracy]",
                               "hydra.sweeper.objective_weights=null"])
    with pytest.raises(SystemExit):  # a setting of Optuna's sweeper where the basic one runs (Hydra's traceback)
        launch.check_command_line(["-m", "experiment=demo", "stage=sft", "hydra.sweeper.objectives=[a.b]"])
    assert "hydra.sweeper.objectives is no setting of the sweeper this launch composes" in capsys.readouterr().err


def test_a_sweep_with_cfg_and_an_empty_choice_are_one_line(capsys):
    sys.path.insert(0, str(REPO))
    import launch

    for argv, said in ((["-m", "--cfg", "job", "stage=rl"], "-m with --cfg job: --cfg prints one composed config"),
                       (["model=", "stage=runs"], "model= on the command line: no option given; model has "
                                                  "qwen3vl_4b, tiny")):
        with pytest.raises(SystemExit):
            launch.check_command_line(argv)
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err


def test_a_pruner_argument_the_sweeper_config_lacks_is_one_line_with_the_closest(capsys):
    """A misspelt pruner argument gave OmegaConf's struct traceback; a pruner written as a dict with a new argument
    was said as "unknown config key hydra, set in a config file" (it came from the command line)."""
    sys.path.insert(0, str(REPO))
    import launch

    for override, said in (("hydra.sweeper.pruner.n_startup_trial=3",
                            "hydra.sweeper.pruner.n_startup_trial is no setting of the sweeper this launch composes, "
                            "set on the command line (hydra.sweeper.pruner.n_startup_trial) (did you mean "
                            "hydra.sweeper.pruner.n_startup_trials?)"),
                           ("hydra.sweeper.pruner={name:successive_halving,min_resource:3}",
                            "hydra.sweeper.pruner.min_resource is no setting of the sweeper this launch composes, set "
                            "on the command line")):
        with pytest.raises(SystemExit):
            launch.check_command_line(["-m", "hydra/sweeper=optuna", "reward.multi_label.weights.label_f1="
                                       "interval(0.1,1.0)", override])
        err = capsys.readouterr().err
        assert said in err and "+hydra.sweeper.pruner.min_resource=3" in err and "Traceback" not in err, err


def test_a_swept_or_overlong_run_name_is_refused_before_hydra(capsys):
    """run_name=a,b in a sweep put each job in a sweep dir of its own (sweeps/a/0, sweeps/b/1) while the sweep
    announced sweeps/<default>/: a rerun failed both jobs and sweep_report found nothing; a name over 255 bytes
    was an OSError traceback."""
    sys.path.insert(0, str(REPO))
    import launch

    for args, said in ((["-m", "stage=infer", "run_name=swa,swb"], "sweeps run_name: it names the sweep dir itself"),
                       (["stage=infer", "run_name=" + "x" * 300], "is 300 bytes long (a directory name holds at most 255)")):
        with pytest.raises(SystemExit):
            launch.check_command_line(args)
        err = capsys.readouterr().err
        assert said in err and "nothing was run or written" in err, err


def test_overrides_before_a_flag_are_read_as_after_it(tmp_path):
    """`python launch.py run_name=x -m a=0,1` was Hydra's usage dump ("unrecognized arguments"): its parser reads
    overrides only after its flags. The flags (and their values) go first, each kept in order; a line that cannot
    be read either way is left for Hydra's parser to name."""
    import subprocess

    from flare_exp.command_line import flags_first

    assert flags_first(["run_name=x", "-m", "a=0,1"]) == ["-m", "run_name=x", "a=0,1"]
    assert flags_first(["a=1", "--config-name", "c", "b=2"]) == ["--config-name", "c", "a=1", "b=2"]
    assert flags_first(["a=1", "--info", "config", "b=2"]) == ["--info", "config", "a=1", "b=2"]
    for as_given in (["-m", "a=1"], ["a=1", "--info"], ["a=1", "--bogus", "b=2"], []):
        assert flags_first(as_given) == as_given
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), "stage=runs", "--cfg", "job",
                           f"paths.output_root={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and f"output_root: {tmp_path}" in done.stdout, done.stderr


def test_a_refusal_under_torchrun_names_the_rank_that_says_it(monkeypatch, capsys):
    """Every rank of a torchrun job reaches the same checks: the same refusal printed twice read as one said twice
    (or a loop); each now names its rank. A one-process run says it as before."""
    from flare_exp.command_line import refuse

    for env, said in (({"WORLD_SIZE": "2", "RANK": "1"}, "flare-exp (rank 1 of 2): ValueError: bad key"),
                      ({"WORLD_SIZE": "1", "RANK": "0"}, "\nflare-exp: ValueError: bad key")):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit):
            refuse(ValueError("bad key"))
        assert said in capsys.readouterr().err


def test_a_stage_on_the_demos_prepared_records_names_a_missing_data_root_before_it_starts(base_overrides, tmp_path):
    """data=demo skipped the data.root check (prepare generates the demo there); once prepared, the records' images
    are under it: infer with data.root gone made its run dir and failed on the first image, the key unnamed."""
    from flare_exp.checks import validate

    with pytest.raises(Exception, match=r"data.root=\S*nowhere: no such file or directory"):
        validate(compose_cfg(["stage=infer", *base_overrides, f"data.root={tmp_path / 'nowhere'}"]), inputs=True)
    validate(compose_cfg(["stage=infer", *base_overrides]), inputs=True)  # the demo's own root: fine
