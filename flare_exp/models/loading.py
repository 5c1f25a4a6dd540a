"""The model layer used by sft, rl, infer and eval: one interface, two backends.

``model.backend=hf``: transformers + PEFT, on CPU or GPU. ``model.backend=unsloth``: Unsloth's
FastVisionModel, GPU only; ``unsloth`` is imported only here, only when that backend is chosen.
Both apply the same LoRA switches and the same image token budget (min_pixels / max_pixels).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flare_exp.models.checkpoints import read_meta, resolve_adapter
from flare_exp.models import fused_prefill, grouped_attention, lora_casts, vision_encoder
from flare_exp.runtime import abspath, check_choice, inside_cache

log = logging.getLogger(__name__)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "attn.qkv", "attn.proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    base_path: Path
    adapter: Path | None
    backend: str


def check_model_path(model_cfg) -> None:
    """model.path holds a model (or model.build_tiny will build one there: only in the cache)."""
    from flare_exp.models.checkpoint_files import check_model_folder

    path = abspath(model_cfg.path)
    if (path / "config.json").exists():
        return check_model_folder("model.path", path, vision=True)
    if builds_tiny_at(model_cfg, path):
        return
    if model_cfg.build_tiny:
        raise FileNotFoundError(
            f"model.path={path} holds no model (no config.json), and model={model_cfg.name} builds its tiny random "
            f"model only under paths.cache_dir (a folder you name is never written into): leave model.path unset, "
            f"or point it at a folder holding a Qwen3-VL checkpoint")
    import os

    unset = ("" if os.environ.get("FLARE_EXP_MODELS") or not str(model_cfg.path).startswith("models/") else
             " FLARE_EXP_MODELS is not set, so model.path is under ./models: export FLARE_EXP_MODELS=the folder "
             "that holds the model's folder (as the README's real run does), or pass model.path.")
    raise FileNotFoundError(
        f"model.path={path} holds no model (no config.json).{unset} {model_cfg.download_hint or ''}".strip())


def builds_tiny_at(model_cfg, path: Path) -> bool:
    """model.build_tiny builds the tiny random model on demand, but only into the cache (paths.cache_dir, where
    model=tiny's default path lies): a path the user names elsewhere is never written into."""
    from omegaconf import OmegaConf

    if not model_cfg.build_tiny or not OmegaConf.is_config(model_cfg):
        return False
    return inside_cache(model_cfg._get_root(), path)


def resolve_model_path(model_cfg) -> Path:
    path = abspath(model_cfg.path)
    if not (path / "config.json").exists() and builds_tiny_at(model_cfg, path):
        from flare_exp.fixtures.tiny_models import build_tiny_qwen3vl

        log.info("model=%s: building the tiny random Qwen3-VL at %s", model_cfg.name, path)
        build_tiny_qwen3vl(path, min_pixels=model_cfg.min_pixels or 32 * 32,
                           max_pixels=model_cfg.max_pixels or 128 * 128)
    check_model_path(model_cfg)
    return path


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"model.dtype={name!r}: choose auto, bfloat16, float16 or float32") from None


def apply_pixel_budget(processor, model_cfg) -> None:
    """The same image token budget in every stage: it decides how many image tokens a sample costs."""
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if model_cfg.min_pixels is not None:
        size["shortest_edge"] = ip.min_pixels = int(model_cfg.min_pixels)
    if model_cfg.max_pixels is not None:
        size["longest_edge"] = ip.max_pixels = int(model_cfg.max_pixels)
    if size:
        ip.size = size


def lora_target_modules(model, lora_cfg) -> list[str]:
    """Full names of the Linear layers the LoRA switches select (vision/language x attention/MLP)."""
    import torch

    if lora_cfg.target_modules != "all-linear":
        return list(lora_cfg.target_modules)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        is_vision = ".visual." in f".{name}."
        if (is_vision and not lora_cfg.finetune_vision_layers) or (
                not is_vision and not lora_cfg.finetune_language_layers):
            continue
        is_attention = any(k in name for k in _ATTENTION)
        is_mlp = any(k in name for k in _MLP)
        if (is_attention and lora_cfg.finetune_attention_modules) or (is_mlp and lora_cfg.finetune_mlp_modules):
            names.append(name)
    if not names:
        raise ValueError("the LoRA switches (model.lora.finetune_*) select no layer to train")
    return names


def _adapter_and_base(model_cfg, init_from: str | None) -> tuple[Path | None, Path]:
    if init_from is None:
        return None, resolve_model_path(model_cfg)
    adapter = resolve_adapter(abspath(init_from))
    recorded = read_meta(adapter).get("base_model_path")
    base = resolve_model_path(model_cfg)
    if recorded and Path(recorded).resolve() != base.resolve():
        log.warning("adapter %s was trained on %s; loading it on model.path=%s", adapter, recorded, base)
    return adapter, base


