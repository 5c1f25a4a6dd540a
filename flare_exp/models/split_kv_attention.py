"""Split-KV decode attention in Triton (``model.decode_attention=split_kv``, ``eval.green.decode_attention``).

At a decode step each row has one query token and reads its whole KV cache: the step is bound by memory, not
arithmetic. SDPA's kernels (cuDNN on Hopper) give one program a whole row of one key/value head, so with few
programs per SM the loads are not overlapped enough: at batch 128 on an H200, 197 us per layer call where the
cache's bytes need ~90 us (docs/performance.md). Here each program reads one slice of the keys for all the query
heads that share its key/value head (``groups``: 4 for Qwen3-VL-4B, 1 for the GREEN judge), so there are enough
programs to keep the memory busy at any batch size, and a second small kernel merges the slices' partial
softmaxes (flash-decoding). A key block whose mask is all False (left padding, the static cache's unwritten
tail) costs no memory traffic: its loads are masked off.

The mask is the decode step's own boolean (batch, 1, 1, keys) mask, read as it is: any pattern is honoured, no
assumption that the valid keys are contiguous. Float32 inputs use exact float32 products (no TF32), so on
float32 weights the outputs match SDPA's to rounding. A row with no valid key gets zeros (SDPA: NaN; a decode
step always sees at least its own token).

Wrapped as a torch custom op so a compiled decode step (CUDA graphs) captures it as one opaque call. Needs a
CUDA tensor and Triton; ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the tests do). When a
model is switched to it on a GPU, ``self_check`` runs it once against SDPA on that card, dtype and head size:
a Triton that cannot compile it there, or a result that disagrees, keeps SDPA with a warning.
"""
from __future__ import annotations

import functools
import math

BLOCK_N = 64  # keys per loop iteration of a program
MAX_SPLITS = 32
SHARED_ROWS = 64  # rows per program reading the common beginning (at least tl.dot's 16)


def supported(query, key, attention_mask, dropout: float = 0.0, **kwargs) -> bool:
    """Whether this call is a decode step the kernel computes exactly as SDPA would."""
    import torch

    if query.shape[2] != 1 or dropout or attention_mask is None or attention_mask.dtype != torch.bool:
        return False
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1:
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "head_mask")):
        return False  # attention variants the kernel does not compute
    return (query.dtype in (torch.float16, torch.bfloat16, torch.float32) and key.dtype == query.dtype
            and query.shape[1] % key.shape[1] == 0 and takes_head_dim(query.shape[-1])
            and not kwargs.get("output_attentions") and (query.is_cuda or interpreted()))


