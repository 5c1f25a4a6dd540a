"""Every numeric setting's range, the reward's terms and the judges' files are checked before any work, for
every step of a pipeline, and reported together; a reward weight of 0 turns its term off."""
import pytest

from conftest import compose_cfg
from flare_exp.checks import validate
from flare_exp.rewards.combine import CombinedReward

BAD_RANGES = {"sft.eval_steps": 0, "sft.early_stopping_patience": 2, "infer.batch_size": 0, "sft.max_steps": 0,
              "sft.learning_rate": -1e-4, "sft.per_device_train_batch_size": 0, "rl.num_generations": 1,
              "rl.top_p": 1.5, "model.lora.dropout": 1.0, "rl.warmup_ratio": 2.0, "eval.green.batch_size": 0,
              "infer.max_new_tokens": -1, "data.image_workers": -2, "rl.log_rollouts_steps": -1,
              "rl.rollouts_max_mb": -1.0, "rl.eval_max_new_tokens": 0}  # the last three: taken with a meaning unsaid


def test_every_range_problem_is_reported_together_with_its_key():
    cfg = compose_cfg(["stage.steps=[prepare,sft,rl,infer,eval]", *(f"{k}={v}" for k, v in BAD_RANGES.items())])
    with pytest.raises(ValueError, match="problems with the settings; nothing was run") as e:
        validate(cfg)
    for key, value in BAD_RANGES.items():
        if not key.startswith("sft.e"):
            assert f"{key}={value}: must be" in str(e.value), key
    assert "sft.early_stopping_patience=2 stops on the validation loss, but sft.eval_steps=0 never evaluates" in \
        str(e.value)
    with pytest.raises(ValueError, match="2 problems") as e:  # a switch beside a range: both named at once
        validate(compose_cfg(["stage=infer", "infer.batch_size=0", "infer.inputs_ahead=2"]))
    assert "infer.inputs_ahead=2: choose auto, true or false" in str(e.value)


def test_a_pipeline_names_its_later_steps_device_cache_and_batch_typos_before_its_first_step():
    """A pipeline (or a sweep's job) trained for hours, then stopped at infer on a typo: infer.image_device,
    the KV cache of rl and infer, a batch size of null or true. Now each is named before any step, together."""
    bad = {"infer.image_device": "gpu", "infer.cache_implementation": "junk", "rl.cache_implementation": "statik",
           "infer.batch_size": "null", "eval.green.batch_size": "true"}
    cfg = compose_cfg(["stage.steps=[prepare,sft,rl,infer,eval]", *(f"{k}={v}" for k, v in bad.items())])
    with pytest.raises(ValueError, match=f"{len(bad)} problems with the settings") as e:
        validate(cfg)
    for said in ("infer.image_device='gpu': choose auto, cpu or cuda[:N]",
                 "infer.cache_implementation='junk': choose auto, null (dynamic) or one of transformers' caches: static,",
                 "rl.cache_implementation='statik'", "infer.batch_size=None: must be an integer >= 1 or auto",
                 "eval.green.batch_size=True: must be"):
        assert said in str(e.value), said
    validate(compose_cfg(["stage=infer", "infer.image_device=cuda:1", "infer.cache_implementation=null",
                          "rl.cache_implementation=junk"]))  # a device named, generate's dynamic cache; rl not run
    validate(compose_cfg(["stage=prepare", "sft.max_steps=0"]))  # a step checks the sections it reads
    validate(compose_cfg(["stage=sft", "sft.max_steps=-1", "sft.eval_steps=0"]))  # epochs decide; no evaluation


@pytest.mark.parametrize("setting, message", [
    ("+reward.classification.weights.choise=1.0", "reward.classification.weights.choise: unknown reward term"),
    ("+reward.terms.choice.corect=2", "reward.terms.choice.corect: the choice term takes no such parameter"),
    ("reward.terms.choice.correct=abc", r"reward.terms.choice.correct='abc': must be a number \(its default: 1.0\)"),
    ("eval.green.model_path=/nowhere/GREEN", r"eval.green.model_path=/nowhere/GREEN: no such file"),
    ("reward.radgraph.build_tiny=false", r"reward.radgraph.model_dir=.*: no radgraph-xl/weights.th there"),
    ("reward.radgraph.build_tiny=true", r"no radgraph-xl/weights.th there.*builds its tiny RadGraph only under "
                                        r"paths.cache_dir"),  # a folder the user names is never written into
    ("sft.max_steps=0", "sft.max_steps=0: must be"),
])
def test_a_pipeline_checks_every_step_before_its_first(setting, message, base_overrides, tmp_path, monkeypatch):
    from flare_exp.run import stage as stages
    from flare_exp.main import run

    ran = []
    for step in ("prepare", "sft", "rl", "infer", "eval"):
        monkeypatch.setattr(stages.get_runner(step), "run", lambda cfg, out, step=step: ran.append(step))
    with pytest.raises(ValueError, match=message):
        run(compose_cfg([*base_overrides, "stage=pipeline", f"reward.radgraph.model_dir={tmp_path / 'rg'}",
                         setting]), run_dir=tmp_path / "pipeline")
    assert ran == []


