"""Where a decode batch's time goes: the graph decode loop's prefill and token step, timed apart, on one GPU.

A left-padded batch of random prompts (lengths spread over the last ``--prompt-spread`` tokens up to
``--prompt-tokens``; the step's cost does not depend on the tokens) is decoded to ``--new-tokens`` forced tokens
(min_new_tokens) as infer, the rollouts and the judge decode it (the compiled step in CUDA graphs): once to
compile, then twice timed. Per batch size: the prefill's seconds, ms per decode step (the decode minus its
prefill, over the steps), the peak memory and the compile seconds. ``--lora``: the rollouts' policy (an
unmerged LoRA, as PEFT keeps it: float32 weights); ``--model judge``: GREEN's judge shapes (Llama-2-7B, fp16).
``--profile B`` runs one more decode of batch B under torch.profiler: the top GPU kernels and host calls per step.

    python3 -m bench.run build && python3 -m bench.decode_step --out DIR [--model qwen|judge] [--lora]
                                  [--batches 8 128] [--profile 8]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def qwen_model(lora: bool, decode_attention: str = "grouped"):
    from bench.common import compose
    from flare_exp.models import lora_casts
    from flare_exp.models.loading import load_model, lora_target_modules

    cfg = compose(["stage=infer", "experiment=flare", "model.path=/tmp/flare_bench/qwen3vl-4b-random",
                   "model.build_tiny=false", "model.dtype=bfloat16", "model.lora.r=16", "model.lora.alpha=16",
                   "model.lora.modules_to_save=[]", f"model.decode_attention={decode_attention}"])
    model = load_model(cfg.model, training=False).model
    if lora:  # the rollouts' policy: the base with a fresh, unmerged LoRA (B = 0 as peft starts it: made nonzero)
        import torch
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, bias="none",
                                                 target_modules=lora_target_modules(model, cfg.model.lora)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        lora_casts.use_lora_input_cast(model, cfg.model.lora.input_cast)
        model.eval()
    return model


def random_batch(rows: int, prompt: int, spread: int, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt - spread, prompt + 1, (rows,), generator=g)
    lengths[0] = prompt
    ids = torch.randint(100, min(vocab, 30000), (rows, prompt), generator=g)
    mask = (torch.arange(prompt)[None, :] >= prompt - lengths[:, None]).long()
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


def profiled(decode, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    launches = {e.key: e.count for e in events if e.key in (
        "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
        "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMemsetAsync")}
    cpu = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
    return {"wall_s": round(wall, 3), "kernel_ms_total": round(sum(e.device_time_total for e in kernels) / 1e3, 1),
            "host_calls_per_step": {k: round(v / steps, 1) for k, v in launches.items()},
            "top_kernels_ms": [(e.key[:90], e.count, round(e.device_time_total / 1e3, 2)) for e in kernels[:14]],
            "top_cpu_self_ms": [(e.key[:70], e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in cpu[:12]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="qwen", choices=["qwen", "judge"])
    p.add_argument("--lora", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 128])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=700)
    p.add_argument("--prompt-spread", type=int, default=150)
    p.add_argument("--profile", type=int, nargs="*", default=[], help="batch sizes to profile")
    p.add_argument("--card-gib", type=float, default=None)
    p.add_argument("--decode-attention", default="grouped", help="model.decode_attention (the judge: "
                   "eval.green.decode_attention)")
    args = p.parse_args()
    import torch

    from bench.common import library_versions
    from flare_exp.models.graph_decoding import COMPILE_ON_GPU, GraphDecoder

    if args.card_gib:
        from bench.common import cap_memory

        cap_memory(args.card_gib)
    if args.model == "judge":
        from bench.green import random_judge

        from flare_exp.models.grouped_attention import use_decode_attention

        model = random_judge()
        use_decode_attention(model, args.decode_attention, "eval.green.decode_attention")
    else:
        model = qwen_model(args.lora, args.decode_attention)
    config = model.generation_config
    config.min_new_tokens, config.max_new_tokens = args.new_tokens, args.new_tokens
    config.do_sample = False
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    vocab = model.get_output_embeddings().weight.shape[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"what": "decode_step", "model": args.model, "lora": args.lora, "new_tokens": args.new_tokens,
              "decode_attention": args.decode_attention,
              "prompt_tokens": args.prompt_tokens, "versions": library_versions(),
              "device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "runs": []}

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        return value, time.perf_counter() - start

    for batch_size in args.batches:
        batch = random_batch(batch_size, args.prompt_tokens, args.prompt_spread, vocab, model.device)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        prefill = min(timed(lambda: GraphDecoder(model, None)(batch, 1, pad, config))[1] for _ in range(2))
        torch.cuda.reset_peak_memory_stats()
        decode = functools.partial(GraphDecoder(model, COMPILE_ON_GPU), batch, args.new_tokens, pad, config)
        tokens, first = timed(decode)
        times = [timed(decode)[1] for _ in range(2)]
        steps = tokens.shape[1] - 1
        run = {"batch": batch_size, "first_call_s": round(first, 1), "decode_s": [round(t, 3) for t in times],
               "prefill_s": round(prefill, 3), "steps": steps,
               "ms_per_step": round((min(times) - prefill) / steps * 1e3, 2),
               "tokens_per_s": round(batch_size * tokens.shape[1] / min(times)),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
        if batch_size in args.profile:
            run["profile"] = profiled(decode, steps)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        (out / f"decode-step-{args.model}{'-lora' if args.lora else ''}-{args.decode_attention}.json").write_text(
            json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
