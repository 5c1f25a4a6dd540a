"""keyword_green / keyword_clinical_efficacy: the baseline's file is run as given; we check its output against
the keyword metric's component weights and its BLEU and report it under honest names."""
import json
import math
import textwrap

import pytest

from conftest import compose_cfg
from flare_exp.io import write_jsonl
from flare_exp.main import run
from flare_exp.metrics import text
from flare_exp.metrics.keyword import keyword_metrics, load_reference_module

# A stand-in with the reference file's API. Its BLEU is the reference file's definition written independently of ours
# (lower-cased whitespace tokens, per-sample clipped precision averaged over samples, geometric mean n=1..4,
# corpus brevity penalty, no smoothing); its "GREEN" returns fixed components combined with `WEIGHTS`.
STAND_IN = '''
import math
from collections import Counter
WEIGHTS = {weights}
COMPONENTS = dict(entity_matching=1.0, location_accuracy=0.5, negation_handling=0.0, temporal_accuracy=1.0,
                  measurement_accuracy=1.0, clinical_significance=0.0, structure_completeness=1.0)

def calculate_green_score(predictions, references):
    out = {{k + "_mean": v for k, v in COMPONENTS.items()}}
    out["overall_mean"] = sum(WEIGHTS[k] * v for k, v in COMPONENTS.items())
    return out

def calculate_clinical_efficacy_score(predictions, references):
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)

def calculate_bleu_score(predictions, references, n_gram=4):
    logs = []
    for n in range(1, n_gram + 1):
        precisions = []
        for p, r in zip(predictions, references):
            pg = Counter(zip(*[p.lower().split()[i:] for i in range(n)]))
            rg = Counter(zip(*[r.lower().split()[i:] for i in range(n)]))
            precisions.append(sum((pg & rg).values()) / sum(pg.values()) if pg else 0.0)
        mean = sum(precisions) / len(precisions)
        if mean <= 0:
            return 0.0
        logs.append(math.log(mean))
    hyp, ref = sum(len(p.split()) for p in predictions), sum(len(r.split()) for r in references)
    bp = 1.0 if hyp > ref else (0.0 if hyp == 0 else math.exp(1 - ref / hyp))
    return bp * math.exp(sum(logs) / len(logs))
'''
REFERENCE_WEIGHTS = dict(entity_matching=0.30, location_accuracy=0.20, negation_handling=0.15, temporal_accuracy=0.10,
                     measurement_accuracy=0.10, clinical_significance=0.10, structure_completeness=0.05)
HYPS = ["The heart is normal in size. No effusion.", "Small left pleural effusion and mild edema."]
REFS = ["The heart is normal. No pleural effusion.", "Small left pleural effusion and mild edema."]


def _stand_in(tmp_path, weights=REFERENCE_WEIGHTS):
    path = tmp_path / "metrics.py"
    path.write_text(textwrap.dedent(STAND_IN.format(weights=weights)))
    return path


def test_keyword_green_by_hand_and_seed_bleu_matches_the_definition(tmp_path):
    m = keyword_metrics(load_reference_module(_stand_in(tmp_path)), HYPS, REFS, seed_bleu=text.seed_bleu(HYPS, REFS))
    # 0.30*1 + 0.20*0.5 + 0.15*0 + 0.10*1 + 0.10*1 + 0.10*0 + 0.05*1 = 0.65
    assert m["keyword_green"] == pytest.approx(0.65) and "keyword_green_note" not in m
    assert m["keyword_green/location_accuracy"] == 0.5 and m["keyword_clinical_efficacy"] == 0.5
    assert m["seed_bleu_matches_reference"] is True
    assert 0 < text.seed_bleu(HYPS, REFS) < 1 and not math.isclose(text.seed_bleu(HYPS, REFS),
                                                                      text.corpus_bleu(HYPS, REFS)["bleu_4"])


def test_a_file_with_other_weights_is_flagged(tmp_path):
    other = {**REFERENCE_WEIGHTS, "entity_matching": 0.5}
    m = keyword_metrics(load_reference_module(_stand_in(tmp_path, other)), HYPS, REFS)
    assert m["keyword_green"] == pytest.approx(0.85) and "another version" in m["keyword_green_note"]


def test_missing_or_wrong_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.keyword_metrics.module=.*FLARE25-QWen2.5VL"):
        load_reference_module(tmp_path / "nope.py")
    (tmp_path / "other.py").write_text("def calculate_green_score(p, r):\n    return {}\n")
    with pytest.raises(ValueError, match="no calculate_clinical_efficacy_score"):
        load_reference_module(tmp_path / "other.py")


def test_eval_reports_keyword_metrics_only_when_configured(base_overrides, tmp_path):
    preds = tmp_path / "predictions.jsonl"
    write_jsonl(preds, [{"id": f"r{i}", "dataset": "IU_XRay", "task_type": "report_generation", "prediction": h,
                         "answer": r, "model": "m"} for i, (h, r) in enumerate(zip(HYPS, REFS))])
    common = ["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false"]
    run(compose_cfg(common), run_dir=tmp_path / "plain")
    report = json.loads((tmp_path / "plain" / "metrics.json").read_text())["m"]["by_task"]["report_generation"]
    assert "keyword_green" not in report and "eval.keyword_metrics.module" in report["keyword_note"]
    run(compose_cfg([*common, f"eval.keyword_metrics.module={_stand_in(tmp_path)}"]), run_dir=tmp_path / "kw")
    report = json.loads((tmp_path / "kw" / "metrics.json").read_text())["m"]["by_task"]["report_generation"]
    assert report["keyword_green"] == pytest.approx(0.65) and "keyword_note" not in report
    assert "| keyword_green | 0.6500 |" in (tmp_path / "kw" / "report.md").read_text()
