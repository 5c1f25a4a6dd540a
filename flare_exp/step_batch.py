"""What one optimizer step of a training stage holds, for its summary and log (sft_summary.json / rl_summary.json
"effective_batch"): the configured split, the training set's size where it caps a step, and each epoch's shorter
last step."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def effective_batch(section, world: int, samples: int | None = None, stage: str = "sft") -> dict:
    """What one optimizer step sees, for the summary (and the log line). Beyond the ``samples`` of the training
    set the Trainer ends an accumulation with the epoch: every step is one epoch (8 x 50 said 400 samples a step
    where each held the 192 there were), said once and recorded as what a step holds."""
    per_step = section.per_device_train_batch_size * world
    configured = per_step * section.gradient_accumulation_steps
    if samples is None or configured <= samples:
        return {"world_size": world, "effective_batch": configured, **epoch_end_step(samples, configured, stage)}
    fits = (f"{stage}.gradient_accumulation_steps={samples // per_step} or less keeps the batch you set"
            if samples >= per_step else f"{stage}.per_device_train_batch_size={max(1, samples // world)} or less "
            "holds one batch (a larger one is filled by the whole set)")
    log.warning("%s: %d per device x %d accumulation x %d rank(s) = %d samples per optimizer step, but the training "
                "set holds %d: the Trainer ends each accumulation with the epoch, so every step is one epoch of %d "
                "samples (%s)", stage, section.per_device_train_batch_size, section.gradient_accumulation_steps, world,
                configured, samples, samples, fits)
    return {"world_size": world, "effective_batch": samples, "effective_batch_configured": configured}


def epoch_end_step(samples: int | None, configured: int, stage: str) -> dict:
    """A set that does not divide into steps of ``configured``: the Trainer ends each epoch with a shorter step
    (its last accumulation takes the batches left), said once and recorded as what that step holds."""
    last = samples - (-(-samples // configured) - 1) * configured if samples else configured
    if last == configured:
        return {}
    log.info("%s: the training set's %d samples do not divide into optimizer steps of %d: each epoch ends with a "
             "step of %d (its gradient the mean over those)", stage, samples, configured, last)
    return {"epoch_last_step_samples": last}