def _flare_reward(**weights):
    cfg = compose_cfg(["reward=flare"]).reward
    for task, task_weights in weights.items():
        cfg[task].weights = task_weights
    return cfg


def test_a_weight_of_zero_turns_the_term_off():
    reward = CombinedReward(_flare_reward(classification={"choice": 0.0}, regression={"numeric": 1.0, "choice": 0},
                                          report_generation={"rouge_l": 1.0, "radgraph": 0}))
    assert "choice" not in reward.terms and "radgraph" not in reward.terms  # not built: no model needed
    scores = reward(completions=["A", "3", None], task_type=["classification", "regression", "classification"],
                    answer=["A", "3", "A"], dataset=["dental", "boneresorption", "dental"])
    assert scores == [0.0, 1.0, -1.0]  # the task with every term off: 0, not the invalid-output score
    assert reward.task_types() == ["report_generation", "multi_label", "regression"]


def test_all_zero_weights_are_refused_at_startup():
    terms = (("report_generation", "radgraph"), ("report_generation", "rouge_l"), ("report_generation", "format_flare"),
             ("classification", "choice"), ("multi_label", "label_f1"), ("regression", "numeric"))
    off = [f"reward.{task}.weights.{term}=0" for task, term in terms]
    with pytest.raises(ValueError, match="every reward weight is 0"):
        validate(compose_cfg(["stage=rl", *off]))
    with pytest.raises(ValueError, match="rl.task_types names classification, whose reward weights are all 0"):
        validate(compose_cfg(["stage=rl", "reward.classification.weights.choice=0",
                              "rl.task_types=[classification,regression]"]))


@pytest.mark.parametrize("setting, message", [
    ("data.train_splits=[trainig]", "data.train_splits: 'trainig' is not a FLARE split folder (did you mean "
                                    "'training'?); FLARE's are training, validation-public"),
    ("data.val_splits=[validation-public,valid]", "data.val_splits: 'valid' is not a FLARE split folder"),
    ("resume=false", "resume=False: not auto, never or a checkpoint that exists (no such path: "),
    ("resume=no", "did you mean resume=never?"),
    ("resume=/nowhere/checkpoint-5", "resume=/nowhere/checkpoint-5: not auto, never or a checkpoint that exists"),
    ("resume=", "resume= is empty: pass resume=auto"),  # read as the working directory before
    ("data.train_splits=[training,validation-public]", "the split 'validation-public' is named in data.train_splits "
                                                        "and data.val_splits: give each split one role"),
    ("data.val_splits=[validation-hidden,validation-hidden]", "data.val_splits lists the split "
                                                              "'validation-hidden' 2 times: list it once"),
    ("data.datasets=[chestDR,dental]", "data.datasets: 'chestDR' is FLARE's 'chestdr' in other case"),
    ("data.demo.train_per_dataset=-2", "data.demo.train_per_dataset=-2: must be an integer >= 1"),
])
def test_a_split_name_or_resume_that_names_nothing_is_refused_before_work(setting, message):
    """A split folder FLARE does not have would leave its file empty (found only when sft reads it); a resume
    value that is neither auto, never nor a path was read as a path after the model had loaded."""
    with pytest.raises(ValueError) as e:
        validate(compose_cfg(["stage.steps=[prepare,sft]", setting]))
    assert message in str(e.value)


def test_the_resume_values_that_work_pass(tmp_path):
    from flare_exp.models.checkpoints import mark_complete

    run_dir = tmp_path / "sft"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    mark_complete(run_dir / "checkpoint-4")
    for value in ("auto", "never", str(run_dir / "checkpoint-4")):
        validate(compose_cfg(["stage.steps=[prepare,sft]", f"resume={value}"]))
    with pytest.raises(ValueError, match=r"is not a complete Trainer checkpoint .*it is a run dir: name one of its "
                                         r"checkpoints, e.g. resume=.*sft/checkpoint-4"):
        validate(compose_cfg(["stage.steps=[prepare,sft]", f"resume={run_dir}"]))
    validate(compose_cfg(["stage=infer", "resume=false"]))  # infer reads no resume setting


def test_an_infer_split_that_is_no_prepared_split_is_named():
    with pytest.raises(ValueError, match=r"infer.split='tst': choose train, val or test"):
        validate(compose_cfg(["stage=infer", "infer.split=tst"]))
    validate(compose_cfg(["stage=infer", "infer.split=tst", "infer.input_file=/any/file.jsonl"]))  # not read


