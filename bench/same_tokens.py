"""The graph decode loop's tokens against generate's on the Qwen3-VL-4B-shaped random model (float32 unless
--dtype says otherwise): left-padded batches of prompts of different lengths (two-view IU_XRay-like and one-view
tasks), greedy. The loop without compilation against generate without it, and the loop compiled (CUDA graphs,
as infer runs it) against generate with its compiled static-cache step. Writes same-tokens-<dtype>.json: per
comparison the rows with equal tokens and, for the others, the first differing position.

    python3 -m bench.run build && python3 -m bench.same_tokens --out DIR [--dtype float32] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import bench_data, compose, ensure_prepared, library_versions, model_overrides  # noqa: E402


def spread_records(chat, rows: list[dict], count: int) -> list[dict]:
    """``count`` records from the longest prompt to the shortest: every row but the longest is padded."""
    rows = sorted(rows, key=lambda r: chat.sequence_length(r, with_answer=False), reverse=True)
    return [rows[round(i * (len(rows) - 1) / max(count - 1, 1))] for i in range(count)]


def compare(ours, reference) -> dict:
    """Rows equal over generate's length (generate stops when all rows have ended; the loop may add pad)."""
    ours = ours[:, :reference.shape[1]]
    differ = {}
    for row in range(reference.shape[0]):
        unequal = (ours[row] != reference[row]).nonzero()
        if len(unequal):
            differ[row] = int(unequal[0])
    return {"rows": reference.shape[0], "equal_rows": reference.shape[0] - len(differ),
            "first_difference_by_row": differ, "new_tokens": reference.shape[1]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--model-dir", default="/tmp/flare_bench/qwen3vl-4b-random")
    p.add_argument("--work", default="/tmp/flare_bench")
    p.add_argument("--decode-attention", default="grouped", help="the loop's model.decode_attention; generate "
                   "always decodes with transformers' SDPA")
    p.add_argument("--fused-prefill", action="store_true", help="the loop's model runs with model.fused_prefill; "
                   "generate's reference pauses it (transformers' own forwards)")
    p.add_argument("--eager-only", action="store_true", help="skip the compiled comparison (its compiles take "
                   "minutes on the 4B shapes in float32)")
    args = p.parse_args()
    import torch

    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.graph_decoding import COMPILE_ON_GPU, GraphDecoder
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    work = Path(args.work)
    ensure_prepared(work, 512)
    shape = SimpleNamespace(model_dir=args.model_dir, backend="hf", dtype=args.dtype, grad_ckpt="false",
                            vision_encoder="batched", long_side=None)
    cfg = compose(["stage=infer", "experiment=flare", *bench_data(work), *model_overrides(shape),
                   f"model.decode_attention={args.decode_attention}",
                   f"model.fused_prefill={'true' if args.fused_prefill else 'false'}"])
    loaded = load_model(cfg.model, training=False)
    model = loaded.model.eval()
    text_config = model.config.get_text_config()
    loops_attention = text_config._attn_implementation
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    records = spread_records(chat, read_jsonl(work / "data" / "prepared" / "val.jsonl"), args.batch)
    batch = {k: v.to(model.device) for k, v in chat.generation_batch(records).items()}
    pad = chat.tokenizer.pad_token_id
    prompt = batch["input_ids"].shape[1]

    def generated(compiled: bool):
        from flare_exp.models.fused_prefill import paused

        text_config._attn_implementation = "sdpa"  # the reference: transformers' own attention and forwards
        try:
            with torch.inference_mode(), paused():
                out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad,
                                     cache_implementation="static", disable_compile=not compiled)
        finally:
            text_config._attn_implementation = loops_attention
        return out[:, prompt:]

    result = {"what": "same_tokens", "dtype": args.dtype, "batch": args.batch, "prompt_tokens": prompt,
              "decode_attention": args.decode_attention, "fused_prefill": args.fused_prefill,
              "padding_per_row": (prompt - batch["attention_mask"].sum(-1)).tolist(),
              "versions": library_versions(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu"}
    loop = GraphDecoder(model, None)(batch, args.new_tokens, pad)
    result["eager loop vs generate"] = compare(loop, generated(compiled=False))
    if torch.cuda.is_available() and not args.eager_only:
        loop = GraphDecoder(model, COMPILE_ON_GPU)(batch, args.new_tokens, pad)
        result["compiled loop vs compiled generate"] = compare(loop, generated(compiled=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fused = "-fused" if args.fused_prefill else ""
    (out / f"same-tokens-{args.dtype}-{args.decode_attention}{fused}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
