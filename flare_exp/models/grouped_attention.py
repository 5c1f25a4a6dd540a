"""Decode-step attention: ``model.decode_attention`` = split_kv (default) | grouped | transformers.

Qwen3-VL-4B's language model has 32 query heads sharing 8 key/value heads. With attn_implementation=sdpa,
transformers (5.17) lets SDPA share them (``enable_gqa``) only when there is no attention mask; a batch of
left-padded prompts always has one, so every decode step copies the whole KV cache 4x (``repeat_kv``) in every
layer and attention then reads the copy: in the decode profile those copies and the attention over them were
most of a compiled decode step (docs/performance.md).

At a decode step each sequence has one query token, so the 4 query heads of a group can stand in as 4 query
rows of their key/value head: query (batch, 32, 1, d) is viewed as (batch, 8, 4, d), the padding mask
(batch, 1, 1, keys) broadcasts over heads and rows, and SDPA reads the cache once. Same math (tested against
transformers' function); prefill and training (many query tokens, or no mask) keep transformers' own path.

``split_kv``: decode steps go to a Triton kernel that splits each row's keys over several programs and skips
blocks of padding (flare_exp/models/split_kv_attention.py; on a GPU, for grouped and plain multi-head attention
alike, so also the GREEN judge's through ``eval.green.decode_attention``); any other call takes the grouped
path.

Installed per model through transformers' attention registry: the language model's config gets a registered
name whose mask is sdpa's, so masks, caches and compiled decoding work as with sdpa; the vision encoder is left
alone (not causal: no decode steps).
"""
from __future__ import annotations

import logging

from flare_exp.models import split_kv_attention

log = logging.getLogger(__name__)

NAME = "sdpa_grouped_decode"
SPLIT_KV_NAME = "sdpa_split_kv_decode"
SETTINGS = ("grouped", "split_kv", "transformers")


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; query (batch, heads, q_len, d), key/value (batch, kv_heads,
    keys, d); returns (batch, q_len, heads, d) and no weights."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    attention_mask = trimmed(attention_mask, key)
    foldable = (groups > 1 and q_len == 1 and kv_heads * groups == heads and attention_mask is not None
                and attention_mask.ndim == 4 and attention_mask.shape[1] == 1
                and not kwargs.get("output_attentions") and kwargs.get("head_mask") is None)
    if not foldable:  # prefill, training, no padding (SDPA shares heads itself then), other layouts
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # query head h uses key/value head h // groups (repeat_kv's layout): rows of one kv head are contiguous
    rows = query.reshape(batch, kv_heads, groups, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


def trimmed(attention_mask, key):
    """A mask made for a longer cache than the keys handed here: only its first keys apply (transformers 4.x
    trimmed it in its SDPA path; 5.x hands it to SDPA as it is, which refuses the shape)."""
    if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.shape[-1] > key.shape[-2]:
        return attention_mask[..., : key.shape[-2]]
    return attention_mask


def split_kv_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The split-KV kernel at decode steps it computes exactly (``split_kv_attention.supported``), else the
    grouped path. ``shared_prefix`` (the graph loop's, ``graph_decoding.common_beginning``): the rows' common
    beginning read once per block of rows; the grouped path reads it in each row, as the mask says."""
    import torch

    shared = kwargs.pop("shared_prefix", None)
    mask = trimmed(attention_mask, key)
    if split_kv_attention.supported(query, key, mask, dropout, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        starts, span = shared if shared is not None else (None, None)
        return torch.ops.flare_exp.split_kv_decode(query, key, value, mask, float(scale), starts, span), None
    return grouped_decode_attention(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, **kwargs)


def register() -> None:
    """Add the names to transformers' attention and mask registries (idempotent; changes no other name)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for name, function in ((NAME, grouped_decode_attention), (SPLIT_KV_NAME, split_kv_decode_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def kernel_available(model, key: str) -> bool:
    """split_kv on a GPU needs Triton (torch's CUDA wheels bring it) and a kernel that compiles and agrees with
    SDPA on this card, dtype and head size (checked once, here); otherwise the grouped path, said once."""
    import importlib.util

    parameter = next(model.parameters(), None)
    if parameter is None or not parameter.is_cuda:
        return True  # off a GPU every call takes the grouped path anyway
    why = "Triton is not installed (pip install triton, matching torch)" if importlib.util.find_spec(
        "triton") is None else None
    if why is None:
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        why = split_kv_attention.self_check(parameter.device, parameter.dtype, head_dim)
    if why:
        log.warning("%s=split_kv: decode steps take the grouped path: %s", key, why)
    return why is None


def use_decode_attention(model, setting: str, key: str = "model.decode_attention") -> int:
    """Switch the sdpa attention of the model's causal attention modules to the setting's decode path (grouped:
    only those with grouped key/value heads; split_kv: all, the kernel serves plain multi-head attention too).
    Returns how many configs were switched (0 for transformers or when nothing applies)."""
    if setting == "transformers":
        return 0
    if setting == "split_kv" and not kernel_available(model, key):
        setting = "grouped"
    if setting == "split_kv":
        split_kv_attention.custom_op()  # defines torch.ops.flare_exp.split_kv_decode
    name = SPLIT_KV_NAME if setting == "split_kv" else NAME
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        grouped = getattr(module, "num_key_value_groups", 1) > 1
        if config is not None and getattr(module, "is_causal", False) is True and (grouped or setting == "split_kv"):
            configs[id(config)] = config
    switched = [c for c in configs.values() if c._attn_implementation in ("sdpa", NAME, SPLIT_KV_NAME)]
    if switched:
        register()
        for config in switched:
            config._attn_implementation = name
    else:
        log.info("%s=%s: nothing to change (no sdpa attention%s)", key, setting,
                 " with grouped key/value heads" if setting == "grouped" else "")
    return len(switched)


def attention_used(model) -> str:
    """What the model's decode steps attend with, for a stage's summary: the setting as it runs here."""
    name = model.config.get_text_config()._attn_implementation
    on_gpu = any(p.is_cuda for p in model.parameters())
    if name == SPLIT_KV_NAME:
        return "split_kv (Triton kernel)" if on_gpu else "split_kv (grouped SDPA: no GPU)"
    return {NAME: "grouped", "sdpa": "transformers (sdpa)"}.get(name, name)
