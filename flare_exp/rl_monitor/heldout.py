"""Task metrics during training (rl and sft alike): every ``<stage>.eval_steps`` steps the model decodes,
greedily, a fixed stratified subset of the validation split with infer's decode loop
(:class:`flare_exp.models.batch_decoding.Decoder`), and eval's own code scores it
(:func:`flare_exp.metrics.scoring.evaluate_file` on the written predictions), so the numbers are the ones an
infer + eval run of that checkpoint would give on those records. :mod:`.heldout_watch` runs it as a Trainer
callback and keeps the best/ adapter."""
from __future__ import annotations

import hashlib
import logging
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from flare_exp.data.prepared_split import read_prepared_split
from flare_exp.io import write_json, write_jsonl
from flare_exp.metrics.official import LOWER_IS_BETTER, OFFICIAL_METRIC
from flare_exp.optuna_study import direction_of, objective_value
from flare_exp.run.layout import PREDICTIONS
from flare_exp.runtime import abspath

log = logging.getLogger(__name__)
OFFICIAL_MEAN = "official_mean"
SUBSET = "heldout_subset.json"


def stratified_subset(records: list[dict], task_types: list[str], per_task: int) -> list[dict]:
    """``per_task`` records with answers per task type, taken in turn from its datasets, each dataset's in a
    fixed order (a hash of the id: neither the file's order nor the seed decides), so every eval, every rerun
    and every trial of a search scores the same records."""
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("answer") is not None and r["task_type"] in task_types:
            by_task[r["task_type"]][str(r.get("dataset"))].append(r)
    picked = []
    for task in task_types:
        queues = [sorted(rows, key=lambda r: hashlib.sha1(str(r["id"]).encode()).hexdigest())
                  for _, rows in sorted(by_task[task].items())]
        taken = 0
        while taken < per_task and any(queues):
            for queue in queues:
                if queue and taken < per_task:
                    picked.append(queue.pop(0))
                    taken += 1
    return picked


def monitored_value(result: dict, spec: str) -> float | None:
    """The number ``<stage>.metric_for_best_model`` names, from one evaluate_file result (None when absent)."""
    if spec != OFFICIAL_MEAN:
        value = objective_value(result, spec)
        return value if value is not None and math.isfinite(value) else None
    values = [block[OFFICIAL_METRIC[task]] for task, block in result["official"].items()
              if OFFICIAL_METRIC[task] not in LOWER_IS_BETTER and block.get(OFFICIAL_METRIC[task]) is not None]
    return statistics.fmean(values) if values else None


def higher_is_better(spec: str) -> bool:
    return spec == OFFICIAL_MEAN or direction_of(spec) == "maximize"


def flat_metrics(result: dict) -> dict[str, float]:
    """Every finite number of the result as 'heldout/<task>/<metric>' (official block first)."""
    out = {}
    for section in ("by_task", "official"):
        for task, block in result[section].items():
            for k, v in block.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                        k not in ("n", "num_examples"):
                    out[f"heldout/{task}/{k}"] = round(float(v), 4)
    return out


class HeldOutEval:
    """The subset (written once to heldout_subset.json, read back on resume), the decoder and the scorers.
    ``stage``: the config section (rl, sft) whose eval_steps, eval_per_task, eval_max_new_tokens and
    metric_for_best_model apply; ``source_key``: its setting naming the prepared file to draw from;
    ``task_types``: those to draw (None: every task type of the file)."""

    def __init__(self, cfg, stage: str, out_dir: Path, task_types: list[str] | None, chat,
                 source_key: str = "eval_file"):
        section = cfg[stage]
        self.cfg, self.stage, self.out_dir, self.chat = cfg, stage, out_dir, chat
        self.every, self.spec = section.eval_steps, section.metric_for_best_model
        named = f"{stage}.{source_key}={section[source_key]}"
        source = abspath(section[source_key])
        if not source.exists():
            raise FileNotFoundError(f"{named}: {source} does not exist (the in-training eval decodes a subset of "
                                    f"it; prepare the data or turn the eval off: docs/stages.md)")
        saved = out_dir / SUBSET
        ids = read_jsonl_ids(saved) if saved.exists() else None
        records = read_prepared_split(source)
        if task_types is None:
            task_types = sorted({r["task_type"] for r in records if r.get("answer") is not None})
        self.records = ([r for r in records if r["id"] in set(ids)] if ids is not None else
                        stratified_subset(records, task_types, section.eval_per_task))
        if not self.records:
            raise ValueError(f"{named}: no records with answers of task types {task_types}")
        if ids is None:
            write_json(saved, [r["id"] for r in self.records])
        self.infer = OmegaConf.create(OmegaConf.to_container(cfg.infer, resolve=True))
        with open_dict(self.infer):  # greedy, as infer decodes for eval
            self.infer.do_sample, self.infer.min_new_tokens, self.infer.profile_batch = False, None, None
            self.infer.max_new_tokens = section.eval_max_new_tokens or cfg.infer.max_new_tokens
        self.tokens_key = f"{stage}.eval_max_new_tokens" if section.eval_max_new_tokens else "infer.max_new_tokens"
        self.decoder = self.scorers = None

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == max_steps)

    def run(self, model, step: int) -> tuple[dict, float]:
        """Decode the subset with ``model`` (eval mode, restored afterwards), score it: (result, seconds). The
        random state is training's again afterwards: loading a judge initialises weights before it reads them,
        and a sampled decode draws, so a run with evals trains on the same stream as one without."""
        import torch

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return self._run(model, step)

    def _run(self, model, step: int) -> tuple[dict, float]:
        from flare_exp.metrics.scoring import ReportScorers, evaluate_file
        from flare_exp.models.batch_decoding import Decoder, decode_in_parts
        from flare_exp.models.image_reading import batches_with_images, image_threads

        start, was_training = time.perf_counter(), model.training
        model.eval()
        try:
            if self.decoder is None:
                self.decoder = Decoder(model, self.chat, self.infer, self.cfg.model.backend, self.tokens_key)
            rows = []
            threads = image_threads(self.infer.image_threads)
            for chunk, images in batches_with_images(self.chat, self.records, self.infer.batch_size, None, threads):
                rows += [{"id": r["id"], "dataset": r["dataset"], "task_type": r["task_type"], "answer": r["answer"],
                          "prediction": p, "model": f"{self.stage} step {step}"}
                         for r, p in zip(chunk, decode_in_parts(self.decoder, chunk, images))]
        finally:
            model.train(was_training)
        step_dir = self.out_dir / "heldout" / f"step-{step}"
        write_jsonl(step_dir / PREDICTIONS, rows)  # readable afterwards; eval's code reads it
        if self.scorers is None:  # loaded once; GREEN's journal is keyed by the judged texts, so it is shared
            self.scorers = ReportScorers(self.cfg, self.out_dir / "heldout")
        _, result, _, _ = evaluate_file(step_dir / PREDICTIONS, self.scorers)
        return result, time.perf_counter() - start


def read_jsonl_ids(path: Path) -> list[str]:
    import json

    return list(json.loads(path.read_text()))
