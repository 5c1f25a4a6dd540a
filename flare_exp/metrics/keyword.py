"""The original scripts' and the FLARE25-QWen2.5VL baseline's keyword metrics, for comparison with their published numbers.

Those numbers come from regex keyword heuristics in the baseline's ``utils/metrics.py``: a weighted
"GREEN" (entity 0.30, location 0.20, negation 0.15, temporal 0.10, measurement 0.10, clinical significance
0.10, structure 0.05) and a "clinical efficacy" that is a keyword-category match rate. Only that exact file
reproduces them, so we run it from the user's own checkout (``eval.keyword_metrics.module``) instead of
re-typing it, and report its numbers under honest names: ``keyword_green``, ``keyword_clinical_efficacy``.
They are never called GREEN or clinical efficacy here: the real GREEN is the LLM judge (metrics/green.py),
clinical efficacy in the literature is CheXbert F1 (metrics/chexbert.py).
"""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

# The reference file's component weights of the keyword "GREEN". Used to check that the file we were given is the
# definition the published numbers used (overall mean = weighted sum of component means, by linearity).
COMPONENT_WEIGHTS = {"entity_matching": 0.30, "location_accuracy": 0.20, "negation_handling": 0.15,
                     "temporal_accuracy": 0.10, "measurement_accuracy": 0.10, "clinical_significance": 0.10,
                     "structure_completeness": 0.05}
REQUIRED = ("calculate_green_score", "calculate_clinical_efficacy_score")
HINT = ("eval.keyword_metrics.module must point to utils/metrics.py of a local checkout of "
        "github.com/medfm-flare/FLARE25-QWen2.5VL (the file the original scripts' and the baseline's numbers come from)")


def load_reference_module(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.keyword_metrics.module={path}: no such file. {HINT}")
    spec = importlib.util.spec_from_file_location("flare_keyword_reference_metrics", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise RuntimeError(f"eval.keyword_metrics.module={path} failed to import: {e}") from e
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise ValueError(f"eval.keyword_metrics.module={path} has no {', '.join(missing)}. {HINT}")
    return module


def weighted_overall(components: dict[str, float]) -> float | None:
    if not all(k in components for k in COMPONENT_WEIGHTS):
        return None
    return sum(w * components[k] for k, w in COMPONENT_WEIGHTS.items())


def keyword_metrics(module, predictions: list[str], references: list[str], seed_bleu: float | None = None) -> dict:
    """keyword_green (+ its components), keyword_clinical_efficacy; a check of our seed_bleu against the file's
    BLEU when it has one."""
    green = module.calculate_green_score(list(predictions), list(references))
    if "overall_mean" not in green:
        raise ValueError(f"calculate_green_score returned no overall_mean (keys: {sorted(green)[:8]}). {HINT}")
    components = {k: float(green[f"{k}_mean"]) for k in COMPONENT_WEIGHTS if f"{k}_mean" in green}
    out = {"keyword_green": float(green["overall_mean"]),
           **{f"keyword_green/{k}": v for k, v in components.items()},
           "keyword_clinical_efficacy": float(module.calculate_clinical_efficacy_score(list(predictions),
                                                                                       list(references)))}
    expected = weighted_overall(components)
    if expected is not None and not math.isclose(expected, out["keyword_green"], abs_tol=1e-6):
        log.warning("keyword_green %.6f is not the reference weighted sum of its components (%.6f): the file "
                    "at eval.keyword_metrics.module is not the definition behind the published numbers",
                    out["keyword_green"], expected)
        out["keyword_green_note"] = "components do not combine with the published weights (another version?)"
    bleu = getattr(module, "calculate_bleu_score", None)
    if seed_bleu is not None and callable(bleu):
        reference = float(bleu(list(predictions), list(references)))
        out["seed_bleu_matches_reference"] = math.isclose(reference, seed_bleu, abs_tol=1e-9)
        if not out["seed_bleu_matches_reference"]:
            log.warning("seed_bleu %.6f differs from the reference file's BLEU %.6f", seed_bleu, reference)
    return out
