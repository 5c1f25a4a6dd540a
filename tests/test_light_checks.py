"""The settings checks a sweep's launcher runs for every job before it submits any import neither torch nor
transformers' trainer stack (seconds each on a login node): the stage modules load light, TRL's loss types and
transformers' vision-language model types are read from their source, the callbacks' base needs no trainer."""
import ast
import subprocess
import sys
import textwrap

from conftest import REPO

HEAVY = ("torch", "transformers", "peft", "trl", "accelerate")


def test_every_stages_settings_and_inputs_are_checked_without_torch(session_dir, tiny_model_dir, demo_prepared,
                                                                     sft_adapter):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from conftest import compose_cfg
        from flare_exp.checks import input_problems, setting_problems
        import flare_exp.stages.sft, flare_exp.stages.rl, flare_exp.stages.infer, flare_exp.stages.evaluate
        common = ["paths.cache_dir={session_dir / 'cache'}", "paths.output_root={session_dir / 'light'}"]
        for stage in ("prepare", "sft", "rl", "infer", "pipeline"):
            extra = ["rl.init_from={sft_adapter}"] if stage == "rl" else []
            cfg = compose_cfg(["stage=" + stage, *common, *extra])
            problems = setting_problems(cfg) + input_problems(cfg)
            assert not problems, (stage, problems)
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_the_callbacks_base_answers_any_event_with_nothing():
    from flare_exp.callback_base import TrainerCallback

    class Counting(TrainerCallback):
        seen = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.seen += 1

    callback = Counting()
    callback.on_step_end(None, None, None)
    assert callback.seen == 1
    assert callback.on_an_event_of_a_newer_transformers(None, None, None, model=None) is None
    try:
        callback.not_an_event
    except AttributeError as e:
        assert "not_an_event" in str(e)
    else:
        raise AssertionError("a name that is no event must not be answered")


def test_the_trainer_calls_our_callbacks(tmp_path):
    """transformers' CallbackHandler (the real one) calls a callback on our base for the events it defines and
    passes over the others; a control it returns is kept."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler

    from flare_exp.callback_base import TrainerCallback

    class Stopper(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True
            return control

    handler = CallbackHandler([Stopper()], None, None, None, None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    control = handler.on_step_end(args, TrainerState(), TrainerControl())
    assert control.should_training_stop
    assert handler.on_train_begin(args, TrainerState(), TrainerControl()) is not None  # not defined: passed over


def test_trl_loss_types_read_from_its_source_equal_its_config():
    import dataclasses
    import re

    from trl import GRPOConfig

    from flare_exp.stages.rl import trl_loss_types

    text = next(f.metadata["help"] for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type")
    imported = tuple(re.findall(r"'(\w+)'", re.search(r"Supported values are (.*?)\.\s", text).group(1)))
    assert trl_loss_types() == imported and "dapo" in imported


def test_vision_language_kinds_read_from_source_equal_transformers_registry():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from flare_exp.models.checkpoint_files import image_text_to_text_kinds

    assert image_text_to_text_kinds() == dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    assert "qwen3_vl" in image_text_to_text_kinds()


def test_source_readers_say_none_where_the_source_has_another_form():
    from flare_exp.package_source import assigned_literal, field_help, parsed

    tree = ast.parse(textwrap.dedent("""
        NAMES = OrderedDict([("a", "A"), ("b", "B")])
        BUILT = make_names()
        class Config:
            plain: str = "x"
            computed: str = field(default="x", metadata={"help": HELP_TEXT})
            described: str = field(default="x", metadata={"help": "Supported values are 'x'. More."})
    """))
    assert assigned_literal(tree, "NAMES") == {"a": "A", "b": "B"}
    assert assigned_literal(tree, "BUILT") is None and assigned_literal(tree, "MISSING") is None
    assert field_help(tree, "Config", "described").startswith("Supported values")
    assert field_help(tree, "Config", "computed") is None and field_help(tree, "Config", "plain") is None
    assert parsed("no_such_package_here", "x.py") is None and parsed("trl", "no/such/file.py") is None
    assert field_help(None, "Config", "x") is None and assigned_literal(None, "NAMES") is None


def test_an_eval_scoring_a_file_and_the_listing_import_no_torch(tmp_path):
    """Scoring a predictions file without a scorer model (eval.radgraph=false) and stage=runs need no torch; the
    compile cache's switches, model.cpu_threads and the ranks' barrier imported it (and inductor: ~6 s a launch,
    each job of an eval sweep)."""
    import json

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                                 "prediction": "A"}) + "\n")
    script = textwrap.dedent(f"""
        import atexit, runpy, sys
        atexit.register(lambda: print("heavy:", sorted(m for m in {HEAVY!r} if m in sys.modules)))
        sys.argv = ["launch.py", *sys.argv[1:]]
        runpy.run_path("launch.py", run_name="__main__")
    """)
    out = tmp_path / "out"
    for args in (["stage=eval", "eval.radgraph=false", f"eval.predictions=[{preds}]", "model.cpu_threads=1"],
                 ["stage=runs"]):
        proc = subprocess.run([sys.executable, "-c", script, *args, f"paths.output_root={out}", "run_name=light"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == "heavy: []", (args, proc.stdout[-2000:])
    assert (out / "runs" / "light" / "metrics.json").is_file()
