"""hydra/sweeper=optuna's settings checked at launch, each problem named with its key before any trial runs (a
misspelt sampler or pruner, or objective weights that name no objective, failed inside Hydra's sweep with a
traceback; a misspelt pruner was accepted silently wherever pruning was off)."""
from __future__ import annotations

import math

from flare_exp.optuna_study import direction_of, objective_list, objective_problems

SAMPLERS = ("tpe", "random", "nsga2", "grid")


def is_optuna(sweeper) -> bool:
    return "flare_exp_optuna" in str((sweeper or {}).get("_target_", ""))


def sweeper_problems(sweeper, green_judge: bool) -> list[ValueError]:
    """Every problem of hydra.sweeper's settings (the objectives of any sweeper that has them; for ours the rest)."""
    problems = objective_problems((sweeper or {}).get("objectives"), green_judge)
    if not is_optuna(sweeper):
        return problems
    found = [*count_problems(sweeper), *weight_problems(sweeper.get("objective_weights"),
                                                        objective_list(sweeper.get("objectives"))),
             *sampler_problems(sweeper.get("sampler")), *pruner_problems(sweeper.get("pruner"))]
    return problems + [ValueError(p) for p in found]


def count_problems(sweeper) -> list[str]:
    out = []
    for key in ("n_trials", "n_jobs"):
        value = sweeper.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            out.append(f"hydra.sweeper.{key}={value!r}: must be an integer >= 1")
    return out


def weight_problems(weights, objectives: list[str]) -> list[str]:
    """hydra.sweeper.objective_weights: null, or objective -> weight >= 0 (not all 0), objectives of one direction."""
    import difflib

    if weights is None:
        return []
    if not hasattr(weights, "items"):
        return [f"hydra.sweeper.objective_weights={weights!r}: must be a mapping objective -> weight, e.g. "
                "'{multi_label.f1_score: 1, classification.balanced_accuracy: 1}', or null"]
    out = []
    for name, weight in weights.items():
        if name not in objectives:
            near = difflib.get_close_matches(str(name), objectives, n=1)
            out.append(f"hydra.sweeper.objective_weights names {name!r}, not one of hydra.sweeper.objectives "
                       f"({', '.join(objectives)})" + (f": did you mean {near[0]}?" if near else ""))
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            out.append(f"hydra.sweeper.objective_weights.{name}={weight!r}: must be a number > 0 (an objective "
                       "without weight goes out of hydra.sweeper.objectives)")
    left_out = [o for o in objectives if o not in weights]
    if not out and left_out:
        out.append(f"hydra.sweeper.objective_weights gives no weight to {', '.join(left_out)}: the weighted mean "
                   "would leave it out (weight 0) while its name stays in the objective's; weight every objective, "
                   "or take it out of hydra.sweeper.objectives")
    directions = {o: direction_of(o) for o in objectives if o in weights}
    if not out and len(set(directions.values())) > 1:
        out.append(f"hydra.sweeper.objective_weights mixes metrics to maximise and to minimise ({directions}): "
                   "weight metrics of one direction")
    return out


def sampler_problems(sampler) -> list[str]:
    if sampler is None:
        return []
    if not hasattr(sampler, "get"):
        return [f"hydra.sweeper.sampler={sampler!r}: must be {{name: <{' | '.join(SAMPLERS)}>, seed: <int or null>}}"]
    out = []
    name, seed = str(sampler.get("name", "tpe")).lower(), sampler.get("seed")
    if name not in SAMPLERS:
        out.append(f"hydra.sweeper.sampler.name={sampler.get('name')!r}: choose {', '.join(SAMPLERS)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32):
        out.append(f"hydra.sweeper.sampler.seed={seed!r}: must be an integer from 0 to 2**32 - 1, or null")
    return out


def pruner_problems(pruner) -> list[str]:
    """The pruner's name and its arguments, built as Optuna would build them, whether or not this sweep prunes."""
    from flare_exp.optuna_pruning import make_pruner

    try:
        make_pruner(dict(pruner) if pruner is not None else None)
    except (ValueError, TypeError) as e:
        return [str(e)]
    return []
