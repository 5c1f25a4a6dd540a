import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg
from hydra.errors import ConfigCompositionException as HydraCompositionError


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("stage", _options("stage"))
def test_every_stage_composes(stage):
    cfg = compose_cfg([f"stage={stage}"])
    assert cfg.stage.name == stage


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_composes(model):
    cfg = compose_cfg(["~experiment", f"model={model}", "data.root=/x"])
    assert cfg.model.name == model
    assert cfg.model.backend in ("hf", "unsloth")


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_composes(data):
    cfg = compose_cfg(["~experiment", f"data={data}", "data.root=/x"])
    assert cfg.data.name == data
    assert OmegaConf.to_container(cfg.data, resolve=True)


@pytest.mark.parametrize("reward", _options("reward"))
def test_every_reward_composes(reward):
    cfg = compose_cfg([f"reward={reward}"])
    assert cfg.reward.name == reward


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}", "data.root=/x"])
    assert cfg.experiment_name == experiment


def test_default_is_the_demo():
    cfg = compose_cfg()
    assert (cfg.stage.name, cfg.model.name, cfg.data.name, cfg.experiment_name) == ("pipeline", "tiny", "demo", "demo")


def test_misspelt_key_fails_at_compose_time():
    with pytest.raises(HydraCompositionError, match="roott"):
        compose_cfg(["data.roott=x"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(HydraCompositionError, match="max_steps"):
        compose_cfg(["sft.max_steps=ten"])


def test_missing_data_root_is_named(tmp_path):
    from flare_exp.checks import validate

    cfg = compose_cfg(["experiment=flare", "stage=prepare"])
    with pytest.raises(ValueError, match="data.root"):
        validate(cfg)


def test_demo_experiment_refuses_real_model():
    from flare_exp.checks import validate

    cfg = compose_cfg(["model=qwen3vl_4b"])
    with pytest.raises(ValueError, match="experiment=flare"):
        validate(cfg)


def test_unknown_backend_rejected():
    from flare_exp.checks import validate

    with pytest.raises(ValueError, match="backend"):
        validate(compose_cfg(["model.backend=vllm"]))


@pytest.mark.parametrize("key", ["model.vision_encoder", "model.decode_attention", "model.lora.input_cast"])
def test_unknown_model_setting_rejected_at_startup(key):
    """Before a pipeline's first step runs, not when a later step loads the model."""
    from flare_exp.checks import validate

    with pytest.raises(ValueError, match=f"{key}='fast': choose "):
        validate(compose_cfg([f"{key}=fast"]))


@pytest.mark.parametrize("setting", ["rl.decode_loop=fast", "infer.decode_loop=fast", "rl.num_generations=1",
                                     "sft.on_too_long=truncate", "rl.decode_loop=graph rl.use_vllm=true"])
def test_stage_settings_stop_a_pipeline_before_its_first_step(setting, base_overrides, tmp_path, monkeypatch):
    """A bad rl.* or infer.* value must not wait for hours of sft to surface."""
    from flare_exp.run import stage as stages
    from flare_exp.main import run

    ran = []
    for step in ("sft", "rl", "infer"):
        monkeypatch.setattr(stages.get_runner(step), "run", lambda cfg, out, step=step: ran.append(step))
    key = setting.split("=")[0]
    with pytest.raises(ValueError, match=key):
        run(compose_cfg([*base_overrides, "stage=pipeline", "stage.steps=[sft,rl,infer]", *setting.split()]),
            run_dir=tmp_path / "pipeline")
    assert ran == []


@pytest.mark.parametrize("overrides", [
    ["stage=prepare"],
    ["stage=sft", "run_name=sft-r16", "model.backend=unsloth", "sft.early_stopping_patience=5"],
    ["stage=rl", "run_name=rl-flare", "rl.init_from=outputs/runs/sft-r16", "reward=flare"],
    ["stage=infer", "infer.checkpoint=outputs/runs/rl-flare", "infer.batch_size=32"],
    ["stage=eval", "eval.green.model_path=/m/GREEN", "eval.predictions=[a,b]"],
    ["stage=rl", "reward.report_generation.weights.radgraph=0.5", "reward=seed"],
])
def test_readme_commands_compose(overrides, monkeypatch):
    import torch

    from flare_exp.checks import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the README's commands run on a GPU node
    cfg = compose_cfg(["experiment=flare", "data.root=/data/FLARE_Task5", *overrides])
    validate(cfg)
    assert OmegaConf.to_container(cfg, resolve=True)


def test_sweep_launchers_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.gpus_per_node == 1


def test_compiled_kernels_are_cached_beside_the_other_caches(tmp_path, monkeypatch):
    import os

    from flare_exp.main import run

    for var in ("TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION"):
        monkeypatch.setenv(var, "placeholder")  # so that teardown restores the original
        monkeypatch.delenv(var)
    run(compose_cfg(["stage=prepare", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"paths.output_root={tmp_path / 'out'}"]), run_dir=tmp_path / "out" / "prepare")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torch_compile")
    assert os.environ["UNSLOTH_COMPILE_LOCATION"] == str(tmp_path / "cache" / "unsloth_compiled_cache")


def test_one_process_per_job(monkeypatch, caplog):
    import torch

    from flare_exp.checks import check_one_process_per_job

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2: prepare run\\(s\\) one process per job; only eval, infer, rl, "
                                         "sft \\(and stage=pipeline"):
        check_one_process_per_job(steps={"prepare", "rl", "infer"})
    check_one_process_per_job(steps={"prepare", "sft", "rl", "infer", "eval"}, in_pipeline=True)
    with pytest.raises(ValueError, match="model.backend=unsloth is not supported on several ranks"):
        check_one_process_per_job(steps={"sft"}, backend="unsloth")
    check_one_process_per_job(steps={"sft"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_one_process_per_job()
    assert "sees 4 GPUs but uses one" in caplog.text


def test_entry_point_imports_no_ml_library_before_the_backend():
    """Unsloth must be imported before transformers/peft/trl to patch them (checks.preload_backend does it
    first thing in run()): importing the entry point and composing a config must not import them."""
    import subprocess
    import sys

    code = ("import sys, launch, flare_exp.main\n"
            "from conftest import compose_cfg\n"
            "compose_cfg(['stage=sft', 'model.backend=unsloth'])\n"
            "print(sorted(m for m in ('transformers', 'peft', 'trl', 'unsloth') if m in sys.modules))")
    tests = CONF.parent / "tests"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CONF.parent,
                         env={**__import__("os").environ, "PYTHONPATH": f"{CONF.parent}:{tests}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_half_precision_training_without_a_gpu_is_refused_at_startup(tmp_path):
    import torch

    from flare_exp.checks import validate

    cfg = compose_cfg(["stage=sft", "model.dtype=bfloat16"])
    if torch.cuda.is_available():
        validate(cfg)
        return
    with pytest.raises(ValueError, match="model.dtype=bfloat16: .* pass model.dtype=float32"):
        validate(cfg)
    validate(compose_cfg(["stage=infer", "model.dtype=bfloat16"]))  # inference in bf16 on a CPU is allowed


def test_plus_cannot_add_a_key_the_schema_lacks():
    from flare_exp.checks import validate

    cfg = compose_cfg(["+sft.learning_rat=1e-4", "+model.lora.rr=8"])
    with pytest.raises(ValueError, match=r"sft.learning_rat \(did you mean sft.learning_rate\?\).*") as e:
        validate(cfg)
    assert "model.lora.rr (did you mean model.lora.r?)" in str(e.value)
    validate(compose_cfg(["+reward.regression.weights.rouge_l=0.1"]))  # dict fields take new keys


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_non_finite_reward_weights_stop_at_startup(weight):
    from flare_exp.checks import validate

    with pytest.raises(ValueError, match=f"reward.regression.weights.numeric={weight}.*finite"):
        validate(compose_cfg([f"reward.regression.weights.numeric={weight}"]))


def test_negative_reward_weight_is_allowed_and_said(caplog):
    from flare_exp.checks import validate

    validate(compose_cfg(["reward.regression.weights.numeric=-0.5"]))
    assert "reward.regression.weights.numeric=-0.5 is negative" in caplog.text


def test_written_files_honour_the_umask(tmp_path):
    import os

    from flare_exp.io import write_json, write_jsonl

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        write_jsonl(tmp_path / "b.jsonl", [{}])
        assert {oct(os.stat(tmp_path / n).st_mode & 0o777) for n in ("a.json", "b.jsonl")} == {"0o644"}
        os.umask(0o077)
        write_json(tmp_path / "c.json", {})
        assert os.stat(tmp_path / "c.json").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_first_real_run_hears_every_problem_at_once(tmp_path):
    """Unset data.root, half precision on a CPU, no model files, nothing prepared: one message with all of them,
    before any work."""
    import torch

    from flare_exp.main import run

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only dtype error")
    cfg = compose_cfg(["experiment=flare", "stage=sft", "model=qwen3vl_4b", "data=flare_xray",
                       f"model.path={tmp_path / 'Qwen3-VL-4B-Instruct'}", "model.dtype=bfloat16",
                       f"paths.output_root={tmp_path / 'out'}"])
    with pytest.raises(ValueError) as e:
        run(cfg, run_dir=tmp_path / "run")
    message = str(e.value)
    assert message.startswith("5 problems with the settings; nothing was run:")
    assert "data.root" in message and "model.dtype=bfloat16" in message and "model.path=" in message
    assert "sft.train_file=" in message and "stage=prepare writes it" in message
    assert not (tmp_path / "run").exists()


def test_liger_kernels_are_refused_where_they_cannot_run(tiny_model_dir):
    import torch

    from flare_exp.checks import validate
    from flare_exp.models.loading import load_model

    with pytest.raises(ValueError, match="model.liger_kernel=true is for model.backend=hf"):
        validate(compose_cfg(["model.backend=unsloth", "model.liger_kernel=true"]))
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="model.liger_kernel=true: .* GPU only"):
        load_model(compose_cfg(["model.liger_kernel=true", f"model.path={tiny_model_dir}"]).model)
    for steps in ("[prepare,sft]", "[rl]"):  # before prepare runs or a model loads
        with pytest.raises(ValueError, match="model.liger_kernel=true: .* GPU only"):
            validate(compose_cfg(["stage=pipeline", f"stage.steps={steps}", "model.liger_kernel=true"]))
    validate(compose_cfg(["stage=infer", "model.liger_kernel=true"]))  # inference loads without them


def test_inference_loads_without_liger_and_says_so(tiny_model_dir, caplog):
    """Liger's kernels are training kernels: in the compiled decode loop they ran infer at 0.39x, so a model
    loaded for inference leaves them out, on any machine, and the log says so."""
    from flare_exp.models.loading import load_model

    with caplog.at_level("INFO", logger="flare_exp.models.loading"):
        loaded = load_model(compose_cfg(["model.liger_kernel=true", f"model.path={tiny_model_dir}"]).model,
                            training=False)
    assert loaded.model is not None
    assert "inference decodes without them" in caplog.text


def test_an_infer_run_with_liger_set_says_it_ran_without(base_overrides, tmp_path):
    from flare_exp.main import run

    summary = run(compose_cfg(["stage=infer", *base_overrides, "infer.max_new_tokens=2", "infer.num_samples=2",
                               "model.liger_kernel=true"]), run_dir=tmp_path / "inf")
    assert summary["liger_kernel"] == "off: training kernels"


@pytest.mark.parametrize("experiment", ["flare", "reward_search"])
def test_named_experiments_compose(experiment, monkeypatch):
    import torch

    from flare_exp.checks import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(compose_cfg([f"experiment={experiment}", "data.root=/data/FLARE_Task5", "rl.init_from=/runs/sft"]))


def test_help_lists_every_stage_group_launcher_and_sweeper():
    import subprocess
    import sys

    from flare_exp.run.stage import declared_stages as RUNNERS

    out = subprocess.run([sys.executable, "launch.py", "--help"], cwd=CONF.parent, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for stage in RUNNERS():
        assert any(line.startswith(f"  {stage} ") for line in lines), stage
    for group in ("data", "experiment", "model", "reward", "stage"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in lines
    launchers = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
    assert f"hydra/launcher: {', '.join(launchers)} (with -m)" in lines
    assert any(line.startswith("hydra/sweeper:") and "optuna" in line for line in lines)
    assert "python launch.py" in out.stdout and "README.md" in out.stdout


def test_the_group_table_in_the_docs_lists_every_option_conf_has():
    """docs/configuration.md's table of config groups lacked stage=runs and hydra/launcher=watched (the default
    launcher of -m): every option of conf/'s groups is in its group's row."""
    import re

    text = (CONF.parent / "docs" / "configuration.md").read_text()
    rows = {m.group(1): set(re.findall(r"`([^`]+)`", m.group(2)))
            for m in re.finditer(r"^\| `([^`]+)` \| ([^|]+) \|", text, re.M)}
    for group in ("data", "experiment", "model", "reward", "stage", "hydra/launcher", "hydra/sweeper"):
        assert set(_options(group)) <= rows[group], (group, set(_options(group)) - rows[group])


def test_a_load_without_liger_builds_transformers_code_again(tiny_model_dir, monkeypatch):
    """liger-kernel patches modeling_qwen3_vl's names for the whole process (its RMSNorm class, the rotary
    function): a later load without Liger in the same process (a pipeline's rl and infer after its sft) builds
    transformers' own again."""
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3_vl

    from flare_exp.models import liger
    from flare_exp.models.loading import load_model

    norm_class, rope = qwen3_vl.Qwen3VLTextRMSNorm, qwen3_vl.apply_rotary_pos_emb
    monkeypatch.setattr(liger, "_ORIGINALS", {})
    for name in ("Qwen3VLTextRMSNorm", "apply_rotary_pos_emb"):
        monkeypatch.setattr(qwen3_vl, name, getattr(qwen3_vl, name))  # put back after the test, whatever happens
    liger.remember_transformers_code()  # what use_liger_kernels does before liger-kernel patches, as it patches:
    qwen3_vl.Qwen3VLTextRMSNorm = type("LigerRMSNorm", (norm_class,), {})
    qwen3_vl.apply_rotary_pos_emb = lambda *args, **kwargs: rope(*args, **kwargs)
    model = load_model(compose_cfg(["stage=infer", f"model.path={tiny_model_dir}"]).model, training=False).model
    assert not [m for m in model.modules() if type(m).__name__ == "LigerRMSNorm"]
    assert qwen3_vl.Qwen3VLTextRMSNorm is norm_class and qwen3_vl.apply_rotary_pos_emb is rope


def _documented_defaults():
    """(key, default as written) of docs/configuration.md's "Keys people change" table, for every default that is
    a plain value (a number, true/false, null/none, one word); described ones ("base model", "$FLARE_EXP_...")
    are left to the reader. Parentheses are remarks ("1.0 (flare)" is 1.0)."""
    import re

    text = (CONF.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text.split("## Keys people change", 1)[1].split("\n## ", 1)[0]
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        default = cells[1]
        while re.search(r"\([^()]*\)", default):
            default = re.sub(r"\s*\([^()]*\)", "", default)
        values = [v.strip().strip("`") for v in default.split(";")[0].split(" / " if " / " in cells[0] else ", ")]
        for key, value in zip(keys, values) if len(keys) == len(values) else ():
            yield (keys[0].rsplit(".", 1)[0] + key if key.startswith(".") else key), value


def test_the_documented_defaults_of_the_keys_people_change_are_the_configs():
    """docs/configuration.md gave reward.report_generation.weights.radgraph as 1.0 while conf/reward/flare.yaml
    says 0.6: each plain default in that table is the one `experiment=flare` composes to."""
    import re

    cfg = compose_cfg(["experiment=flare", "stage=sft"])
    checked, wrong = 0, []
    for key, value in _documented_defaults():
        if not re.fullmatch(r"[\w.+-]+", value):
            continue  # described, not a value
        expected = {"true": True, "false": False, "null": None, "none": None}.get(value, value)
        if isinstance(expected, str) and re.fullmatch(r"-?[\d.]+(e-?\d+)?", expected):
            expected = float(expected)
        actual = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        checked += 1
        if actual != expected:
            wrong.append(f"{key}: documented {value}, configured {actual!r}")
    assert checked >= 30 and not wrong, wrong


def test_every_environment_variable_the_code_reads_is_documented():
    """FLARE_EXP_CARD_GIB (the memory the card-sized settings see) was read by flare_exp/card.py and named in no
    doc: each FLARE_EXP_* variable of the package or conf/ appears in README.md or docs/."""
    import re

    repo = CONF.parent
    sources = [*(repo / "flare_exp").rglob("*.py"), *CONF.rglob("*.yaml")]
    read = {name for path in sources for name in re.findall(r"FLARE_EXP_[A-Z_]+", path.read_text(encoding="utf-8"))}
    docs = "".join(path.read_text(encoding="utf-8") for path in [repo / "README.md", *(repo / "docs").glob("*.md")])
    assert "FLARE_EXP_CARD_GIB" in read
    assert not [name for name in sorted(read) if name not in docs]
