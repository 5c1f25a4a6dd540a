"""model.vision_attention=batched: the same vision encoder outputs and gradients as transformers' per-image
loop, with one attention call per run of equally sized images."""
import pytest
import torch
from PIL import Image

from conftest import compose_cfg


def test_equal_length_runs():
    from flare_exp.models.vision_attention import equal_length_runs

    assert equal_length_runs([256, 256, 64, 256]) == [(256, 2), (64, 1), (256, 1)]
    assert equal_length_runs([16]) == [(16, 1)]


def mixed_size_batch(chat, demo_prepared):
    """Five images of two sizes, ordered so that equal sizes form runs of 2, 2 and 1."""
    from flare_exp.io import read_jsonl

    rows = read_jsonl(demo_prepared / "train.jsonl")
    two_views = [r for r in rows if r["dataset"] == "IU_XRay"][:2]
    one_view = [r for r in rows if r["dataset"] == "dental"][:1]
    size_a, size_b = (64, 64), (96, 64)
    images = [[Image.new("RGB", size_a, (i * 40, 90, 30)) for i in range(2)],
              [Image.new("RGB", size_b, (20, 200, 90)), Image.new("RGB", size_b, (90, 20, 200))],
              [Image.new("RGB", size_a, (5, 5, 250))]]
    records = two_views + one_view
    return dict(chat._encode([chat.full_text(r) for r in records], records, "right", images))


@pytest.fixture
def loaded(base_overrides, tiny_model_dir):
    from flare_exp.models.loading import load_model

    cfg = compose_cfg(["stage=sft", *base_overrides, "model.dtype=float32"])
    torch.manual_seed(0)
    return load_model(cfg.model, training=True), cfg


def test_batched_vision_attention_matches_the_per_image_loop(loaded, demo_prepared, monkeypatch):
    from flare_exp.data.vision import VisionChat
    from flare_exp.runtime import abspath

    model_and_processor, cfg = loaded
    model = model_and_processor.model
    chat = VisionChat(model_and_processor.processor, abspath(cfg.data.root))
    batch = mixed_size_batch(chat, demo_prepared)
    grid = batch["image_grid_thw"]
    assert len({tuple(g.tolist()) for g in grid}) == 2 and len(grid) == 5
    modules = [m for m in model.modules() if type(m).__name__ == "Qwen3VLVisionAttention"]
    assert modules and all("forward" in vars(m) for m in modules)  # installed per instance by load_model
    with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen them so the math shows
        for m in modules:
            getattr(m.qkv, "base_layer", m.qkv).weight.mul_(30)

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: (calls.append(q.shape[0]), sdpa(q, *a, **kw))[1])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = model(**{k: v for k, v in batch.items()}, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "visual" in n}
        return loss.detach(), grads, list(calls)

    batched_loss, batched_grads, batched_calls = loss_and_grads()
    for m in modules:
        del m.forward  # back to transformers' own forward
    loop_loss, loop_grads, loop_calls = loss_and_grads()

    depth = len(modules)
    assert batched_calls.count(2) == 2 * depth and batched_calls.count(1) == depth  # runs of 2, 2, 1
    assert loop_calls.count(1) >= 5 * depth and 2 not in loop_calls  # one call per image
    assert torch.allclose(batched_loss, loop_loss, atol=1e-6)
    assert batched_grads.keys() == loop_grads.keys() and batched_grads
    for name, grad in batched_grads.items():
        assert torch.allclose(grad, loop_grads[name], atol=1e-6, rtol=1e-4), name


def test_per_image_setting_leaves_transformers_forward(base_overrides, tiny_model_dir):
    from flare_exp.models.loading import load_model

    model = load_model(compose_cfg(["stage=sft", *base_overrides, "model.vision_attention=per_image"]).model).model
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "Qwen3VLVisionAttention")
    with pytest.raises(ValueError, match="model.vision_attention='fast'"):
        load_model(compose_cfg(["stage=sft", *base_overrides, "model.vision_attention=fast"]).model)
