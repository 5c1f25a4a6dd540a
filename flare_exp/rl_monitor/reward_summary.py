"""The numbers a GRPO run ends with (rl_summary.json, the log's last line, a sweep's ranking): each reward metric's
mean over the last quarter of the logged steps (steady against one step's noise: ``reward_last`` is that mean of
the reward), with the first and last logged step's reward beside it."""
from __future__ import annotations

import statistics


def reward_line(summary: dict) -> str:
    """The first logged reward, the last logged steps' mean (reward_last: what a sweep ranks by) and the last."""
    if "reward_last" not in summary:
        return "no reward logged"
    first, last = summary["reward_last_steps"]
    if first == last:
        line = f"reward {summary['reward_first']} at the first logged step, {summary['reward_last']} at step {last}"
    else:
        line = (f"reward {summary['reward_first']} at the first logged step, mean {summary['reward_last']} over "
                f"logged steps {first}-{last} (reward_last), {summary['reward_last_step']} at step {last}")
    return line + (f"; {summary['reward_note']}" if "reward_note" in summary else "")


def ending(summary: dict) -> str:
    """How an rl run ended, for its last log line and the runs listing: a run the alarm or the pruner stopped
    must not read as one that trained its rl.max_steps (the alarm's findings: its warning, rl_summary.json)."""
    early = summary.get("stopped_early")
    if not isinstance(early, dict):
        return "finished"
    return f"stopped early at step {early.get('step')} of {early.get('max_steps')} by {early.get('why')}"


def stop_note(summary: dict) -> str | None:
    """``ending`` of a run the alarm or the pruner stopped short of rl.max_steps, else None (a plain finish)."""
    return ending(summary) if isinstance(summary.get("stopped_early"), dict) else None


def summarise(history: list[dict], global_step: int) -> dict:
    """Final numbers for sweep comparison: the mean of the last quarter of logged steps, per metric."""
    steps = [h for h in history if "reward" in h]
    tail = steps[-max(1, len(steps) // 4):] if steps else []
    out = {"global_step": global_step, "logged_steps": len(steps)}
    keys = {k for h in tail for k in h if k == "reward" or k.startswith(("reward_term/", "rewards/")) or
            k in ("reward_std", "completions/mean_length", "step_seconds", "peak_memory_gib")}
    for k in sorted(keys):
        values = [h[k] for h in tail if isinstance(h.get(k), (int, float))]
        if values:
            out[f"{k}_last" if k == "reward" else k] = round(statistics.fmean(values), 4)
    quiet = sorted({k for h in steps for k in h if k.startswith("reward_term/")} - set(out))
    if quiet:  # every term the run logged has its key: null where its task had no prompt in the last quarter
        out.update(dict.fromkeys(quiet))
        out["reward_term_note"] = (f"{', '.join(quiet)}: null, no prompt of the task in the last quarter's steps; "
                                   "a sweep report's reward_term_all/* are the whole run's means")
    if steps:  # the ends themselves beside the tail's mean (reward_last: a mean, steady for ranking a sweep)
        out.update(reward_first=round(steps[0]["reward"], 4), reward_last_step=round(steps[-1]["reward"], 4),
                   reward_last_steps=[tail[0].get("step"), tail[-1].get("step")])
        last = steps[-1].get("step")
        if isinstance(last, int) and last < global_step:  # trained on, its rewards never logged (or lost)
            out["reward_unlogged_steps"] = [last + 1, global_step]
            out["reward_note"] = (f"no reward logged for step{'s' if global_step > last + 1 else ''} "
                                  f"{last + 1}{f'-{global_step}' if global_step > last + 1 else ''} (a stopped "
                                  f"attempt's unlogged steps, or rl.logging_steps not reaching the end): the "
                                  f"reward numbers end at step {last}")
    return out
