"""Qwen3-VL's vision attention with one SDPA call per run of equally sized images instead of one per image.

transformers (4.57, attn_implementation=sdpa) splits the packed patch sequence at every image boundary and
calls attention once per image, in each of the 24 vision blocks: an IU_XRay batch of 8 two-view samples is 16
calls per block (recomputed once more under gradient checkpointing), an inference batch of 128 is 256. Images
of the same size that follow each other are stacked on the batch dimension instead, which is the same
block-diagonal attention (each image attends only to itself), in one kernel. Installed per module instance
(``model.vision_attention=batched``); the original per-image loop stays one override away (``per_image``).
"""
from __future__ import annotations

import logging
import types
from itertools import groupby

log = logging.getLogger(__name__)


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """[(length, count)] for consecutive equal lengths: [256, 256, 64, 256] -> [(256, 2), (64, 1), (256, 1)]."""
    return [(length, len(list(group))) for length, group in groupby(lengths)]


def batched_forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)  # (patches, heads, head_dim)
    outputs, start = [], 0
    for length, count in equal_length_runs((cu_seqlens[1:] - cu_seqlens[:-1]).tolist()):
        end = start + length * count
        q, k, v = (t[start:end].reshape(count, length, self.num_heads, -1).transpose(1, 2) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, scale=self.scaling)
        outputs.append(out.transpose(1, 2).reshape(length * count, -1))
        start = end
    attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return self.proj(attn_output.contiguous())


def use_batched_vision_attention(model, setting: str) -> int:
    """Install batched_forward on every Qwen3-VL vision attention module (setting "batched", sdpa only).
    Returns how many modules use it; 0 when the setting, the attention implementation or a patched class
    (another library replaced transformers' forward) says to leave them alone."""
    if setting not in ("batched", "per_image"):
        raise ValueError(f"model.vision_attention={setting!r}: choose batched or per_image")
    try:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl
    except ImportError:
        return 0
    modules = [m for m in model.modules() if isinstance(m, qwen3_vl.Qwen3VLVisionAttention)]
    if setting == "per_image" or not modules:
        return 0
    if modules[0].config._attn_implementation != "sdpa":
        return 0  # flash_attention_2 already runs one varlen call; eager stays the reference
    if qwen3_vl.Qwen3VLVisionAttention.forward.__code__.co_filename != qwen3_vl.__file__:
        log.info("model.vision_attention=batched: Qwen3VLVisionAttention.forward is patched by another "
                 "library; left as it is")
        return 0
    for module in modules:
        module.forward = types.MethodType(batched_forward, module)
    return len(modules)
