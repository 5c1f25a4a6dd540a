"""The GREEN judge, the package's way against ours, side by side in one process on one GPU.

A random judge of GREEN-radllama2-7b's shapes (Llama-2-7B: 32 layers, hidden 4096, 32 heads, no grouped-query
attention, fp16) judges prompts of ~``--prompt-tokens`` tokens (a tokenizer trained on GREEN's prompt, reports
lengthened to reach it); every judgment is forced to ``--new-tokens`` tokens through the model's generation
config (``min_new_tokens`` = the cap), so both ways decode the same amount.
- package: batches of 8 in input order through ``generate`` (dynamic cache), as the GREEN package runs;
- control: the same at batch 16: with random weights the fp16 logits are near-ties everywhere, so another batch
  composition alone changes judgments; its share of identical judgments is the baseline for ours;
- ours: ``GreenJudge`` with the graph decode loop, length-sorted batches of ``--batch``, timed end to end
  (compilation included) and again warm.
Writes one JSON: judgments/s, peak memory, and the share of identical judgments on the prompts both judged.

    python3 -m bench.green --out DIR [--prompts 256] [--package-prompts 64] [--batch 64 96|auto] [--new-tokens 300]
                           [--card-gib 80]

``--batch auto`` is the batch eval.green.batch_size=auto picks on this card (from the longest prompt + the new
tokens, at most ``--max-length``);
``--card-gib`` caps the process as bench.run does (a smaller card emulated); ``--package-prompts 0`` skips the
package's and the control's runs.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

WORDS = ("heart size normal lungs clear no pleural effusion pneumothorax mild cardiomegaly opacity left lower "
         "lobe atelectasis stable mediastinal contour degenerative changes spine granuloma").split()


def random_judge(vocab: int = 32000, dtype: str = "float16"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return random_on_gpu(LlamaForCausalLM, config, dtype)


def random_on_gpu(model_class, config, dtype: str):
    """A randomly initialised model (seed 0) built on the GPU in ``dtype``."""
    import torch

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device("cuda"):
        model = model_class(config).eval()
    torch.set_default_dtype(default)
    return model


def pairs(n: int, words: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    make = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))  # noqa: E731
    return [make() for _ in range(n)], [make() for _ in range(n)]


def timed(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--package-prompts", type=int, default=64)
    parser.add_argument("--batch", nargs="+", default=["64", "96"], help="batch sizes, or auto")
    parser.add_argument("--max-length", type=int, default=2048, help="eval.green.max_length")
    parser.add_argument("--card-gib", type=float, default=None)
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--prompt-tokens", type=int, default=800)
    parser.add_argument("--decode-attention", nargs="+", default=["grouped"],
                        help="eval.green.decode_attention settings, each run at every batch (split_kv+shared: "
                             "with eval.green.shared_prefix); identical_to_first: the share of judgments equal to "
                             "the first setting's at that batch")
    parser.add_argument("--dtype", default="float16", help="the random judge's (float32: equal outputs are the "
                        "correctness test)")
    args = parser.parse_args()
    if args.card_gib:
        from bench.common import cap_memory

        cap_memory(args.card_gib)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from flare_exp.metrics.green import make_prompt
    from flare_exp.metrics.green_judge import GreenJudge, judge_tokenizer
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    corpus = make_prompt(" ".join(WORDS), " ".join(WORDS)) * 8
    path = build_tiny_causal_lm("/tmp/flare_bench/judge-tokenizer", vocab_size=2000, corpus=corpus)
    tokenizer = judge_tokenizer(path)
    model = random_judge(dtype=args.dtype)
    model.generation_config.min_new_tokens = args.new_tokens  # every judgment as long as the cap
    settings = dict(max_new_tokens=args.new_tokens, parser="package")
    package = GreenJudge(model, tokenizer, batch_size=8, decode_loop="generate", **settings)
    length = lambda texts: sum(len(tokenizer(t)["input_ids"]) for t in texts) / len(texts)  # noqa: E731
    bare = length([package.render(make_prompt("", ""))])
    per_word = (length([package.render(make_prompt(" ".join(WORDS * 4), ""))]) - bare) / (len(WORDS) * 4)
    refs, cands = pairs(args.prompts, int(max(args.prompt_tokens - bare, 2) / per_word * 2 / 3))
    texts = [package.render(make_prompt(r, c)) for r, c in zip(refs, cands)]
    result = {"judge": f"random Llama-2-7B shapes, {args.dtype}", "new_tokens": args.new_tokens,
              "prompt_tokens_mean": length(texts), "card_gib": args.card_gib, "max_length": args.max_length,
              "row_tokens": package.row_tokens(refs, cands), "runs": []}  # the longest row: what memory grows by
    save = lambda: (out_dir / "green-judge.json").write_text(json.dumps(result, indent=2) + "\n")  # noqa: E731
    print(json.dumps(result), flush=True)
    n = args.package_prompts
    judged = {}
    for name, batch in (("package: generate, batch 8, input order", 8), ("control: generate, batch 16", 16)):
        way = GreenJudge(model, tokenizer, batch_size=batch, decode_loop="generate", **settings)
        judged[batch], seconds, peak = timed(
            lambda: [o for i in range(0, n, batch) for o in way.generate(texts[i:i + batch])])
        result["runs"].append({"way": name, "prompts": n, "seconds": seconds, "judgments_per_s": n / seconds,
                               "peak_gib": peak, "identical_to_package": sum(
                                   a == b for a, b in zip(judged[batch], judged[8])) / n} if n else {
                                   "way": name, "skipped": "--package-prompts 0"})
        print(json.dumps(result["runs"][-1]), flush=True)
        save()
    package_out = judged[8]
    for batch in (b if b == "auto" else int(b) for b in args.batch):
        first_way = None
        for attention in args.decode_attention:
            outputs = judge_with(model, tokenizer, batch, attention, args, settings, refs, cands, result, save,
                                 package_out, n)
            if outputs is None:
                break
            first_way = first_way or outputs
            result["runs"][-1]["identical_to_first"] = sum(a == b for a, b in zip(outputs, first_way)) / len(refs)
            print(json.dumps(result["runs"][-1]), flush=True)
    save()


def judge_with(model, tokenizer, batch, attention, args, settings, refs, cands, result, save, package_out, n):
    """One decode attention at one batch: a first (compiling) pass and a warm one; the warm outputs (None: out
    of memory)."""
    import torch
    from flare_exp.metrics.green_judge import GreenJudge
    from flare_exp.models.grouped_attention import use_decode_attention

    torch._dynamo.reset()
    model.config._attn_implementation = "sdpa"  # then the setting's own
    use_decode_attention(model, attention.removesuffix("+shared"), "eval.green.decode_attention")
    ours = GreenJudge(model, tokenizer, batch_size=batch, decode_loop="graph", max_length=args.max_length,
                      shared_prefix=attention.endswith("+shared"), **settings)
    out = None
    for phase in ("first (compiles)", "warm"):
        try:
            out, seconds, peak = timed(lambda: ours.judge(refs, cands))
        except torch.OutOfMemoryError as e:
            result["runs"].append({"way": f"ours: graph loop, batch {batch}, {attention}", "error": str(e)[:200]})
            print(json.dumps(result["runs"][-1]), flush=True)
            return None
        if batch == "auto":
            print(f"--batch auto -> {ours.batch_choice}", flush=True)
            batch = ours.batch_size
        same = sum(a == b for a, b in zip(out[:n], package_out)) / n if n else None
        result["runs"].append({"way": f"ours: graph loop, batch {batch}, {attention}, {phase}",
                               "prompts": len(refs), "seconds": seconds, "judgments_per_s": len(refs) / seconds,
                               "peak_gib": peak, "identical_to_package": same})
        print(json.dumps(result["runs"][-1]), flush=True)
        save()
    ours.decoder.release_cache()  # the next way's cache and compiled step in the memory this one held
    del ours
    torch._dynamo.reset()
    __import__("gc").collect()
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