def check_model_settings(model_cfg) -> None:
    """The model.* names, checked before minutes of loading (and by checks.validate at startup)."""
    check_choice("model.backend", model_cfg.backend, ("hf", "unsloth"))
    check_choice("model.vision_encoder", model_cfg.vision_encoder, vision_encoder.SETTINGS)
    check_choice("model.decode_attention", model_cfg.decode_attention, grouped_attention.SETTINGS)
    check_choice("model.lora.input_cast", model_cfg.lora.input_cast, lora_casts.SETTINGS)
    if model_cfg.liger_kernel and model_cfg.backend != "hf":
        raise ValueError("model.liger_kernel=true is for model.backend=hf (Unsloth patches in its own kernels)")


def load_model(model_cfg, init_from: str | None = None, training: bool = True, seed: int = 0,
               merge_adapter: bool = False) -> LoadedModel:
    """Load base model + processor, then either a fresh LoRA (training, no init_from) or the saved adapter.
    merge_adapter (inference, backend=hf): fold the adapter into the base weights."""
    import torch

    check_model_settings(model_cfg)
    torch.backends.cuda.enable_cudnn_sdp(model_cfg.cudnn_attention)  # process-wide: every stage loads here
    if model_cfg.backend == "unsloth":
        loaded = _load_unsloth(model_cfg, init_from, training, seed)
    else:
        loaded = _load_hf(model_cfg, init_from, training, merge_adapter and not training)
    vision_encoder.use_batched_vision_encoder(loaded.model, model_cfg.vision_encoder)
    if loaded.backend == "hf":  # Unsloth patches attention and LoRA its own way; untried there, so left to it
        grouped_attention.use_decode_attention(loaded.model, model_cfg.decode_attention)
        fused_prefill.use_fused_prefill(loaded.model, model_cfg.fused_prefill)
        lora_casts.use_lora_input_cast(loaded.model, model_cfg.lora.input_cast)
    elif model_cfg.fused_prefill:  # the default: said only where asked for
        log.debug("model.fused_prefill=true is for model.backend=hf: Unsloth's own forwards run")
    return loaded


def _load_hf(model_cfg, init_from, training, merge_adapter=False) -> LoadedModel:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from flare_exp.models.checkpoint_files import load_whole

    adapter, base = _adapter_and_base(model_cfg, init_from)
    processor = AutoProcessor.from_pretrained(adapter or base)
    apply_pixel_budget(processor, model_cfg)
    if not (model_cfg.liger_kernel and training):  # an earlier load in this process may have patched it in
        from flare_exp.models.liger import restore_transformers_code

        restore_transformers_code()
    model = load_whole(AutoModelForImageTextToText, "model.path", base, dtype=torch_dtype(model_cfg.dtype),
                       attn_implementation=model_cfg.attn_implementation)
    if model_cfg.liger_kernel and training:
        from flare_exp.models.liger import use_liger_kernels

        use_liger_kernels(model)
    elif model_cfg.liger_kernel:  # its Triton kernels break the compiled decode step's graph: 2.6x slower
        log.info("model.liger_kernel=true: Liger's kernels are for training; inference decodes without them "
                 "(the same outputs up to rounding; with them infer ran at 0.39x, docs/performance.md)")
    if adapter is not None:
        model = adapter_loaded(model, adapter, training)
        if merge_adapter:  # an unmerged LoRA adds two small matmuls per projection to every decode step
            model = model.merge_and_unload()
    elif training:
        lora = model_cfg.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
            target_modules=lora_target_modules(model, lora), modules_to_save=list(lora.modules_to_save) or None,
            task_type="CAUSAL_LM"))
    if training and model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not training:
        # The Trainer places training models itself; inference must not silently stay on the CPU.
        import torch

        if torch.cuda.is_available():  # this rank's GPU in a data-parallel job (torchrun sets LOCAL_RANK)
            model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}")
        model.eval()
    return LoadedModel(model, processor, base, adapter, "hf")


PRECISIONS = ("eager", "fused")


