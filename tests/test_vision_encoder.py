"""model.vision_encoder=batched: the same vision encoder outputs and gradients as transformers' per-image loop,
with one attention call per run of equally sized images."""
import pytest
import torch
from PIL import Image

from conftest import compose_cfg

def test_equal_length_runs_and_grouping_order():
    from flare_exp.models.vision_encoder import equal_length_runs, grouping_order

    assert equal_length_runs([256, 256, 64, 256]) == [(256, 2), (64, 1), (256, 1)]
    assert equal_length_runs([16]) == [(16, 1)]
    assert grouping_order([256, 256, 64]) is None and grouping_order([5]) is None
    assert grouping_order([256, 64, 256, 64, 256]) == [0, 2, 4, 1, 3]


def mixed_size_batch(chat, demo_prepared, sizes: str):
    """Five images of two sizes (a, b) in the given order: two two-view samples and a one-view one."""
    from flare_exp.io import read_jsonl

    rows = read_jsonl(demo_prepared / "train.jsonl")
    records = [r for r in rows if r["dataset"] == "IU_XRay"][:2] + [r for r in rows if r["dataset"] == "dental"][:1]
    size = {"a": (64, 64), "b": (96, 64)}
    flat = [Image.new("RGB", size[c], (i * 40, 200 - i * 30, 90)) for i, c in enumerate(sizes)]
    images = [flat[0:2], flat[2:4], flat[4:5]]
    return dict(chat._encode([chat.full_text(r) for r in records], records, "right", images))


@pytest.mark.parametrize("sizes", ["aabba", "ababa"])  # runs of equal sizes; alternating (frontal/lateral)
def test_batched_vision_encoder_matches_the_per_image_loops(sizes, base_overrides, tiny_model_dir, demo_prepared,
                                                             monkeypatch):
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

    from flare_exp.data.vision import VisionChat
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=sft", *base_overrides, "model.dtype=float32"])
    torch.manual_seed(0)
    loaded = load_model(cfg.model, training=True)
    model = loaded.model
    batch = mixed_size_batch(VisionChat(loaded.processor, abspath(cfg.data.root)), demo_prepared, sizes)
    assert len({tuple(g.tolist()) for g in batch["image_grid_thw"]}) == 2 and len(batch["image_grid_thw"]) == 5
    attention = [m for m in model.modules() if isinstance(m, qwen3_vl.Qwen3VLVisionAttention)]
    encoder = next(m for m in model.modules() if isinstance(m, qwen3_vl.Qwen3VLVisionModel))
    assert attention and all("forward" in vars(m) for m in attention)  # installed per instance by load_model
    with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen them so the math shows
        for m in attention:
            getattr(m.qkv, "base_layer", m.qkv).weight.mul_(30)
    encoder.pos_embed.weight.requires_grad_(True)  # so the position embeddings' gradients are compared

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: (calls.append((q.shape[0], q.shape[2])), sdpa(q, *a, **kw))[1])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "visual" in n}
        return loss.detach(), grads, list(calls)

    batched_loss, batched_grads, batched_calls = loss_and_grads()
    for m in attention:
        del m.forward  # back to transformers' own code
    loop_loss, loop_grads, loop_calls = loss_and_grads()

    depth = len(attention)
    patches = {c: int(g.prod()) for c, g in zip(sizes, batch["image_grid_thw"])}
    vision = lambda calls: sorted(c for c in calls if c[1] in patches.values())  # noqa: E731  (images, patches)
    assert vision(batched_calls) == sorted([(3, patches["a"]), (2, patches["b"])] * depth)  # one call per size
    assert vision(loop_calls) == sorted([(1, patches[c]) for c in sizes] * depth)  # one call per image
    assert torch.allclose(batched_loss, loop_loss, atol=1e-6)
    assert batched_grads.keys() == loop_grads.keys() and any("pos_embed" in n for n in batched_grads)
    for name, grad in batched_grads.items():
        assert torch.allclose(grad, loop_grads[name], atol=1e-6, rtol=1e-4), name


def test_per_image_setting_keeps_transformers_code(base_overrides, tiny_model_dir):
    from flare_exp.models.loading import load_model

    model = load_model(compose_cfg(["stage=sft", *base_overrides, "model.vision_encoder=per_image"]).model).model
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "Qwen3VLVisionAttention")
    with pytest.raises(ValueError, match="model.vision_encoder='fast'"):
        load_model(compose_cfg(["stage=sft", *base_overrides, "model.vision_encoder=fast"]).model)


def test_code_replaced_by_another_library_is_left_and_named(base_overrides, monkeypatch, caplog):
    """Unsloth rewrites transformers' modeling code into its own modules: that code is left alone, and the log
    says where it came from."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

    from flare_exp.models.loading import load_model

    namespace = {}
    exec(compile("def forward(self, *args, **kwargs):\n    return original(self, *args, **kwargs)\n",
                 "other_library_compiled_module.py", "exec"), {"original": qwen3_vl.Qwen3VLVisionAttention.forward},
         namespace)
    monkeypatch.setattr(qwen3_vl.Qwen3VLVisionAttention, "forward", namespace["forward"])
    with caplog.at_level("INFO", logger="flare_exp.models.vision_encoder"):
        model = load_model(compose_cfg(["stage=sft", *base_overrides]).model).model
    attention = [m for m in model.modules() if isinstance(m, qwen3_vl.Qwen3VLVisionAttention)]
    assert attention and not any("forward" in vars(m) for m in attention)
    assert "attention (sdpa, other_library_compiled_module.py)" in caplog.text


def test_compiled_vision_blocks_do_not_recompile_for_each_image_layout(base_overrides, tiny_model_dir):
    """sft.compile_layers compiles the vision blocks: the block-diagonal attention, whose layout is data, stays
    out of the compiled graphs, so new image layouts (sizes, counts, orders) stop causing compilations once
    the shapes have been seen to vary (before: one per layout, up to dynamo's limit of 8, then eager)."""
    from torch._dynamo.utils import counters

    from flare_exp.models.loading import compile_repeated_blocks, load_model

    torch._dynamo.reset()
    loaded = load_model(compose_cfg(["stage=sft", *base_overrides]).model, training=True)
    encoder = loaded.model.base_model.model.model.visual
    compile_repeated_blocks(loaded.model, "eager")
    loaded.model.train()  # compiled blocks run compiled in training mode only (as the trainer runs them)
    counters.clear()  # dynamo's reset keeps the counters: count this test's compilations only
    config = encoder.config
    patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    layouts = [[(1, 8, 8), (1, 8, 12)], [(1, 8, 8), (1, 8, 12), (1, 8, 8)], [(1, 4, 8), (1, 8, 8)],
               [(1, 12, 8)], [(1, 8, 16), (1, 8, 8), (1, 4, 4)], [(1, 4, 4), (1, 8, 16), (1, 4, 4), (1, 8, 8)],
               [(1, 16, 8), (1, 8, 12)], [(1, 12, 12), (1, 4, 8), (1, 12, 12)], [(1, 8, 4)] * 3]
    compiled = []
    for grids in layouts:
        grid = torch.tensor(grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), patch, dtype=encoder.dtype, requires_grad=True)
        encoder(pixels, grid_thw=grid)[0].float().sum().backward()
        compiled.append(counters["frames"]["total"])
    assert compiled[-1] > 0  # the blocks were compiled
    assert compiled[-1] == compiled[3], compiled  # nothing new after the first layouts
