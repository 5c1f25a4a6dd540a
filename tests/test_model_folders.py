"""A model or judge folder copied half-way to an offline cluster is named by its key before any work: config.json
that is not JSON, no tokenizer, no weights, or a model.path without a vision tower (each read as a library
problem at its load before: "install sentencepiece", "Unrecognized processing class", a JSONDecodeError)."""
import json
import shutil

import pytest

from conftest import compose_cfg


def _folder(tmp_path, name, config, *files):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for file in files:  # whole as far as the checks look: a JSON object, a safetensors file of no tensors
        (folder / file).write_bytes(b"{}" if file.endswith(".json") else (2).to_bytes(8, "little") + b"{}")
    return folder


def test_a_half_copied_or_wrong_model_folder_is_named_by_its_key(tmp_path, tiny_model_dir):
    from flare_exp.models.checkpoint_files import check_model_folder

    check_model_folder("model.path", tiny_model_dir, vision=True)  # a whole Qwen3-VL folder passes
    for folder, said in (
            (_folder(tmp_path, "torn", '{"model_type": "qwen3_vl", "vision'),
             "model.path=.*torn: config.json is not valid JSON .*: an incomplete or hand-edited copy"),
            (_folder(tmp_path, "list", "[1, 2]"), "config.json holds no settings object"),
            (_folder(tmp_path, "bare", {"model_type": "qwen3_vl", "vision_config": {}}),
             r"has config.json but no tokenizer files \(tokenizer.json / tokenizer.model\) and no weights"),
            (_folder(tmp_path, "text", {"model_type": "llama"}, "tokenizer.json", "model.safetensors"),
             "holds a llama model without a vision tower")):
        with pytest.raises(ValueError, match=said):
            check_model_folder("model.path", folder, vision=True)


def test_a_half_copied_judge_is_in_the_one_list_before_any_work(base_overrides, tmp_path, tiny_model_dir):
    from flare_exp.checks import validate

    half = _folder(tmp_path, "green", {"model_type": "llama", "max_position_embeddings": 4096})
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("{broken")
    cfg = compose_cfg(["stage.steps=[infer,eval]", *base_overrides, f"model.path={model}",
                       f"eval.green.model_path={half}"])
    with pytest.raises(ValueError, match="2 problems") as e:
        validate(cfg, inputs=True)
    assert f"eval.green.model_path={half} has config.json but no tokenizer files" in str(e.value)
    assert f"model.path={model}: config.json is not valid JSON" in str(e.value)


def test_a_missing_shard_and_a_vision_model_given_as_the_green_judge_are_named(tmp_path, tiny_model_dir):
    from flare_exp.models.checkpoint_files import check_model_folder

    sharded = _folder(tmp_path, "sharded", {"model_type": "llama"}, "tokenizer.json", "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"eval.green.model_path=.*sharded: its weights index names 1 shard\(s\) the "
                                         r"folder lacks, e.g. model-00002-of-00002.safetensors"):
        check_model_folder("eval.green.model_path", sharded, vision=False)
    with pytest.raises(ValueError, match=r"holds a vision-language model \(qwen3_vl\), not a judge's text model"):
        check_model_folder("eval.green.model_path", tiny_model_dir, vision=False)
    with pytest.raises(ValueError, match="holds a 'qwen3_vl' model, which transformers does not load as a judge's "
                                         "text generator"):  # CRIMSON's MedGemma is a VLM too, but a causal LM's
        check_model_folder("eval.crimson.model_path", tiny_model_dir)


def test_a_cut_short_weights_file_and_a_torn_index_are_named(tmp_path, tiny_model_dir):
    """An interrupted rsync leaves a safetensors file shorter than its header says, or an index cut mid-JSON: both
    are named with the key and the file before any load (safetensors' own error names neither)."""
    from flare_exp.models.checkpoint_files import check_model_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = sorted(model.glob("*.safetensors"))[0]
    whole = weights.read_bytes()
    for cut, said in ((len(whole) - 100, "cut short"), (5, "shorter than a safetensors header"),
                      (40, "its header says .* bytes of header")):
        weights.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=f"model.path=.*model: {weights.name} is not a whole weights file .*{said}"):
            check_model_folder("model.path", model, vision=True)
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")  # an LFS pointer
    with pytest.raises(ValueError, match="is not a whole weights file"):
        check_model_folder("model.path", model, vision=True)
    weights.write_bytes(whole)
    check_model_folder("model.path", model, vision=True)
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model.saf')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a readable weights index"):
        check_model_folder("model.path", model, vision=True)


