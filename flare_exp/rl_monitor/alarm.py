"""The reward-hacking alarm: signs, read from the training log, that the policy earns reward without getting
better at the task. Over the last ``rl.alarm_window`` logged steps, split into halves, with the reward rising
(second half's mean over the first's by at least ``rl.alarm_min_rise``):

- ``heldout``: the held-out metric (rl.metric_for_best_model, from the in-training eval) got worse between the
  window's first and last eval;
- ``saturated_term``: one reward term rose and then stayed flat at its highest while another term of that task
  type fell (by at least alarm_min_rise);
- ``length_collapse``: the completions' mean length fell below ``rl.alarm_length_collapse`` x its mean over the
  run's first logged steps;
- ``length_cap``: most groups had most of their completions cut at rl.max_completion_length in most of the
  window's second half.

Rising reward is part of every condition: a policy truncated from its first step, or a term flat from the
start, is not gaming anything yet. Each finding names the term or metric and the steps."""
from __future__ import annotations

import statistics

TERM_PREFIX = "reward_term/"
FLAT = 0.02  # a term whose second-half values span less than this (and sit at its highest) is saturated


def _rise(values: list[float]) -> float:
    half = len(values) // 2
    return statistics.fmean(values[half:]) - statistics.fmean(values[:half])


def heldout_falls(window: list[dict], key: str, higher_better: bool) -> list[tuple[str, str]]:
    evals = [(h["step"], h[key]) for h in window if h.get(key) is not None]
    if len(evals) < 2:
        return []
    (s0, first), (s1, last) = evals[0], evals[-1]
    worse = last < first if higher_better else last > first
    return [("heldout", f"held-out {key.split('/', 1)[1]} fell from {first:.4g} (step {s0}) to {last:.4g} "
                        f"(step {s1})")] if worse else []


def saturated_terms(window: list[dict], history: list[dict], min_rise: float) -> list[tuple[str, str]]:
    found = []
    terms = sorted({k for h in window for k in h if k.startswith(TERM_PREFIX)})
    half = len(window) // 2
    for term in terms:
        values = [h[term] for h in window if h.get(term) is not None]
        if len(values) < 4:
            continue
        tail, highest = values[len(values) // 2:], max(h[term] for h in history if h.get(term) is not None)
        if max(tail) - min(tail) >= FLAT or max(tail) < highest - FLAT or _rise(values) < min_rise:
            continue
        task = term[len(TERM_PREFIX):].split("/")[0]
        for other in terms:
            if other == term or not other.startswith(f"{TERM_PREFIX}{task}/"):
                continue
            others = [h[other] for h in window if h.get(other) is not None]
            if len(others) >= 4 and -_rise(others) >= min_rise:
                found.append((f"saturated {term}", f"term {term[len(TERM_PREFIX):]} saturated at {tail[-1]:.4g} from step "
                             f"{window[half]['step']} while {other[len(TERM_PREFIX):]} fell by {-_rise(others):.4g}"))
    return found


def length_findings(window: list[dict], history: list[dict], collapse: float) -> list[tuple[str, str]]:
    found = []
    half = len(window) // 2
    lengths = [h["completions/mean_length"] for h in history if h.get("completions/mean_length") is not None]
    recent = [h["completions/mean_length"] for h in window[half:] if h.get("completions/mean_length") is not None]
    if len(lengths) >= len(window) and recent:
        start = statistics.fmean(lengths[:max(2, half)])
        if statistics.fmean(recent) < collapse * start:
            found.append(("length collapse", f"completion length collapsed from {start:.1f} tokens (first steps) to "
                         f"{statistics.fmean(recent):.1f} (steps {window[half]['step']}-{window[-1]['step']})"))
    capped = [h.get("completions/groups_at_cap") for h in window[half:] if h.get("completions/groups_at_cap") is not None]
    if capped and sum(share > 0.5 for share in capped) > len(capped) / 2:
        found.append(("length cap", f"most groups hit rl.max_completion_length in "
                                    f"{sum(share > 0.5 for share in capped)} of steps {window[half]['step']}-"
                                    f"{window[-1]['step']}"))
    return found


def findings(history: list[dict], window_size: int, min_rise: float, collapse: float, heldout_key: str | None,
             higher_better: bool = True) -> list[tuple[str, str]]:
    """What the alarm says about the log so far, as (kind, sentence) (empty: nothing; the kind names the
    condition and term, so a run says each once). ``history``: the Trainer's log_history."""
    steps = [h for h in history if h.get("reward") is not None]
    if len(steps) < max(4, window_size):
        return []
    window = steps[-window_size:]
    rise = _rise([h["reward"] for h in window])
    if rise < min_rise:
        return []
    span = f"reward rose by {rise:.4g} over steps {window[0]['step']}-{window[-1]['step']}"
    evals = [h for h in history if h.get("step", 0) >= window[0]["step"]] if heldout_key else []
    found = heldout_falls(evals, heldout_key, higher_better) if heldout_key else []
    found += saturated_terms(window, steps, min_rise) + length_findings(window, steps, collapse)
    return [(kind, f"{span} while {sentence}") for kind, sentence in found]


def no_signal(history: list[dict], window_size: int) -> list[tuple[str, str]]:
    """Every group's completions earned one reward (TRL's frac_reward_zero_std at 1) in each of the window's
    logged steps: GRPO's advantages were all 0 there, and the policy learned nothing from them. Not reward
    hacking (no stop, not an alarm): said once, and kept in rl_summary.json as no_learning_signal."""
    steps = [h for h in history if h.get("frac_reward_zero_std") is not None]
    if len(steps) < max(4, window_size):
        return []
    window = steps[-window_size:]
    if min(h["frac_reward_zero_std"] for h in window) < 1 - 1e-6:
        return []
    return [("no_signal", f"every group's completions earned the same reward in each logged step "
                          f"{window[0]['step']}-{window[-1]['step']} (frac_reward_zero_std 1): GRPO's advantages were 0 "
                          "and the policy learned nothing there. More varied completions (rl.temperature, "
                          "rl.num_generations), reward weights that tell them apart, or a lower rl.learning_rate (a "
                          "policy a step far too large collapsed samples one answer) give it a signal")]
