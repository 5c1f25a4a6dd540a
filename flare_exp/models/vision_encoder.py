"""Qwen3-VL's vision encoder without its per-image attention loop (``model.vision_encoder=batched``).

transformers (5.17) attends over the images of a batch one by one (attn_implementation=sdpa): one call per image
in each of the 24 blocks: an IU_XRay batch of 8 two-view samples is 16 calls per block (recomputed under
gradient checkpointing), an inference batch of 128 is 256. Images of the same size are stacked on the batch
dimension instead (gathered next to each other first when sizes alternate, as frontal and lateral views do): the
same block-diagonal attention (each image attends only to itself), one kernel per distinct size. (Its position
embeddings are built for the whole batch at once since 5.x, from one read of the image grids.)
Installed per module instance; ``per_image`` keeps transformers' own code. Same outputs and gradients (tested).
"""
from __future__ import annotations

import functools
import logging
import types
from itertools import accumulate, groupby

log = logging.getLogger(__name__)

SETTINGS = ("batched", "per_image")


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """[(length, count)] for consecutive equal lengths: [256, 256, 64, 256] -> [(256, 2), (64, 1), (256, 1)]."""
    return [(length, len(list(group))) for length, group in groupby(lengths)]


def grouping_order(lengths: list[int]) -> list[int] | None:
    """Image order that puts equal sizes next to each other (stable, by first appearance), or None when they
    already are: [a, b, a] -> [0, 2, 1]. Real two-view studies alternate frontal and lateral sizes."""
    first: dict[int, int] = {}
    for i, length in enumerate(lengths):
        first.setdefault(length, i)
    order = sorted(range(len(lengths)), key=lambda i: first[lengths[i]])
    return None if order == sorted(order) else order


def attend_in_runs(module, query, key, value, lengths: list[int]):
    """Block-diagonal attention over (patches, heads, head_dim) tensors: one SDPA call per run of equal lengths."""
    import torch

    outputs, start = [], 0
    for length, count in equal_length_runs(lengths):
        end = start + length * count
        q, k, v = (t[start:end].reshape(count, length, module.num_heads, -1).transpose(1, 2) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=module.attention_dropout if module.training else 0.0, scale=module.scaling)
        outputs.append(out.transpose(1, 2).reshape(length * count, -1))
        start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@functools.lru_cache(maxsize=8)
def patch_permutation(lengths: tuple, order: tuple, device: str):
    """(patch indices in grouped order, and back): built once per batch layout, shared by all 24 blocks and
    the recomputation under gradient checkpointing."""
    import torch

    starts = [0, *accumulate(lengths)]
    patches = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]).to(device)
    return patches, torch.argsort(patches)


# The last image layout read from the GPU: (cu_seqlens, its per-image lengths). All 24 blocks of one forward
# (and the recomputation under gradient checkpointing) are handed the same cu_seqlens tensor, so its lengths
# are read once per forward, not once per block: each read synchronises with the GPU mid-tower.
_last_layout: list = [None, None]


def image_lengths(cu_seqlens) -> list[int]:
    if _last_layout[0] is not cu_seqlens:
        _last_layout[:] = [cu_seqlens, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()]
    return _last_layout[1]


def block_diagonal_attention(module, query, key, value, cu_seqlens):
    """Each image's patches attend to that image's patches only."""
    lengths = image_lengths(cu_seqlens)
    order = grouping_order(lengths)
    if order is None:
        return attend_in_runs(module, query, key, value, lengths)
    # gather equal sizes together, attend, put the patches back in their places
    patches, back = patch_permutation(tuple(lengths), tuple(order), str(query.device))
    grouped = attend_in_runs(module, query[patches], key[patches], value[patches], [lengths[i] for i in order])
    return grouped[back]


# block_diagonal_attention kept out of torch.compile (sft.compile_layers compiles the vision blocks): the image
# layout is data read on the host, and a compiled copy is specialised to it, so every new layout recompiled it
# until dynamo's recompile limit, after which it ran eagerly anyway. Set on install.
_eager_block_diagonal_attention = None


def batched_attention_forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None,
                              **kwargs):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)  # (patches, heads, head_dim)
    attend = _eager_block_diagonal_attention or block_diagonal_attention
    return self.proj(attend(self, query, key, value, cu_seqlens).contiguous())


def use_batched_vision_encoder(model, setting: str, replace_foreign: bool = False) -> int:
    """Install the batched attention (sdpa only) on Qwen3-VL's vision encoder. Returns how many modules were
    changed; 0 when the setting says per_image, the model has no Qwen3-VL vision encoder, or another library
    already replaced transformers' code (left alone unless replace_foreign: the benchmark's way to try it over
    Unsloth's rewritten copy, checking the outputs first)."""
    try:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl
    except ImportError:
        return 0
    if setting == "per_image":
        return 0
    global _eager_block_diagonal_attention
    if _eager_block_diagonal_attention is None:
        import torch

        _eager_block_diagonal_attention = torch.compiler.disable(block_diagonal_attention)
    attention = qwen3_vl.Qwen3VLVisionAttention
    ours = attention.forward.__code__.co_filename == qwen3_vl.__file__
    changed, left = 0, set()
    for module in model.modules():
        # flash_attention_2 already makes one varlen call; eager stays the reference
        if not isinstance(module, attention):
            continue
        if (replace_foreign or ours) and module.config._attn_implementation == "sdpa":
            module.forward = types.MethodType(batched_attention_forward, module)
            changed += 1
        else:
            left.add(f"attention ({module.config._attn_implementation}, {attention.forward.__code__.co_filename})")
    if left:
        # e.g. Unsloth rewrites transformers' modeling code into its own compiled modules
        log.info("model.vision_encoder=batched: left as they are (code not transformers' own, or not sdpa): %s",
                 "; ".join(sorted(left)))
    elif not changed:
        log.info("model.vision_encoder=batched: nothing to change (no Qwen3-VL vision encoder)")
    return changed