def takes_head_dim(head_dim: int) -> bool:
    """The head sizes the kernel is built for: a power of two from 16 to 256 (tl.arange and tl.dot's shapes)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def split_count(programs: int, key_blocks: int, processors: int) -> int:
    """Slices per (row, key/value head): enough programs for ~4 per SM, no more slices than key blocks."""
    wanted = -(-4 * processors // max(programs, 1))
    return max(1, min(wanted, key_blocks, MAX_SPLITS))


@functools.cache
def processor_count(device_index: int) -> int:
    import torch

    if not torch.cuda.is_available():
        return 4  # the interpreter: a few slices, so the merge is exercised
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kernels():
    """(partial_attention, shared_attention, merge_slices), imported on first use (split_kv_kernels.py)."""
    from flare_exp.models import split_kv_kernels as k

    return k.partial_attention, k.shared_attention, k.merge_slices


def attend(query, key, value, mask, scale: float | None = None, splits: int | None = None,
           block_n: int = BLOCK_N, warps: int = 4, stages: int = 2, shared=None):
    """query (B, H, 1, D), key/value (B, H_kv, N, D), mask (B, 1, 1, N) bool -> (B, 1, H, D), as
    transformers' attention functions return it. ``splits`` / ``block_n`` / ``warps`` / ``stages``: the
    launch shape (defaults chosen by measurement, docs/performance.md). ``shared``: (starts (B,), span (2,)),
    int32 on the device: every row's keys from its start on, span[1] of them, are the same as row span[0]'s
    (the prompts' common beginning, ``graph_decoding.common_beginning``); they are read from that row once per
    block of rows instead of once per row (the mask must let every row see them)."""
    import torch

    partial_attention, shared_attention, merge_slices = kernels()
    batch, heads, _, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if query.stride(-1) != 1:
        query = query.contiguous()
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    if splits is None:
        splits = split_count(batch * kv_heads, -(-n_keys // block_n), processor_count(query.device.index or 0))
    keys_per_split = -(-n_keys // splits)
    keys_per_split = -(-keys_per_split // block_n) * block_n  # whole blocks per slice
    splits = -(-n_keys // keys_per_split)
    slots = splits + (shared is not None)  # the common beginning's part in the last slot
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    parts = torch.empty(batch * heads * slots * head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch * heads * slots, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, 1, heads, head_dim, dtype=query.dtype, device=query.device)
    mask = mask.view(torch.uint8)
    starts, span = shared if shared is not None else (mask, mask)  # unread without SHARED
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    partial_attention[(batch * kv_heads, splits)](
        query, key, value, mask, starts, span, parts, lse, scale, n_keys, keys_per_split, kv_heads, groups,
        query.stride(0), query.stride(1) * groups, query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(3), slots,
        BLOCK_G=max(16, triton_power_of_two(groups)), BLOCK_N=block_n, HEAD_DIM=head_dim,
        PRECISION=precision, SHARED=shared is not None, num_warps=warps, num_stages=stages)
    if shared is not None:
        rows_per_program = min(SHARED_ROWS, max(16, triton_power_of_two(batch)))
        shared_attention[(-(-batch // rows_per_program), heads)](
            query, key, value, starts, span, parts, lse, scale, batch, heads, groups, query.stride(0),
            query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1),
            value.stride(2), slots, BLOCK_R=rows_per_program, BLOCK_N=block_n, HEAD_DIM=head_dim,
            PRECISION=precision, num_warps=warps, num_stages=stages)
    merge_slices[(batch * heads,)](parts, lse, out, SPLITS=slots, BLOCK_S=max(2, triton_power_of_two(slots)),
                                   HEAD_DIM=head_dim, num_warps=4)
    return out


def self_check(device, dtype, head_dim: int) -> str | None:
    """Run the kernel once on this card, dtype and head size against SDPA, with and without a shared beginning
    (it also compiles those variants): None when it agrees, else why not (a GPU or Triton build it does not run
    on: the caller keeps SDPA)."""
    import torch

    if not takes_head_dim(head_dim):
        return f"head size {head_dim} is not a power of two from 16 to 256"
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        query = torch.randn(2, 8, 1, head_dim, device=device, generator=generator).to(dtype)
        key, value = (torch.randn(2, 2, 200, head_dim, device=device, generator=generator).to(dtype)
                      for _ in range(2))
        mask = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=device)
        mask[0, ..., :70] = False
        for cache in (key, value):  # row 0 begins (after 70 of padding) with row 1's first 64 keys
            cache[0, :, 70:134] = cache[1, :, :64]
        shared = (torch.tensor([70, 0], dtype=torch.int32, device=device),
                  torch.tensor([1, 64], dtype=torch.int32, device=device))
        want = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float().repeat_interleave(4, 1), value.float().repeat_interleave(4, 1),
            attn_mask=mask).transpose(1, 2)
        error = max(float((attend(query, key, value, mask, shared=common).float() - want).abs().max())
                    for common in (None, shared))
    except Exception as e:  # a Triton that cannot compile the kernel here: any error of its compiler
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None if error < (1e-4 if dtype == torch.float32 else 2e-2) else f"differs from SDPA by {error:.3g}"


def triton_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def custom_op():
    """``attend`` as a torch custom op, so torch.compile captures it as one call (its output shape declared)."""
    import torch

    # the schema spelled out: this module's annotations are strings (``from __future__ import annotations``)
    @torch.library.custom_op("flare_exp::split_kv_decode", mutates_args=(),
                             schema="(Tensor query, Tensor key, Tensor value, Tensor mask, float scale, "
                                    "Tensor? shared_starts=None, Tensor? shared_span=None) -> Tensor")
    def split_kv_decode(query, key, value, mask, scale, shared_starts=None, shared_span=None):
        shared = None if shared_starts is None else (shared_starts, shared_span)
        return attend(query, key, value, mask, scale, shared=shared)

    @split_kv_decode.register_fake
    def _(query, key, value, mask, scale, shared_starts=None, shared_span=None):
        batch, heads, _, head_dim = query.shape
        return query.new_empty(batch, 1, heads, head_dim)

    return split_kv_decode
