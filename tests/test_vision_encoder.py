"""model.vision_encoder=batched: the same vision encoder outputs and gradients as transformers' per-image loops,
with one attention call per run of equally sized images and position embeddings built once per image size."""
import pytest
import torch
from PIL import Image

from conftest import compose_cfg

PATCHED = ("fast_pos_embed_interpolate", "rot_pos_emb")


def test_equal_length_runs():
    from flare_exp.models.vision_encoder import equal_length_runs

    assert equal_length_runs([256, 256, 64, 256]) == [(256, 2), (64, 1), (256, 1)]
    assert equal_length_runs([16]) == [(16, 1)]


def mixed_size_batch(chat, demo_prepared):
    """Five images of two sizes, ordered so that equal sizes form runs of 2, 2 and 1."""
    from flare_exp.io import read_jsonl

    rows = read_jsonl(demo_prepared / "train.jsonl")
    records = [r for r in rows if r["dataset"] == "IU_XRay"][:2] + [r for r in rows if r["dataset"] == "dental"][:1]
    size_a, size_b = (64, 64), (96, 64)
    images = [[Image.new("RGB", size_a, (i * 40, 90, 30)) for i in range(2)],
              [Image.new("RGB", size_b, (20, 200, 90)), Image.new("RGB", size_b, (90, 20, 200))],
              [Image.new("RGB", size_a, (5, 5, 250))]]
    return dict(chat._encode([chat.full_text(r) for r in records], records, "right", images))


def test_batched_vision_encoder_matches_the_per_image_loops(base_overrides, tiny_model_dir, demo_prepared,
                                                             monkeypatch):
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

    from flare_exp.data.vision import VisionChat
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=sft", *base_overrides, "model.dtype=float32"])
    torch.manual_seed(0)
    loaded = load_model(cfg.model, training=True)
    model = loaded.model
    batch = mixed_size_batch(VisionChat(loaded.processor, abspath(cfg.data.root)), demo_prepared)
    assert len({tuple(g.tolist()) for g in batch["image_grid_thw"]}) == 2 and len(batch["image_grid_thw"]) == 5
    attention = [m for m in model.modules() if isinstance(m, qwen3_vl.Qwen3VLVisionAttention)]
    encoder = next(m for m in model.modules() if isinstance(m, qwen3_vl.Qwen3VLVisionModel))
    assert attention and all("forward" in vars(m) for m in attention)  # installed per instance by load_model
    assert all(name in vars(encoder) for name in PATCHED)
    with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen them so the math shows
        for m in attention:
            getattr(m.qkv, "base_layer", m.qkv).weight.mul_(30)
    encoder.pos_embed.weight.requires_grad_(True)  # so the repeated position embeddings' gradients are compared

    calls, grids = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: (calls.append(q.shape[0]), sdpa(q, *a, **kw))[1])
    # positions looked up per call of the position embedding table
    encoder.pos_embed.register_forward_hook(lambda module, args, out: grids.append(args[0].shape[1]))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        calls.clear(), grids.clear()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "visual" in n}
        return loss.detach(), grads, list(calls), list(grids)

    batched_loss, batched_grads, batched_calls, batched_grids = loss_and_grads()
    for m in attention:
        del m.forward  # back to transformers' own code
    for name in PATCHED:
        delattr(encoder, name)
    loop_loss, loop_grads, loop_calls, loop_grids = loss_and_grads()

    depth = len(attention)
    assert batched_calls.count(2) == 2 * depth and batched_calls.count(1) == depth  # runs of 2, 2, 1
    assert loop_calls.count(1) >= 5 * depth and 2 not in loop_calls  # one call per image
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]  # per image, in order: a, a, b, b, a
    assert batched_grids == [patches[0], patches[2]] and loop_grids == [sum(patches)]  # once per size
    assert torch.allclose(batched_loss, loop_loss, atol=1e-6)
    assert batched_grads.keys() == loop_grads.keys() and any("pos_embed" in n for n in batched_grads)
    for name, grad in batched_grads.items():
        assert torch.allclose(grad, loop_grads[name], atol=1e-6, rtol=1e-4), name


def test_per_image_setting_keeps_transformers_code(base_overrides, tiny_model_dir):
    from flare_exp.models.loading import load_model

    model = load_model(compose_cfg(["stage=sft", *base_overrides, "model.vision_encoder=per_image"]).model).model
    assert not any(name in vars(m) for m in model.modules() for name in ("forward", *PATCHED)
                   if type(m).__name__ in ("Qwen3VLVisionAttention", "Qwen3VLVisionModel"))
    with pytest.raises(ValueError, match="model.vision_encoder='fast'"):
        load_model(compose_cfg(["stage=sft", *base_overrides, "model.vision_encoder=fast"]).model)
