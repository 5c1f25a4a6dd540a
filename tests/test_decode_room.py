"""infer.max_new_tokens past the model's context stops after the load, before any decoding, naming the key, its
value, the model's limit and the config.json key it comes from (a tiny model that never ends would run forever)."""
from types import SimpleNamespace

import pytest

from conftest import compose_cfg


def test_the_models_limit_is_read_where_its_config_keeps_it():
    from flare_exp.models.batch_decoding import max_positions

    nested = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=4096))  # Qwen3-VL
    assert max_positions(nested) == (4096, "text_config.max_position_embeddings")
    assert max_positions(SimpleNamespace(max_position_embeddings=2048)) == (2048, "max_position_embeddings")
    assert max_positions(SimpleNamespace(text_config=SimpleNamespace())) is None  # no check
    assert max_positions(None) is None


def test_a_prompt_and_max_new_tokens_past_the_limit_say_what_to_pass():
    from flare_exp.models.batch_decoding import check_room

    config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=4096))
    check_room(config, 4096 - 100, 100)  # fits exactly
    with pytest.raises(ValueError) as e:
        check_room(config, 1000, 100000000)
    assert str(e.value) == (
        "infer.max_new_tokens=100000000 does not fit the model's context: 4096 positions (text_config."
        "max_position_embeddings in its config.json), which the longest prompt of this batch (1000 tokens) and "
        "the new tokens share; pass infer.max_new_tokens=3096 or less")
    with pytest.raises(ValueError, match=r"infer.max_new_tokens=5000 does not fit the model's context: 4096 "
                                         r"positions .*; pass a smaller infer.max_new_tokens: at most 4096 "
                                         r"less the prompt's tokens"):
        check_room(config, 0, 5000)  # before any prompt: max_new_tokens alone


def test_infer_stops_after_the_load_before_decoding(base_overrides, tmp_path):
    from flare_exp.main import run

    cfg = compose_cfg(["stage=infer", *base_overrides, "infer.num_samples=2", "infer.max_new_tokens=100000000"])
    with pytest.raises(ValueError, match=r"infer.max_new_tokens=100000000 does not fit .* 4096 positions "
                                         r"\(text_config.max_position_embeddings in its config.json\)"):
        run(cfg, run_dir=tmp_path / "run")
    cfg = compose_cfg(["stage=infer", *base_overrides, "infer.num_samples=2", "infer.max_new_tokens=4090",
                       "run_name=prompt"])
    with pytest.raises(ValueError, match=r"infer.max_new_tokens=4090 .* the longest prompt of this batch \(\d+ "
                                         r"tokens\)"):
        run(cfg, run_dir=tmp_path / "prompt")


def test_an_in_training_evals_own_token_budget_is_named_by_its_own_key(base_overrides, tmp_path):
    """sft.eval_max_new_tokens (rl's likewise) past the model's context: the in-training eval's error names that
    key, not infer.max_new_tokens, which the user did not set."""
    from flare_exp.data.vision import VisionChat
    from flare_exp.models.loading import load_model
    from flare_exp.rl_monitor.heldout import HeldOutEval
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.eval_per_task=1", "sft.eval_max_new_tokens=100000000"])
    loaded = load_model(cfg.model, training=False)
    heldout = HeldOutEval(cfg, "sft", tmp_path, None, VisionChat(loaded.processor, abspath(cfg.data.root)),
                          source_key="val_file")
    with pytest.raises(ValueError, match=r"^sft\.eval_max_new_tokens=100000000 does not fit the model's context"):
        heldout.run(loaded.model, 1)


def test_a_pipeline_names_a_budget_past_the_context_and_a_gpu_it_lacks_before_its_first_step(base_overrides):
    """infer.max_new_tokens / rl.eval_max_new_tokens past model.path's context, and infer.image_device naming a GPU
    the job's process lacks, stopped a pipeline at infer after sft and GRPO had trained: now before any step."""
    import torch

    from flare_exp.checks import validate

    cfg = compose_cfg(["stage.steps=[sft,rl,infer]", *base_overrides, "infer.max_new_tokens=5000",
                       "rl.eval_steps=2", "rl.eval_max_new_tokens=9000", "sft.eval_per_task=0",
                       f"infer.image_device=cuda:{torch.cuda.device_count()}"])
    with pytest.raises(ValueError, match="3 problems with the settings") as e:
        validate(cfg, inputs=True)
    for said in ("infer.max_new_tokens=5000 does not fit the model's context: 4096 positions",
                 "rl.eval_max_new_tokens=9000 does not fit", f"infer.image_device=cuda:{torch.cuda.device_count()}: "
                 "this process sees"):
        assert said in str(e.value), said
    validate(compose_cfg(["stage.steps=[sft,rl,infer]", *base_overrides, "infer.max_new_tokens=64"]), inputs=True)


def test_total_lengths_past_a_models_context_are_named_before_any_step(base_overrides, tmp_path):
    """eval.green.max_length past the GREEN judge's context and eval.crimson.max_new_tokens past CRIMSON's: said
    with the limit and where it comes from, before any work."""
    import json

    from flare_exp.checks import validate

    judges = {}
    for name, limit in (("green", 2048), ("crimson", 8192)):
        judges[name] = tmp_path / name
        judges[name].mkdir()
        (judges[name] / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": limit}))
        (judges[name] / "tokenizer.json").write_text("{}")  # a whole folder, as far as the checks look: the
        (judges[name] / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # weights file of none
    cfg = compose_cfg(["stage.steps=[sft,rl,infer,eval]", *base_overrides, "sft.eval_per_task=0", f"eval.green.model_path={judges['green']}", "eval.green.max_length=4096",
                       f"eval.crimson.model_path={judges['crimson']}", "eval.crimson.max_new_tokens=9000"])
    with pytest.raises(ValueError, match="2 problems with the settings") as e:
        validate(cfg, inputs=True)
    for said in ("eval.green.max_length=4096 is past the GREEN judge's context: 2048 positions "
                 f"(max_position_embeddings in {judges['green'] / 'config.json'}); pass eval.green.max_length=2048",
                 "eval.crimson.max_new_tokens=9000 does not fit the model's context: 8192 positions"):
        assert said in str(e.value), said
    validate(compose_cfg(["stage.steps=[sft,rl,infer,eval]", *base_overrides, "sft.eval_per_task=0", f"eval.green.model_path={judges['green']}"]), inputs=True)
