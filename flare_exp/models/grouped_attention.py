"""Decode-step attention that reads each key/value head once (``model.decode_attention=grouped``).

Qwen3-VL-4B's language model has 32 query heads sharing 8 key/value heads. With attn_implementation=sdpa,
transformers (5.17) lets SDPA share them (``enable_gqa``) only when there is no attention mask; a batch of
left-padded prompts always has one, so every decode step copies the whole KV cache 4x (``repeat_kv``) in every
layer and attention then reads the copy: in the decode profile those copies and the attention over them were
most of a compiled decode step (docs/performance.md).

At a decode step each sequence has one query token, so the 4 query heads of a group can stand in as 4 query
rows of their key/value head: query (batch, 32, 1, d) is viewed as (batch, 8, 4, d), the padding mask
(batch, 1, 1, keys) broadcasts over heads and rows, and SDPA reads the cache once. Same math (tested against
transformers' function); prefill and training (many query tokens, or no mask) keep transformers' own path.

Installed per model through transformers' attention registry: the language model's config gets a registered
name whose mask is sdpa's, so masks, caches and compiled decoding work as with sdpa; the vision encoder is left
alone (no grouped heads).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

NAME = "sdpa_grouped_decode"
SETTINGS = ("grouped", "transformers")


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; query (batch, heads, q_len, d), key/value (batch, kv_heads,
    keys, d); returns (batch, q_len, heads, d) and no weights."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.shape[-1] > key.shape[-2]:
        # a mask made for a longer cache than the keys handed here: only its first keys apply (transformers 4.x
        # trimmed it in its SDPA path; 5.x hands it to SDPA as it is, which refuses the shape)
        attention_mask = attention_mask[..., : key.shape[-2]]
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


def register() -> None:
    """Add the name to transformers' attention and mask registries (idempotent; changes no other name)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_grouped_decode_attention(model, setting: str) -> int:
    """Switch every sdpa attention module with grouped key/value heads to the grouped decode path. Returns how
    many configs were switched (0 for transformers, non-sdpa attention or no grouped heads)."""
    if setting == "transformers":
        return 0
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(module, "num_key_value_groups", 1) > 1 and config is not None and hasattr(module, "is_causal"):
            configs[id(config)] = config
    switched = [c for c in configs.values() if c._attn_implementation in ("sdpa", NAME)]
    if switched:
        register()
        for config in switched:
            config._attn_implementation = NAME
    else:
        log.info("model.decode_attention=grouped: nothing to change (no sdpa attention with grouped key/value "
                 "heads)")
    return len(switched)
