"""Reward throughput: the flare reward (F1-RadGraph + ROUGE-L + format) on report completions, the way a GRPO
step calls it (groups of num_generations completions sharing one reference), with a RadGraph model of
radgraph-xl's shapes and random weights (flare_exp.fixtures.tiny_radgraph, size=base; no download).

    python -m bench.run reward --samples 64 --num-generations 8 --out bench_out/

For each device (cpu, and cuda when there is one): completions/s of the whole reward through our scorer (each
distinct report parsed once, gradients off), through radgraph's own F1RadGraph pair by pair
(reward.radgraph.cache_size=0, gradients off), and that path as radgraph runs it (gradients recorded), on fresh
scorers, so nothing is cached from a previous measurement.
"""
from __future__ import annotations

import contextlib
import random
import time

from bench.common import compose


def reports(n: int, words: int, seed: int) -> list[str]:
    vocab = ("no acute cardiopulmonary abnormality the heart size is normal lungs are clear pleural effusion "
             "pneumothorax mediastinum unremarkable degenerative changes of thoracic spine mild cardiomegaly "
             "right lower lobe opacity concerning for pneumonia .").split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=words)) for _ in range(n)]


def run_reward(args, work) -> dict:
    import torch

    from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph
    from flare_exp.rewards import combine
    from flare_exp.metrics import radgraph_f1

    model_dir = build_tiny_radgraph(work / f"radgraph-{args.radgraph_size}", size=args.radgraph_size)
    groups = max(1, args.samples // args.num_generations)
    refs = reports(groups, 50, seed=1)
    completions = reports(groups * args.num_generations, 50, seed=2)
    answers = [refs[i // args.num_generations] for i in range(len(completions))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    paths = (("each report once", 100000, False), ("F1RadGraph per pair", 0, False),
             ("F1RadGraph per pair, gradients recorded (radgraph as is)", 0, True))
    for device in devices:
        for path, cache_size, with_grad in paths:
            radgraph_f1._SCORERS.clear()  # a fresh scorer: load time is not counted, no parse is reused
            cfg = compose(["reward=flare", f"reward.radgraph.model_dir={model_dir}", f"reward.radgraph.device={device}",
                           f"reward.radgraph.cache_size={cache_size}"])
            reward = combine.build_reward(cfg.reward)
            reward(completions=completions[:1], task_type=["report_generation"], answer=answers[:1],
                   dataset=["IU_XRay"])  # loads the model
            reward = combine.build_reward(cfg.reward)  # the loaded model stays, the parsed graphs go
            no_grad = torch.no_grad
            if with_grad:  # what radgraph itself does: it never turns gradients off
                torch.no_grad = contextlib.nullcontext
            try:
                t0 = time.perf_counter()
                reward(completions=completions, task_type=["report_generation"] * len(completions), answer=answers,
                       dataset=["IU_XRay"] * len(completions))
                seconds = time.perf_counter() - t0
            finally:
                torch.no_grad = no_grad
            rows.append({"device": device, "path": path, "seconds": round(seconds, 3),
                         "completions_per_second": round(len(completions) / seconds, 1)})
    return {"what": "reward", "backend": "-", "batch": args.num_generations, "completions": len(completions),
            "num_generations": args.num_generations, "words_per_report": 50, "radgraph_size": args.radgraph_size,
            "rows": rows}