def test_a_path_built_from_a_wrong_setting_is_not_a_second_problem(demo_prepared):
    """infer.split=tst also makes tst.jsonl, which does not exist: the split is named once, not twice."""
    demo = [f"data.prepared_dir={demo_prepared}", f"data.root={demo_prepared.parent / 'raw'}"]  # its images' root
    with pytest.raises(ValueError) as raised:
        validate(compose_cfg(["stage=infer", "infer.split=tst", *demo]), inputs=True)
    assert str(raised.value).startswith("infer.split='tst'") and "no such file" not in str(raised.value)
    with pytest.raises(ValueError, match=r"(?s)2 problems.*infer.split='tst'.*model.path=/nowhere") as raised:
        validate(compose_cfg(["stage=infer", "infer.split=tst", *demo, "model.path=/nowhere",
                              "model.build_tiny=false"]), inputs=True)


def test_the_significance_and_crimson_settings_and_the_seed_are_ranged_before_any_work(base_overrides, tmp_path):
    """A negative eval.significance.ar_trials gave a p-value of -0.25 (and 'adjusted p 0.0000' for a zero
    difference); a negative significance seed or run seed failed after all scoring / at the trainer's seeding;
    CRIMSON's 0s meant its package defaults; its missing judge dir was found only after Hydra started."""
    from flare_exp.checks import validate

    cfg = compose_cfg(["stage=eval", *base_overrides, "eval.significance.ar_trials=-5", "eval.significance.seed=-1",
                       "eval.crimson.max_new_tokens=0", "eval.crimson.batch_size=0", "seed=-3",
                       f"eval.crimson.model_path={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="7 problems") as e:
        validate(cfg, inputs=True)
    for said in ("seed=-3: must be an integer from 0 to 2**32 - 1", "eval.significance.ar_trials=-5: must be an integer from 0 to 1,000,000",
                 "eval.significance.seed=-1: must be", "eval.crimson.max_new_tokens=0: must be an integer >= 1",
                 "eval.crimson.batch_size=0: must be", f"eval.crimson.model_path={tmp_path / 'nope'}: no such file",
                 "eval.predictions is empty"):  # eval's own check, no longer skipped beside the ranges'
        assert said in str(e.value), said


def test_a_green_cap_past_its_total_length_and_an_output_root_that_is_a_file_are_said(base_overrides, tmp_path):
    from flare_exp.checks import check_writable

    cfg = compose_cfg(["stage=eval", *base_overrides, "eval.green.max_new_tokens=3000"])
    with pytest.raises(ValueError, match=r"eval.green.max_new_tokens=3000 caps nothing: the judgment shares "
                                         r"eval.green.max_length=2048 tokens with its prompt"):
        validate(cfg)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile is a file, not a folder, and this run writes .*afile/runs"):
        check_writable("paths.output_root", tmp_path / "afile", tmp_path / "afile" / "runs")


def test_the_judges_named_settings_and_a_seed_past_numpys_range_are_checked_before_any_work(base_overrides):
    """A typo in eval.green.parser failed only after GREEN had judged every report; seed=2**32 in sft's seeding."""
    cfg = compose_cfg(["stage=eval", *base_overrides, "eval.green.parser=robst", "eval.green.decode_loop=grph",
                       "eval.crimson.decode_loop=x", "eval.green.dtype=fp16", "seed=4294967296",
                       "eval.predictions=[outputs/runs/x]"])  # a path, not none (eval's own check, said too)
    with pytest.raises(ValueError, match="5 problems") as e:
        validate(cfg)
    for said in ("seed=4294967296: must be an integer from 0 to 2**32 - 1", "eval.green.parser='robst': choose "
                 "package or robust", "eval.green.decode_loop='grph'", "eval.crimson.decode_loop='x'",
                 "eval.green.dtype='fp16'"):
        assert said in str(e.value), said


def test_the_comparison_of_stage_runs_ranges_its_trials(base_overrides):
    """python launch.py stage=runs runs.compare=[a,b] reads eval.significance too: 10**9 resamples would run for
    days (its arrays are drawn in bounded chunks, so never all memory), a negative count gave a negative p."""
    from flare_exp.checks import validate

    cfg = compose_cfg(["stage=runs", *base_overrides, "runs.compare=[a,a]", "eval.significance.resamples=1000000000",
                       "eval.significance.ar_trials=1000001", "eval.significance.correction=bonferroni"])
    with pytest.raises(ValueError, match="4 problems") as e:
        validate(cfg)
    assert "eval.significance.correction='bonferroni': choose holm, bh or none" in str(e.value)
    assert "runs.compare=['a', 'a'] names a run more than once" in str(e.value)
    assert "eval.significance.resamples=1000000000: must be an integer from 0 to 1,000,000" in str(e.value)
    assert "eval.significance.ar_trials=1000001: must be" in str(e.value)


def test_a_green_held_out_metric_without_a_judge_is_refused(base_overrides):
    """Every held-out eval read n/a: no best/ adapter kept, an Optuna search's pruning off, silently."""
    from flare_exp.checks import validate

    with pytest.raises(ValueError, match="rl.metric_for_best_model=report_generation.green_score needs the GREEN judge"):
        validate(compose_cfg(["stage=rl", *base_overrides, "rl.eval_steps=4",
                              "rl.metric_for_best_model=report_generation.green_score"]))
    validate(compose_cfg(["stage=rl", *base_overrides, "rl.eval_steps=0",  # no held-out eval: nothing to score
                          "rl.metric_for_best_model=report_generation.green_score"]))


@pytest.mark.parametrize("settings, said", [
    (["stage=rl", "rl.recompute_every_n_layers=-1", "rl.num_generations=3"],
     ["rl.recompute_every_n_layers=-1: auto, 0", "not divisible by rl.num_generations=3"]),
    (["stage=sft", "sft.recompute_above_tokens=-5", "sft.card_preset=large"],
     ["sft.recompute_above_tokens=-5: a token count", "sft.card_preset=large: the large-card settings"]),
    (["stage=rl", "rl.alarm_length_collapse=5", "rl.alarm_window=0"],
     ["rl.alarm_length_collapse=5.0: a share of the first steps' mean completion length, above 0 and below 1",
      "rl.alarm_window=0: the alarm compares"]),
    (["stage=rl", "rl.max_steps=0", "rl.recompute_every_n_layers=-1"],  # a range beside a stage's own check
     ["rl.max_steps=0: must be", "rl.recompute_every_n_layers=-1: auto, 0"]),
    (["stage=sft", "sft.max_steps=0", "sft.recompute_above_tokens=-5"],
     ["sft.max_steps=0: must be", "sft.recompute_above_tokens=-5: a token count"]),
])
def test_a_stages_own_refusals_are_listed_together_not_the_first_alone(settings, said, monkeypatch):
    """A stage's check raised its first refusal and the ranges' problems skipped it altogether: a second
    launch found the next one."""
    import torch

    from flare_exp.checks import setting_problems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # sft.card_preset=large is then refused
    problems = [str(p) for p in setting_problems(compose_cfg(settings))]
    assert len(problems) == len(said), problems
    for words in said:
        assert any(words in p for p in problems), (words, problems)


def test_a_problem_two_checks_find_is_listed_once():
    """sft.card_preset=huge was refused by the preset names' check and by sft's own: the same line twice."""
    from flare_exp.checks import setting_problems

    problems = [str(p) for p in setting_problems(compose_cfg(["stage=sft", "sft.card_preset=huge"]))]
    assert problems == ["sft.card_preset='huge': choose auto, large or none"]


@pytest.mark.parametrize("share", [5, 1, 1.0, 0, -0.5, "nan"])
def test_the_length_collapse_is_a_share_below_one(share):
    """rl.alarm_length_collapse is a share of the first steps' mean length: 5 made a rising length "collapse"."""
    from flare_exp.checks import setting_problems

    problems = [str(p) for p in setting_problems(compose_cfg(["stage=rl", f"rl.alarm_length_collapse={share}"]))]
    assert len(problems) == 1 and "above 0 and below 1" in problems[0], problems
    assert setting_problems(compose_cfg(["stage=rl", "rl.alarm_length_collapse=0.9"])) == []


@pytest.mark.parametrize("rise", ["-0.1", "nan", "inf", "-10"])
def test_the_alarms_reward_rise_is_a_finite_number_not_below_zero(rise):
    """rl.alarm_min_rise=nan or -10 let a falling reward read as a rise ("rose by -0.2635") and stop the run."""
    from flare_exp.checks import setting_problems

    problems = [str(p) for p in setting_problems(compose_cfg(["stage=rl", f"rl.alarm_min_rise={rise}"]))]
    assert len(problems) == 1 and "a finite number of 0 or more" in problems[0], problems
    assert setting_problems(compose_cfg(["stage=rl", "rl.alarm_min_rise=0"])) == []


def test_a_heldout_eval_of_no_records_is_refused_before_the_model_loads():
    """rl.eval_steps=2 rl.eval_per_task=0 failed once the model had loaded, blaming rl.eval_file ("no records")."""
    with pytest.raises(ValueError, match=r"rl.eval_steps=2 evaluates held-out records but rl.eval_per_task=0"):
        validate(compose_cfg(["stage=rl", "rl.eval_steps=2", "rl.eval_per_task=0"]))
