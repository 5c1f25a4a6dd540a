"""model.lora.input_cast=outside_autocast: LoRA layers skip PEFT's float32 input cast under autocast (where F.linear
undoes it), with bit-identical losses and gradients, and still cast without autocast."""
import pytest
import torch

from conftest import compose_cfg


def _lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]


def _step(model, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _copies(model, batch) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(model, batch, autocast=True)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")


def test_same_numbers_fewer_copies(base_overrides, demo_prepared):
    from flare_exp.data.vision import SFTCollator, VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.lora_casts import CastOutsideAutocast
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=sft", *base_overrides, "model.dtype=bfloat16", "model.gradient_checkpointing=true"])
    torch.manual_seed(0)
    loaded = load_model(cfg.model, training=True)
    model = loaded.model
    model.train()
    layers = _lora_layers(model)
    assert layers and all(isinstance(m.cast_input_dtype_enabled, CastOutsideAutocast) for m in layers)
    assert {m.lora_A["default"].weight.dtype for m in layers} == {torch.float32}  # PEFT's float32 adapters
    records = [r for r in read_jsonl(demo_prepared / "train.jsonl") if r["dataset"] == "IU_XRay"][:2]
    batch = SFTCollator(VisionChat(loaded.processor, abspath(cfg.data.root)))(records)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)

    def with_peft_casts(value):
        for m in layers:
            m.cast_input_dtype_enabled = value

    for autocast in (True, False):  # without autocast the layers must still cast (bf16 input, fp32 weights)
        loss, grads = _step(model, batch, autocast)
        with_peft_casts(True)
        reference_loss, reference_grads = _step(model, batch, autocast)
        with_peft_casts(CastOutsideAutocast())
        assert torch.equal(loss, reference_loss)
        assert grads.keys() == reference_grads.keys() and len(grads) > len(layers)
        assert all(torch.equal(grads[n], reference_grads[n]) for n in grads), autocast

    skipped = _copies(model, batch)
    with_peft_casts(True)
    assert skipped < _copies(model, batch) - 4 * len(layers)  # >= 4 activation copies per layer: fwd x2, bwd x2


def test_settings(base_overrides):
    from flare_exp.models.loading import load_model

    model = load_model(compose_cfg(["stage=sft", *base_overrides, "model.lora.input_cast=always"]).model).model
    assert all(m.cast_input_dtype_enabled is True for m in _lora_layers(model))
    with pytest.raises(ValueError, match="model.lora.input_cast='never'"):
        load_model(compose_cfg(["stage=sft", *base_overrides, "model.lora.input_cast=never"]).model)