def compile_repeated_blocks(model, backend: str = "inductor", precision: str = "eager") -> int:
    """torch.compile every gradient-checkpointing block (decoder layers, vision blocks) in place: one
    compiled graph serves all blocks of a class (their weights are graph inputs), the checkpointing wrapper
    around each stays eager. precision=eager: inductor rounds to the low precision wherever eager does
    (sft.compile_precision). Returns how many blocks were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from flare_exp.compile_cache import compiled_in_training_only

    options = {"emulate_precision_casts": precision == "eager"} if backend == "inductor" else None
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        block.compile(backend=backend, options=options)
        compiled_in_training_only(block)  # evaluation runs them eagerly instead of recompiling per block
    return len(blocks)


def require_unsloth():
    """Import Unsloth (only for backend=unsloth: the hf backend never pays for it), with clear errors."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("model.backend=unsloth needs a CUDA GPU (Unsloth's vision loaders are GPU-only); "
                         "use model.backend=hf on this machine.")
    try:
        import unsloth
    except ImportError as e:
        raise ImportError("model.backend=unsloth but Unsloth is not installed: pip install -r "
                          "env/requirements-gpu.txt (offline nodes: see README 'GPU install')") from e
    return unsloth


def _load_unsloth(model_cfg, init_from, training, seed) -> LoadedModel:
    FastVisionModel = require_unsloth().FastVisionModel
    adapter, base = _adapter_and_base(model_cfg, init_from)
    # "unsloth" checkpointing also offloads the saved activations to CPU memory (least GPU memory); True is
    # plain recomputation, which skips the copies when the card has room.
    checkpointing = (("unsloth" if model_cfg.unsloth_offload_activations else True)
                     if model_cfg.gradient_checkpointing else False)
    kwargs = dict(dtype=torch_dtype(model_cfg.dtype), load_in_4bit=False, max_seq_length=model_cfg.max_seq_length,
                  use_gradient_checkpointing=checkpointing, local_files_only=True)
    model, processor = FastVisionModel.from_pretrained(str(base), **kwargs)
    apply_pixel_budget(processor, model_cfg)
    lora = model_cfg.lora
    if adapter is not None:
        model = adapter_loaded(model, adapter, training)
    elif training:
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=lora.finetune_vision_layers,
            finetune_language_layers=lora.finetune_language_layers,
            finetune_attention_modules=lora.finetune_attention_modules,
            finetune_mlp_modules=lora.finetune_mlp_modules,
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", random_state=seed,
            target_modules="all-linear" if lora.target_modules == "all-linear" else list(lora.target_modules),
            modules_to_save=list(lora.modules_to_save) or None,
            use_gradient_checkpointing=checkpointing)
    if training:
        FastVisionModel.for_training(model)
    else:
        FastVisionModel.for_inference(model)
    return LoadedModel(model, processor, base, adapter, "unsloth")


class AdapterLoadError(ValueError):
    """An adapter that cannot be loaded onto the model: bad input, said in one line."""


def adapter_loaded(model, adapter, training: bool):
    """The model with the LoRA adapter at ``adapter``; weights that cannot be read (cut short by a copy, damaged)
    or that do not fit the model are one line naming the adapter, not the loader's traceback."""
    import warnings

    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model, adapter, is_trainable=training)
    except Exception as e:  # noqa: BLE001  (safetensors' and torch's own errors for a bad file, a shape mismatch)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise AdapterLoadError(f"the LoRA adapter in {adapter} cannot be loaded ({type(e).__name__}: {first}): its "
                           "weights are cut short or damaged (copy them again) or were trained for another base "
                           "model or LoRA settings (model.path, model.lora.*)") from e
    for warning in said:
        if "missing adapter keys" in str(warning.message):  # peft warns and leaves those LoRA weights at their init
            raise AdapterLoadError(f"the LoRA adapter in {adapter} lacks weights its adapter_config.json names "
                                   f"({str(warning.message)[:200]}): an incomplete copy? Copy the adapter again")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    bad = non_finite_weight((n, p) for n, p in loaded.named_parameters() if "lora_" in n or "modules_to_save" in n)
    if bad:
        raise AdapterLoadError(f"the LoRA adapter in {adapter} holds inf/NaN weights ({bad}): a training that "
                               "diverged (a learning rate far too high) or a copy damaged since; its predictions "
                               "would be empty or noise. Train it again, or copy it again from where it was trained")
    return loaded


def non_finite_weight(named) -> str | None:
    """The name of the first of these (name, tensor) pairs that holds inf or NaN, None when all are finite: each
    tensor's largest magnitude, computed together (a few kernels for hundreds of LoRA tensors)."""
    import torch

    named = [(n, p.detach()) for n, p in named if p.numel()]
    if not named:
        return None
    device = named[0][1].device  # one device for the stack (a model split over several holds others)
    largest = torch.stack([m.float().to(device) for m in torch._foreach_norm([p for _, p in named], float("inf"))])
    bad = ~torch.isfinite(largest)
    return named[int(bad.nonzero()[0, 0])][0] if bool(bad.any()) else None
