"""The CRIMSON judge, the package's way against ours, side by side in one process on one GPU.

A random judge of MedGemma-4B's text shapes (Gemma 3: 34 layers, hidden 2560, 8 heads, 4 key-value heads of
256, five sliding-window layers of 1,024 to one global, vocabulary 262,208; bf16) judges CRIMSON's prompt
with reports lengthened to ~``--prompt-tokens`` tokens (a tokenizer trained on the prompt); every judgment
is forced to ``--new-tokens`` tokens (``min_new_tokens`` = the cap), so every way decodes the same amount.
- package: transformers' text-generation pipeline, one chat at a time, greedy (crimson-score's HF path);
- ours: ``CrimsonJudge`` (generate: the graph loop does not take sliding-window layers), length-sorted batches
  of each ``--batch``, end to end;
- ``--global-only``: the same shapes with global attention in every layer, where ours takes the graph loop
  (what a judge without sliding-window layers would get).
Writes one JSON: judgments/s, peak memory, and the share of judgments identical to the package's.

    python3 -m bench.crimson --out DIR [--prompts 64] [--package-prompts 16] [--batch 8 16 32] [--new-tokens 400]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.green import WORDS, random_on_gpu, timed


def random_judge(global_only: bool, tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layers = ["full_attention" if global_only or (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
    config = Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                              layer_types=layers, max_position_embeddings=131072,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")])
    return random_on_gpu(Gemma3ForCausalLM, config, "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--package-prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--prompt-tokens", type=int, default=1900)
    parser.add_argument("--global-only", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer, pipeline

    from flare_exp.fixtures.tiny_crimson import build_tiny_crimson_judge
    from flare_exp.metrics.crimson import make_prompt, messages
    from flare_exp.metrics.crimson_judge import CrimsonJudge

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_crimson_judge("/tmp/flare_bench/crimson-tokenizer"))
    model = random_judge(args.global_only, tokenizer)
    model.generation_config.min_new_tokens = args.new_tokens  # every judgment as long as the cap
    ours = {b: CrimsonJudge(model, tokenizer, batch_size=b, max_new_tokens=args.new_tokens) for b in args.batch}
    probe = next(iter(ours.values()))
    length = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    bare = length(probe.render_pair("", ""))
    per_word = (length(probe.render_pair(" ".join(WORDS * 4), "")) - bare) / (len(WORDS) * 4)
    words, rng = int(max(args.prompt_tokens - bare, 2) / per_word / 2), random.Random(0)
    make = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))  # noqa: E731
    refs, cands = [make() for _ in range(args.prompts)], [make() for _ in range(args.prompts)]
    result = {"judge": f"random MedGemma-4B text shapes, bf16{', global attention only' if args.global_only else ''}",
              "new_tokens": args.new_tokens, "prompt_tokens_mean": sum(length(probe.render_pair(r, c)) for r, c in
                                                                       zip(refs, cands)) / len(refs), "runs": []}
    save = lambda: (out_dir / "crimson-judge.json").write_text(json.dumps(result, indent=2) + "\n")  # noqa: E731
    n = args.package_prompts
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    package, seconds, peak = timed(lambda: [pipe(messages(make_prompt(r, c)), max_new_tokens=args.new_tokens,
                                                 max_length=None, do_sample=False)[0]["generated_text"][-1]["content"]
                                            for r, c in zip(refs[:n], cands[:n])])
    result["runs"].append({"way": "package: text-generation pipeline, batch 1", "prompts": n, "seconds": seconds,
                           "judgments_per_s": n / seconds, "peak_gib": peak})
    print(json.dumps(result["runs"][-1]), flush=True)
    save()
    for batch, judge in ours.items():
        try:
            out, seconds, peak = timed(lambda: judge.judge(refs, cands))
        except torch.OutOfMemoryError as e:
            result["runs"].append({"way": f"ours: batch {batch}", "error": str(e)[:200]})
            break
        result["runs"].append({"way": f"ours: {judge.decoding}, batch {batch}", "prompts": len(refs),
                               "seconds": seconds, "judgments_per_s": len(refs) / seconds, "peak_gib": peak,
                               "identical_to_package": sum(a == b for a, b in zip(out[:n], package)) / n})
        print(json.dumps(result["runs"][-1]), flush=True)
        save()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
