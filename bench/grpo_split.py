"""Where a GRPO step's time goes (``bench.run grpo``): TRL's own methods timed while the rl stage trains.

- rollout: ``GRPOTrainer._generate`` (the completions: the graph loop or generate, with TRL's preparation);
- old_ref_logprobs: ``_get_per_token_logps_and_entropies`` without gradients (the old policy's and the
  reference model's log-probabilities, where the settings need them);
- reward: ``_calculate_rewards`` (the reward functions: RadGraph and the rest);
- loss_forward: the same log-probabilities with gradients (the loss's forward);
- backward: ``Accelerator.backward``;
- other: the rest of ``training_step`` (advantages, masks, the loss itself, data movement).

Each timed call waits for the GPU before and after it (the parts then add up; the waits cost a few
milliseconds a step). The optimizer step is outside ``training_step``: step_seconds_median minus the parts'
sum is it plus the logging.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict

PARTS = ("rollout", "old_ref_logprobs", "reward", "loss_forward", "backward", "other")


def _wait_for_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepSplit(contextlib.AbstractContextManager):
    """While open, seconds per part (PARTS) per optimizer step of every GRPOTrainer."""

    def __init__(self):
        self.per_step: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._step = 0
        self._patched = []

    def _timed(self, owner, name: str, part):
        """``owner.name`` timed into ``part`` (a name, or a function of whether gradients are on)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            import torch

            label = part(torch.is_grad_enabled()) if callable(part) else part
            _wait_for_gpu()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _wait_for_gpu()
                self.per_step[self._step][label] += time.perf_counter() - start

        self._patched.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self):
        from accelerate import Accelerator
        from trl import GRPOTrainer

        self._timed(GRPOTrainer, "_generate", "rollout")
        self._timed(GRPOTrainer, "_get_per_token_logps_and_entropies",
                    lambda grad: "loss_forward" if grad else "old_ref_logprobs")
        self._timed(GRPOTrainer, "_calculate_rewards", "reward")
        self._timed(Accelerator, "backward", "backward")
        original_step = GRPOTrainer.training_step
        split = self

        def training_step(trainer, *args, **kwargs):
            split._step = trainer.state.global_step
            _wait_for_gpu()
            start = time.perf_counter()
            try:
                return original_step(trainer, *args, **kwargs)
            finally:
                _wait_for_gpu()
                split.per_step[split._step]["training_step"] += time.perf_counter() - start

        self._patched.append((GRPOTrainer, "training_step", original_step))
        GRPOTrainer.training_step = training_step
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        return False

    def medians(self, skip: int) -> dict[str, float]:
        """Per part, the median seconds over the optimizer steps after the first ``skip`` (compilation)."""
        steps = [parts for step, parts in sorted(self.per_step.items()) if step >= skip]
        if not steps:
            return {}
        for parts in steps:
            parts["other"] = parts["training_step"] - sum(parts[p] for p in PARTS if p != "other")
        return {part: round(statistics.median(parts[part] for parts in steps), 4) for part in PARTS}
