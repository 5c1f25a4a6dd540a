"""The reward section's structured config (``reward.*``): per task type, the weights of the reward terms found
by name in the registry (flare_exp/rewards), the terms' shared parameters, and RadGraph's scorer."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

log = logging.getLogger(__name__)


@dataclass
class TaskRewardConfig:
    # term name -> weight; the terms are looked up in the reward registry. 0 turns a term off; a task type with
    # every term off is not rewarded (rl leaves it out; docs/stages.md).
    weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class RadGraphConfig:
    model_type: str = "radgraph-xl"
    # Directory holding <model_type>/{config.json,vocabulary/,weights.th}.
    model_dir: Optional[str] = None
    reward_level: str = "RG_ER"  # RG_E | RG_ER | RG_ER_bar
    cache_size: int = 100000
    # experiment=demo: build a tiny random RadGraph at model_dir when it is missing.
    build_tiny: bool = False
    # Where reports are parsed: auto = the job's GPU when it has one (a few hundred MB), else the CPU.
    device: str = "auto"


@dataclass
class RewardConfig:
    name: str = MISSING
    clip_min: float = -2.0
    clip_max: float = 2.0
    # Score given when a completion is not a string (None, a number, ...), instead of crashing a GRPO step.
    invalid_completion: float = -1.0
    report_generation: TaskRewardConfig = field(default_factory=TaskRewardConfig)
    classification: TaskRewardConfig = field(default_factory=TaskRewardConfig)
    multi_label: TaskRewardConfig = field(default_factory=TaskRewardConfig)
    regression: TaskRewardConfig = field(default_factory=TaskRewardConfig)
    # Per-term parameters (term name -> {param: value}), shared by every task type that uses the term.
    terms: Dict[str, Any] = field(default_factory=dict)
    radgraph: RadGraphConfig = field(default_factory=RadGraphConfig)


def check_reward_weights(reward) -> None:
    """A NaN or infinite weight stops here, naming the key (it would poison every GRPO advantage); a negative
    one is allowed (a penalty) and said."""
    from flare_exp.data.records import TASK_TYPES

    for task in TASK_TYPES:
        for term, weight in (reward[task].weights or {}).items():
            key = f"reward.{task}.weights.{term}"
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"{key}={weight!r}: a reward weight must be a finite number")
            if weight < 0:
                log.warning("%s=%s is negative: the term is a penalty", key, weight)
