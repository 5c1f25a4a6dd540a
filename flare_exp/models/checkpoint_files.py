"""What a model folder copied to an offline cluster must hold, checked before any work: a readable config.json, a
tokenizer and weights (an interrupted copy otherwise reads as a library problem: "install sentencepiece",
"Unrecognized processing class", a JSONDecodeError traceback), and for model.path a vision-language model."""
from __future__ import annotations

import json
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(key: str, path: Path) -> dict:
    """config.json of the folder ``key`` names, as a dict; a ValueError naming the key when it is not one."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{key}={path}: config.json is not UTF-8 text: an incomplete or damaged copy? Copy the "
                         "model's folder again") from None
    except ValueError as e:
        raise ValueError(f"{key}={path}: config.json is not valid JSON ({e}): an incomplete or hand-edited copy? "
                         "Copy the model's folder again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{key}={path}: config.json holds no settings object: copy the model's folder again")
    return config


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", *PROCESSOR_FILES, "generation_config.json",
              "chat_template.json", "adapter_config.json")


def torn_side_file(path: Path) -> str | None:
    """Which of the side files a model or adapter folder may hold (its JSON settings, its chat template) is torn
    (a copy cut short), and why."""
    for name in SIDE_FILES:
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except ValueError as e:  # UnicodeDecodeError too
                return f"{name} is not valid JSON ({e})"
    if (path / "chat_template.jinja").is_file():  # the chat template transformers renders every prompt with
        import jinja2

        try:
            jinja2.Environment().parse((path / "chat_template.jinja").read_text(encoding="utf-8"))
        except (jinja2.TemplateSyntaxError, UnicodeDecodeError) as e:
            return f"chat_template.jinja is not a whole template ({type(e).__name__}: {e})"
    return None


def shard_names(key: str, path: Path) -> list[str]:
    """The weight files a sharded model's index (model.safetensors.index.json, ...) names; a ValueError naming the
    key for an index that is not one (a torn copy)."""
    names = set()
    for index in [*path.glob("*.safetensors.index.json"), *path.glob("pytorch_model.bin.index.json")]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("no weight_map of tensor -> file")
        except (UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ValueError(f"{key}={path}: {index.name} is not a readable weights index ({e}): an incomplete or "
                             "damaged copy? Copy the model's folder again") from None
        names |= set(weight_map.values())
    return sorted(names)


def safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a whole safetensors file (a copy cut short, a stray text file), from its header alone:
    8 bytes of header length, a JSON header, and data reaching the last tensor's end; None when whole."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"its header says {length} bytes of header, the file holds {size - 8}"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            return f"its header is not a safetensors header ({type(e).__name__})"
    if 8 + length + end > size:
        return f"{size:,} bytes where its tensors need {8 + length + end:,}: cut short"
    return None


def check_model_folder(key: str, path: Path, vision: bool | None = None) -> None:
    """The folder ``key`` names holds a whole model: config.json, tokenizer files, weights (every shard its index
    names); ``vision``: True for a vision-language model (model.path), False for a judge's text model (GREEN),
    None either (CRIMSON's MedGemma is one)."""
    broken = sorted(p.name for p in path.iterdir() if p.is_symlink() and not p.exists())
    if broken:
        raise ValueError(f"{key}={path}: {len(broken)} file(s) are links to nothing, e.g. {broken[0]} (a copied "
                         "hub cache keeps its files in blobs/ beside the snapshot): copy the folder with its links "
                         "resolved (cp -rL, or huggingface-cli download --local-dir)")
    config = read_config(key, path)
    torn = torn_side_file(path)
    if torn:
        raise ValueError(f"{key}={path}: {torn}: an incomplete or damaged copy? Copy the model's folder again")
    missing = [what for what, found in (
        (f"tokenizer files ({' / '.join(TOKENIZER_FILES[:2])})", any((path / f).is_file() for f in TOKENIZER_FILES)),
        ("weights (*.safetensors or pytorch_model*.bin)", any(any(path.glob(p)) for p in WEIGHT_PATTERNS)))
        if not found]
    if missing:
        raise ValueError(f"{key}={path} has config.json but no {' and no '.join(missing)}: an incomplete copy? Copy "
                         "the whole folder the download made")
    missing_shards = [name for name in shard_names(key, path) if not (path / name).is_file()]
    if missing_shards:
        raise ValueError(f"{key}={path}: its weights index names {len(missing_shards)} shard(s) the folder lacks, "
                         f"e.g. {missing_shards[0]}: an incomplete copy? Copy the whole folder the download made")
    if vision:
        _check_vision_model(key, path, config)
    else:
        _check_judge_model(key, path, config, vision)
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{key}={path}: {file.name} is not a whole weights file ({problem}): an interrupted "
                             "copy? Copy the model's folder again")


