"""The decode step's attention alone (``python -m bench.run attention``): one query token per sequence over a
left-padded KV cache with Qwen3-VL-4B's heads (32 query heads, 8 key/value heads, 128 dims), each way the
step can compute it, under each SDPA kernel.

Why: in the fifth run's batch-64 profile the grouped decode attention took 138 µs per layer (36 layers per
token) while reading that cache once should take ~40 µs at an H200's bandwidth; SDPA had picked cuDNN for it.
This says which kernel to ask for. Each row checks its output against float32 math on the copied layout.
"""
from __future__ import annotations

import time
from contextlib import nullcontext

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 36


def _inputs(batch: int, keys: int, device, dtype, generator):
    import torch

    query = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    key = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    value = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    padding = torch.randint(0, keys // 3, (batch,), device=device, generator=generator)  # left padding
    mask = (torch.arange(keys, device=device) >= padding[:, None])[:, None, None, :]  # (B, 1, 1, keys)
    return query, key, value, mask


def _layouts(query, key, value, mask):
    """name -> a call returning (B, 32, 1, d): the grouped rows (flare-exp's default), transformers' copies of
    the cache per query head (its path whenever a mask is present), and SDPA's own head sharing without a mask
    (what the step would cost with no padding: a lower bound)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    batch, groups = query.shape[0], HEADS // KV_HEADS

    def grouped():
        rows = query.reshape(batch, KV_HEADS, groups, HEAD_DIM)
        return sdpa(rows, key, value, attn_mask=mask).reshape(batch, HEADS, 1, HEAD_DIM)

    def copied():
        return sdpa(query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1),
                    attn_mask=mask)

    def shared_no_mask():
        return sdpa(query, key, value, enable_gqa=True)

    return {"grouped rows + mask": grouped, "repeat_kv copies + mask": copied,
            "enable_gqa, no mask (lower bound)": shared_no_mask}


def _seconds_per_call(call, device: str, iterations: int) -> float:
    import torch

    for _ in range(3):
        call()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iterations
    t0 = time.perf_counter()
    for _ in range(iterations):
        call()
    return (time.perf_counter() - t0) / iterations


def run_attention(args, work) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    kernels = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    generator = torch.Generator(device=device).manual_seed(0)
    query, key, value, mask = _inputs(args.batch, args.keys, device, dtype, generator)
    with torch.no_grad():
        reference = _layouts(query.float(), key.float(), value.float(), mask)["repeat_kv copies + mask"]()
    cache_bytes = 2 * key.numel() * key.element_size()
    rows = []
    for layout, call in _layouts(query, key, value, mask).items():
        for kernel, backend in kernels.items():
            row = {"layout": layout, "kernel": kernel}
            try:
                with torch.no_grad(), sdpa_kernel(backend) if backend is not None else nullcontext():
                    out = call()
                    seconds = _seconds_per_call(call, device, args.steps)
            except RuntimeError as e:  # the kernel does not take this input (mask, dtype, device)
                row["unsupported"] = str(e).splitlines()[0][:120]
                rows.append(row)
                continue
            difference = None if "no mask" in layout else (out.float() - reference).abs().max().item()
            row.update(microseconds=round(seconds * 1e6, 1), cache_gb_per_s=round(cache_bytes / seconds / 1e9, 1),
                       max_abs_difference=difference, per_token_ms=round(seconds * LAYERS * 1e3, 2))
            rows.append(row)
    return {"what": "attention", "batch": args.batch, "keys": args.keys, "dtype": args.dtype,
            "cache_mb_per_layer": round(cache_bytes / 1e6, 1), "rows": rows}
