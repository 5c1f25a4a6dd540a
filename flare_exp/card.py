"""Settings sized by the card a stage lands on: its memory, read once, and a per-token memory model.

Every coefficient of the model lives in MEMORY_MODEL below, with where it was measured; `python -m bench.run
coefficients OUT_DIR` re-measures them from a folder of bench results (bench/card.py). The rules:

- SFT (hf backend): the effective batch the user configured (micro-batch x accumulation) is kept; the micro-batch
  is the largest divisor of it (<= 16) whose batches of a typical sample train without recomputation inside the
  card, unless a micro-batch twice as large fits with recomputation; the token budget
  (sft.recompute_above_tokens) is what fits without recomputation. Liger and compiled blocks go on with it.
- GRPO: the completions per step are kept; the micro-batch is the largest divisor (<= 16) that fits recomputed;
  rl.recompute_every_n_layers=auto: as few of its layers recompute as the rest of the card holds.
- infer.batch_size=auto and eval.green.batch_size=auto: the largest batch whose KV cache and activations fit,
  capped at the batch measured fastest; without a GPU, the CPU defaults (INFER_CPU_BATCH, GREEN_CPU_BATCH).
- infer.inputs_ahead=auto: the next batch's input is built beside the decode wherever the batch fits the card.

A value the user sets is never overridden: batch sizes are sized only where they say ``auto``; SFT's split only
under sft.card_preset=auto (``none`` keeps the configured split).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

CARD_GIB_ENV = "FLARE_EXP_CARD_GIB"  # the memory the settings see (a shared card; the bench's emulated caps)
AUTO = "auto"

# GiB, unless said. Measured with bench/ on one H200 (random Qwen3-VL-4B-shaped weights, LoRA r=16, bf16,
# IU_XRay-like samples: two 512-px views + a short answer, ~700 tokens), docs/performance.md "Run history".
MEMORY_MODEL = {
    # weights, LoRA's optimizer state, workspace: ~10 GiB measured under every batch; 2 more kept free
    "sft_reserved_gib": 12.0,
    # activations per 1,000 tokens of a micro-batch without recomputation: 8.0-8.9 measured (report shape, two
    # 512-px views, one 1024-px image: 101.6 GiB for 10,600 tokens), 2026-12-02; Liger + compiled blocks less
    # (16 x ~700 tokens at 77 GiB), the larger one kept
    "sft_gib_per_1k_tokens": 9.0,
    # ... with every layer recomputed: 16 x ~1,060 tokens at 21.4 GiB (2026-12-02 call 2), 4 x 4 at 10.7
    "sft_recomputed_gib_per_1k_tokens": 0.7,
    "sft_sample_tokens": 700,  # a typical FLARE sample (two 512-px views + answer); longer batches recompute
    "sft_largest_budget": 12000,  # the largest budget measured (H200: 77 GiB); larger ones are not proven
    "sft_largest_micro_batch": 16,
    # infer: weights + vision encoder workspace, and per report (prompt + new tokens). Under 24 and 40 GiB caps
    # (2026-12-03, four calls) the peaks of batches 24 / 32 / 48 / 72 of 684-token reports lie on one line,
    # 8.4 GiB + 0.196 GiB per report (0.286 per 1,000 tokens; every residual <= 0.02 GiB); 1.1 GiB kept above
    # the intercept. Without a cap the allocator keeps more cached (53.9 GiB at batch 128), not a need.
    "infer_reserved_gib": 9.5,
    "infer_gib_per_1k_tokens": 0.29,
    "infer_prompt_tokens": 700,
    "infer_largest_batch": 128,  # 128 made 28 reports/s against 16 at 32; larger not measured
    # infer.inputs_ahead needs no room of its own: under caps (H100, two 512-px views + 128 new tokens; 2026-12-06,
    # seventeenth session) the peaks with the next batch's input built ahead equal those built in turn: 27.24 GiB
    # at batch 96 and 30.39 at 112 under 40 GiB (each pair in one call), 33.54 at 128 under 48 (uncapped in turn:
    # 33.54), 17.80 at 48 under 24 (the line above: 17.8). The input is ~0.012 GiB per report (float32 pixel
    # values), built while the decode's working set is below the prefill's peak. Without a cap the allocator
    # caches more for the second stream (53.9 against 33.5 GiB at batch 128), not a need.
    # GREEN-radllama2-7b (fp16, no grouped-query attention): per judgment, its row of KV cache (0.5 GiB per 1,000
    # tokens) and the prefill's activations. Under 24, 40 and 48 GiB caps (2026-12-04, two calls) the peaks of
    # batches 5 / 8 / 16 / 24 / 32 of rows up to 1,216 tokens (916-token prompts + 300 new) lie on one line:
    # 12.58 GiB (the weights) + 0.68 GiB per judgment (0.56 per 1,000 tokens; every residual <= 0.03 GiB); 0.7
    # GiB kept above the intercept. A row spans eval.green.max_length tokens unless eval.green.max_new_tokens
    # is set (then the longest prompt + that). Batch 96 measured fastest on an H200 (2026-12-01)
    "green_reserved_gib": 13.3,
    "green_gib_per_1k_tokens": 0.56,
    "green_largest_batch": 96,
    # GRPO (rl.recompute_every_n_layers=auto): the merged rollout weights' copy (rl.rollout_weights=merged,
    # Qwen3-VL-4B: 7.6 GiB), and the activations a micro-batch keeps per 1,000 tokens when no layer recomputes,
    # beyond the recomputed pass's. Measured on an H100 (2026-12-06, one box, bench/run.py grpo 8 x 256, 8
    # completions of ~956 tokens as the card estimate counts them): peaks 21.29 / 43.22 / 54.74 GiB with every
    # layer / every 2nd / every 4th recomputing: the kept half is 21.93 GiB, the kept three quarters 33.45, i.e.
    # 5.74 and 5.83 GiB per 1,000 tokens kept in full
    "rl_merged_copy_gib": 7.6,
    "rl_kept_gib_per_1k_tokens": 5.8,
    "usable_fraction": 0.92,  # of the card: the allocator's fragmentation and other processes' contexts
}
SFT_CARD_PRESETS = ("auto", "large", "none")
RL_CARD_PRESETS = ("auto", "none")
INFER_CPU_BATCH = 32  # the defaults before cards were sized (CPU runs and the tests keep them)
GREEN_CPU_BATCH = 16


@dataclass(frozen=True)
class Card:
    name: str
    gib: float
    source: str  # where the memory figure came from

    def __str__(self):
        return f"{self.name} ({self.gib:.0f} GiB, {self.source})"


def card_memory() -> Card | None:
    """This process's CUDA card and the memory it may use: FLARE_EXP_CARD_GIB if set, else the card's total times
    the per-process fraction torch was given (set_per_process_memory_fraction); None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    if os.environ.get(CARD_GIB_ENV):
        try:
            return Card(props.name, float(os.environ[CARD_GIB_ENV]), CARD_GIB_ENV)
        except ValueError:
            raise ValueError(f"{CARD_GIB_ENV}={os.environ[CARD_GIB_ENV]!r}: the card's memory in GiB, "
                             "e.g. 80") from None
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = fraction_of(device) if fraction_of else 1.0
    gib = props.total_memory / 2 ** 30 * fraction
    return Card(props.name, gib, "total" if fraction >= 1.0 else f"{fraction:.2f} of the card's memory")