def image_text_to_text_kinds():
    """The model types transformers loads with AutoModelForImageTextToText (read from its source: importing its
    model registry imports torch)."""
    from flare_exp.package_source import assigned_literal, parsed

    names = assigned_literal(parsed("transformers", "models/auto/modeling_auto.py"),
                             "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
    if not isinstance(names, dict):
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names
    return names


def _check_vision_model(key: str, path: Path, config: dict) -> None:
    """model.path: a vision-language model transformers loads as one, with its image processor's settings."""
    kind = config.get("model_type")
    if "vision_config" not in config:
        raise ValueError(f"{key}={path} holds a {config.get('model_type', 'text')} model without a vision tower "
                         "(no vision_config in its config.json): flare-exp fine-tunes a vision-language model "
                         "(Qwen3-VL-4B-Instruct); point model.path at one")
    if kind not in image_text_to_text_kinds():
        raise ValueError(f"{key}={path} holds a {kind!r} model, which transformers does not load as a "
                         "vision-language model (AutoModelForImageTextToText): point model.path at "
                         "Qwen3-VL-4B-Instruct's folder")
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise ValueError(f"{key}={path} has no image processor settings ({' or '.join(PROCESSOR_FILES)}): an "
                         "incomplete copy? Copy the whole folder the download made")


def _check_judge_model(key: str, path: Path, config: dict, vision: bool | None) -> None:
    """A judge, loaded as a causal LM (CRIMSON's MedGemma is one, a VLM too: ``vision`` None; GREEN's is text
    only: False)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = config.get("model_type")
    if vision is False and "vision_config" in config:
        raise ValueError(f"{key}={path} holds a vision-language model ({kind}), not a judge's text model: point it "
                         "at the judge's own folder")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{key}={path} holds a {kind!r} model, which transformers does not load as a judge's text "
                         "generator (AutoModelForCausalLM): point it at the judge's own folder")


def load_whole(model_class, key: str, path: Path, **kwargs):
    """``model_class.from_pretrained(path)`` that refuses weights which do not fill the model its config.json
    describes: a tensor the files lack (transformers initialises it at random, says so in a table, and the run
    scores a random layer: GREEN 0.0 with no caveat) or one of another shape (its RuntimeError names no key)."""
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise ValueError(f"{key}={path}: its weights' shapes do not match its config.json (transformers' table "
                         "above names them): a config.json of another model size? Copy the model's folder "
                         "again") from None
    layers = sorted(k for k in info.get("unexpected_keys") or [] if ".layers." in k)
    if layers:  # weights of layers config.json does not describe: the model would run without them
        raise ValueError(f"{key}={path}: its weights hold {len(layers)} tensor(s) of layers its config.json does not "
                         f"describe, e.g. {layers[0]}: a config.json of another model size? Copy the model's folder "
                         "again")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{key}={path}: its weights lack {len(missing)} tensor(s) its config.json asks for, e.g. "
                         f"{missing[0]} (loaded, they would be random numbers): an incomplete copy, or a "
                         "config.json of another model? Copy the model's folder again")
    return model