def test_weights_that_do_not_fill_the_model_are_refused_at_load(tmp_path, tiny_model_dir):
    """A whole but smaller weights file (a tensor dropped), or a config.json of another size: transformers
    initialised the missing tensors at random and the run went on (infer DONE, GREEN 0.0), or raised a
    RuntimeError naming no key. Both are named with the key at load."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from flare_exp.models.checkpoint_files import load_whole

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    weights = sorted(cut.glob("*.safetensors"))[0]
    tensors = load_file(weights)
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.path=.*cut: its weights lack 1 tensor\(s\) its config.json asks "
                                         rf"for, e.g. {dropped}"):
        load_whole(AutoModelForImageTextToText, "model.path", cut)
    wider = tmp_path / "wider"
    shutil.copytree(tiny_model_dir, wider)
    config = json.loads((wider / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (wider / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.path=.*wider: its weights' shapes do not match its config.json"):
        load_whole(AutoModelForImageTextToText, "model.path", wider)
    assert load_whole(AutoModelForImageTextToText, "model.path", tiny_model_dir) is not None


def test_a_torn_tokenizer_or_processor_file_a_missing_processor_and_dangling_links_are_named(tmp_path,
                                                                                              tiny_model_dir):
    """A torn tokenizer.json gave a bare JSONDecodeError naming no file, after the run dir was made; a missing
    processor config transformers' "Can't load image processor" traceback; a link into a hub cache that was not
    copied a FileNotFoundError naming no key."""
    from flare_exp.models.checkpoint_files import check_model_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "processor_config.json"):
        whole = (model / name).read_text()
        (model / name).write_text(whole[: len(whole) // 2])
        with pytest.raises(ValueError, match=f"model.path=.*model: {name} is not valid JSON"):
            check_model_folder("model.path", model, vision=True)
        (model / name).write_text(whole)
    (model / "processor_config.json").rename(tmp_path / "processor_config.json")
    with pytest.raises(ValueError, match="has no image processor settings"):
        check_model_folder("model.path", model, vision=True)
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3", "vision_config": {}}))
    check_model_folder("eval.crimson.model_path", model)  # a judge needs no image processor here
    (model / "processor_config.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(ValueError, match=r"1 file\(s\) are links to nothing, e.g. processor_config.json"):
        check_model_folder("model.path", model, vision=True)


def test_weights_of_layers_the_config_lacks_and_an_adapter_missing_a_tensor_are_refused(tmp_path, tiny_model_dir):
    """A config.json of fewer layers than the weights loaded part of the model (infer DONE, GREEN 0.0); an adapter
    missing a LoRA tensor loaded with peft's UserWarning alone (4 of 64 predictions changed)."""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from flare_exp.models.checkpoint_files import load_whole
    from flare_exp.models.loading import AdapterLoadError, adapter_loaded

    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_model_dir, fewer)
    config = json.loads((fewer / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] -= 1
    (fewer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.path=.*fewer: its weights hold \d+ tensor\(s\) of layers its "
                                         r"config.json does not describe"):
        load_whole(AutoModelForImageTextToText, "model.path", fewer)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError, match="lacks weights its adapter_config.json names"):
        adapter_loaded(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), tmp_path / "adapter", False)


def test_a_vision_config_of_a_type_transformers_cannot_load_and_a_torn_adapter_file_are_named(tmp_path,
                                                                                              tiny_model_dir):
    """A model type transformers does not load as a VLM gave its list of ~80 config classes naming no key; a torn
    JSON file in an adapter dir the loader's JSONDecodeError naming no file."""
    import json

    from flare_exp.models.checkpoint_files import check_model_folder, torn_side_file

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model.path=.*odd holds a 'llama' model, which transformers does not load "
                                         r"as a vision-language model"):
        check_model_folder("model.path", odd, vision=True)
    (odd / "generation_config.json").write_text('{"do_sample": ')
    assert torn_side_file(odd).startswith("generation_config.json is not valid JSON")
    (odd / "generation_config.json").write_text("{}")
    (odd / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'")  # cut short
    assert torn_side_file(odd).startswith("chat_template.jinja is not a whole template (TemplateSyntaxError")


def test_another_judge_given_as_crimson_is_named(tmp_path):
    """GREEN's judge (no chat template of its own) as eval.crimson.model_path failed on apply_chat_template naming
    no key."""
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm
    from flare_exp.metrics.crimson_judge import CrimsonJudge

    green = build_tiny_causal_lm(tmp_path / "green")
    with pytest.raises(ValueError, match=r"eval.crimson.model_path=.*green: its tokenizer has no chat template"):
        CrimsonJudge.from_pretrained(green, device="cpu")