def usable_gib(card: Card) -> float:
    return card.gib * MEMORY_MODEL["usable_fraction"]


def divisors_up_to(n: int, largest: int) -> list[int]:
    return [d for d in range(1, min(n, largest) + 1) if n % d == 0]


@dataclass(frozen=True)
class SftChoice:
    micro_batch: int
    accumulation: int
    budget: int  # tokens a batch may have and train without recomputation (0: every batch recomputes)
    rule: str


def sft_choice(card: Card, effective: int) -> SftChoice:
    """The SFT split and token budget for ``effective`` samples per device and optimizer step on ``card``."""
    m = MEMORY_MODEL
    free = usable_gib(card) - m["sft_reserved_gib"]
    budget = int(max(0.0, free) * 1000 / m["sft_gib_per_1k_tokens"]) // 500 * 500
    budget = min(budget, m["sft_largest_budget"])
    options = divisors_up_to(effective, m["sft_largest_micro_batch"])
    kept = [d for d in options if d * m["sft_sample_tokens"] <= budget]
    recomputed = [d for d in options if d * m["sft_sample_tokens"] * m["sft_recomputed_gib_per_1k_tokens"] / 1000
                  <= free] or [1]
    no_recompute, recompute = max(kept, default=0), max(recomputed)
    if no_recompute and 2 * no_recompute >= recompute:
        rule = (f"{no_recompute} x {m['sft_sample_tokens']} tokens train without recomputation under a budget of "
                f"{budget} tokens ({m['sft_gib_per_1k_tokens']} GiB per 1,000)")
        return SftChoice(no_recompute, effective // no_recompute, budget, rule)
    rule = (f"{recompute} recomputed ({m['sft_recomputed_gib_per_1k_tokens']} GiB per 1,000 tokens) beats "
            f"{no_recompute or 'no'} sample(s) without recomputation (budget {budget} tokens)")
    return SftChoice(recompute, effective // recompute, budget if budget >= m["sft_sample_tokens"] else 0, rule)


def rl_micro_batch(card: Card, completions: int, sequence_tokens: int) -> int:
    """GRPO: the largest divisor (<= 16) of the completions per step whose recomputed step fits the card."""
    m = MEMORY_MODEL
    free = usable_gib(card) - m["sft_reserved_gib"]
    per_sample = sequence_tokens * m["sft_recomputed_gib_per_1k_tokens"] / 1000
    return max([d for d in divisors_up_to(completions, m["sft_largest_micro_batch"]) if d * per_sample <= free]
               or [1])


def kept_share(every_n_layers) -> float:
    """The share of a pass's activations the layers that do not recompute keep, for rl.recompute_every_n_layers:
    none at 1 (and auto, before it is sized), all at 0, (n-1)/n at n."""
    n = every_n_layers
    return 0.0 if n in (1, AUTO) else 1.0 if n == 0 else 1 - 1 / n


def rl_recompute_every(card: Card | None, micro_batch: int, sequence_tokens: int) -> tuple[int, str]:
    """rl.recompute_every_n_layers=auto: (n, why). n = 0 (no layer recomputes) where the micro-batch's
    activations all fit beside the run's other memory, else the largest n whose kept (n-1)/n of them fit; 1
    (every layer recomputes) without a GPU or room."""
    m = MEMORY_MODEL
    if card is None:
        return 1, "no GPU: every layer recomputes"
    tokens = micro_batch * sequence_tokens / 1000
    free = (usable_gib(card) - m["sft_reserved_gib"] - m["rl_merged_copy_gib"]
            - tokens * m["sft_recomputed_gib_per_1k_tokens"])
    kept_all = tokens * m["rl_kept_gib_per_1k_tokens"]
    room = free / kept_all if kept_all > 0 else 1.0  # the share of the layers' activations that fits
    n = 0 if room >= 1 else max([k for k in range(1, 65) if kept_share(k) <= room], default=1)
    what = ("no layer recomputes" if n == 0 else "every layer recomputes" if n == 1 else
            f"every {n}th layer recomputes, the others keep their activations")
    return n, (f"{card}: {what} ({micro_batch} completions of ~{sequence_tokens} tokens per pass: "
               f"{kept_all:.1f} GiB of activations kept in full, {max(free, 0):.1f} GiB of room)")


def rl_split(rl, card: Card | None, tokens: int) -> tuple[dict, str]:
    """rl.card_preset: the changed micro-batch / accumulation ({} if none) and why."""
    completions = rl.per_device_train_batch_size * rl.gradient_accumulation_steps
    if card is None:
        why = "rl.card_preset=none: as configured" if rl.card_preset == "none" else "no GPU: as configured"
        log.info("rl.card_preset=%s: %s (%d x %d completions per step)", rl.card_preset, why,
                 rl.per_device_train_batch_size, rl.gradient_accumulation_steps)
        return {}, why
    micro = rl_micro_batch(card, completions, tokens)
    why = (f"{card}: {micro} completions of ~{tokens} tokens per pass fit recomputed "
           f"({MEMORY_MODEL['sft_recomputed_gib_per_1k_tokens']} GiB per 1,000 tokens)")
    if micro <= rl.per_device_train_batch_size:
        return {}, why
    changed = {"rl.per_device_train_batch_size": [rl.per_device_train_batch_size, micro],
               "rl.gradient_accumulation_steps": [rl.gradient_accumulation_steps, completions // micro]}
    log.info("rl.card_preset=auto on %s: %s (the same %d completions per step; rl.card_preset=none keeps the "
             "configured split)", why, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), completions)
    return changed, why


def rl_recompute(cfg, card: Card | None, micro_batch: int, tokens: int) -> tuple[int, str]:
    """rl.recompute_every_n_layers=auto resolved: (n, why), logged where the card sized it."""
    model = cfg.model
    if not model.gradient_checkpointing:
        return 0, "model.gradient_checkpointing=false: nothing recomputes"
    if model.backend != "hf":
        return 1, "model.backend=unsloth: Unsloth's own checkpointing"
    if cfg.rl.card_preset != "auto":
        return 1, f"rl.card_preset={cfg.rl.card_preset}: every layer recomputes"
    n, why = rl_recompute_every(card, micro_batch, tokens)
    log.info("rl.recompute_every_n_layers=auto -> %d (%s); set rl.recompute_every_n_layers=N to choose", n, why)
    return n, why


def apply_rl_card(cfg) -> tuple[object, dict]:
    """``cfg`` with the card's choices applied (a copy when one changes a value) and the decision for the
    summary. rl.card_preset=auto: the completions per step stay, a larger micro-batch takes fewer passes per
    step (rl_split); rl.recompute_every_n_layers=auto: as few layers recompute as the card's memory allows
    (rl_recompute)."""
    import copy

    from omegaconf import OmegaConf, read_write

    from flare_exp.runtime import check_choice

    rl = cfg.rl
    check_choice("rl.card_preset", rl.card_preset, RL_CARD_PRESETS)
    card = card_memory() if rl.card_preset == "auto" else None
    tokens = MEMORY_MODEL["infer_prompt_tokens"] + rl.max_completion_length
    changed, why = rl_split(rl, card, tokens)
    whys = [why]
    if rl.recompute_every_n_layers not in (AUTO, 0) and not cfg.model.gradient_checkpointing:
        log.warning("rl.recompute_every_n_layers=%s has no effect: model.gradient_checkpointing=false, so no layer "
                    "recomputes", rl.recompute_every_n_layers)
    if rl.recompute_every_n_layers == AUTO:
        micro = changed.get("rl.per_device_train_batch_size", [0, rl.per_device_train_batch_size])[1]
        n, why = rl_recompute(cfg, card, micro, tokens)
        changed["rl.recompute_every_n_layers"] = [AUTO, n]
        whys.append(f"rl.recompute_every_n_layers=auto -> {n} ({why})")
    used = copy.deepcopy(cfg) if changed else cfg
    with read_write(used):
        for key, (_, new) in changed.items():
            OmegaConf.update(used, key, new, merge=False)
    return used, {"preset": rl.card_preset, "card": str(card) if card else None, "changed": changed,
                  "why": "; ".join(whys)}


def round_batch(n: float, largest: int) -> int:
    """A batch of at most ``largest``: a multiple of 8 from 8 up (fewer padded partial batches), else >= 1."""
    n = min(int(n), largest)
    return n // 8 * 8 if n >= 8 else max(1, n)


def infer_need_gib(batch: int, max_new_tokens: int) -> float:
    """The modelled peak of an infer batch (weights, vision workspace, prefill and KV cache), GiB."""
    m = MEMORY_MODEL
    per_report = (m["infer_prompt_tokens"] + max_new_tokens) * m["infer_gib_per_1k_tokens"] / 1000
    return m["infer_reserved_gib"] + batch * per_report


def infer_batch(card: Card | None, max_new_tokens: int) -> tuple[int, str]:
    """infer.batch_size=auto: (batch, why)."""
    m = MEMORY_MODEL
    if card is None:
        return INFER_CPU_BATCH, "no GPU: the CPU default"
    per_report = infer_need_gib(1, max_new_tokens) - m["infer_reserved_gib"]
    batch = round_batch((usable_gib(card) - m["infer_reserved_gib"]) / per_report, m["infer_largest_batch"])
    return batch, (f"{card}: {per_report:.2f} GiB per report of ~{m['infer_prompt_tokens']} + {max_new_tokens} tokens, "
                   f"at most {m['infer_largest_batch']} (the fastest measured)")


def infer_ahead_room(card: Card | None, batch: int, max_new_tokens: int) -> tuple[bool, str]:
    """infer.inputs_ahead=auto: (whether to build the next batch's input beside this batch's decode, why): where
    the batch itself fits the card (the input ahead adds nothing to the peak, MEMORY_MODEL); a batch set larger
    than that builds each input in turn, leaving what it has to the batch."""
    if card is None:
        return False, "no GPU"
    need = infer_need_gib(batch, max_new_tokens)
    return need <= usable_gib(card), (f"{card}: batch {batch} needs ~{need:.0f} GiB of {usable_gib(card):.0f} "
                                      "usable; the next batch's input adds nothing to the peak")


def green_batch(card: Card | None, row_tokens: int) -> tuple[int, str]:
    """eval.green.batch_size=auto: (batch, why) for judgments whose rows (prompt + judgment) span at most
    ``row_tokens`` (GreenJudge.row_tokens: eval.green.max_length, or the longest prompt + max_new_tokens)."""
    m = MEMORY_MODEL
    if card is None:
        return GREEN_CPU_BATCH, "no GPU: the CPU default"
    per_prompt = row_tokens * m["green_gib_per_1k_tokens"] / 1000
    batch = round_batch((usable_gib(card) - m["green_reserved_gib"]) / per_prompt, m["green_largest_batch"])
    return batch, (f"{card}: {per_prompt:.2f} GiB per judgment of up to {row_tokens} tokens, at most "
                   f"{m['green_largest_batch']} (the fastest measured)")


def check_batch(key: str, value) -> None:
    """A batch-size setting: a positive integer or ``auto``."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise ValueError(f"{key}={value!r}: a positive number of samples, or auto (sized by the card's memory)")


def sized_batch(key: str, value, size) -> tuple[int, dict]:
    """The batch for setting ``key`` = ``value``: the value itself, or for ``auto`` what ``size()`` -> (batch,
    why) gives (logged once); and the choice as a summary records it: {"key", "value", "auto", "why"}."""
    check_batch(key, value)
    if value != AUTO:
        return value, {"key": key, "value": value, "auto": False, "why": "set in the config"}
    batch, why = size()
    log.info("%s=auto -> %d (%s; set %s=N to choose)", key, batch, why, key)
    return batch, {"key": key, "value": batch, "auto": True, "why": why}


def resolve_batch(cfg, key: str, size) -> tuple[object, dict]:
    """``cfg`` with ``key`` (dotted) sized as sized_batch says (a copy when it said auto) and the choice."""
    import copy

    from omegaconf import OmegaConf, read_write

    value = OmegaConf.select(cfg, key)
    batch, choice = sized_batch(key, value, size)
    if not choice["auto"]:
        return cfg, choice
    used = copy.deepcopy(cfg)
    with read_write(used):
        OmegaConf.update(used, key, batch, merge=False)
    return used, choice


def sized_infer_batch(cfg) -> tuple[object, dict]:
    """``cfg`` with infer.batch_size=auto sized by the card and the choice (infer, and rl's held-out evals)."""
    return resolve_batch(cfg, "infer.batch_size", lambda: infer_batch(card_memory(), cfg.infer.max_new_tokens))
