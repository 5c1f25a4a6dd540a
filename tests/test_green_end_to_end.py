"""GREEN at non-zero values end to end: a tiny Llama judge whose weights are set by hand so that it writes a
fixed, readable judgment chosen by a word of the candidate report; real transformers loading, tokenisation and
greedy generation, the package's input and parser, eval's aggregation. The mean, the standard deviation and the
per-category values are pinned; eval's ROUGE and BLEU on the same rows against rouge-score and sacrebleu.

How the judge works (one layer, everything else zero):
- embeddings: the end-of-sequence token (the package's input ends with it), each judgment token and each marker
  word set a dimension of their own; every other token a shared one;
- attention: zero queries and keys, so each position averages the values of all earlier (unpadded) tokens;
  the values carry only the marker dimensions, so the last position knows which marker the prompt holds;
- output: after EOS the default judgment wins, unless a marker is present (its judgment reads the marker
  dimension); after a judgment, EOS.
Each judgment is one added token, decoded verbatim."""
import json

import numpy as np
import pytest

from conftest import compose_cfg
from flare_exp.main import run
from flare_exp.metrics.green import CATEGORY_NAMES, green_score, parse_green
from flare_exp.metrics.green_judge import GreenJudge

JUDGMENTS = [
    # default: nothing wrong that counts (an insignificant error does not), 3 matched -> 1
    "[Explanation]:\nThe reports agree.\n\n[Clinically Significant Errors]:\n(a) False report of a finding in the "
    "candidate: 0.\n\n[Clinically Insignificant Errors]:\n(a) False report of a finding in the candidate: 1. "
    "Wording.\n\n[Matched Findings]:\n3. Heart; lungs; bones.",
    # "effusion": (a) 1 and (b) 1, 2 matched -> 2 / 4
    "[Explanation]:\nOne finding too many, one missing.\n\n[Clinically Significant Errors]:\n(a) False report of a "
    "finding in the candidate: 1. Fluid.\n(b) Missing a finding present in the reference: 1. Nodule.\n\n"
    "[Matched Findings]:\n2. Heart; bones.",
    # "cardiomegaly": (c) 2, 1 matched -> 1 / 3
    "[Explanation]:\nWrong places.\n\n[Clinically Significant Errors]:\n(c) Misidentification of a finding's "
    "anatomic location/position: 2. Heart; hilum.\n\n[Matched Findings]:\n1. Lungs.",
    # "pneumothorax": no section the parsers read: the package scores it 0 (in the mean), robust leaves it out
    "I cannot assess these reports.",
]
MARKERS = ["effusion", "cardiomegaly", "pneumothorax"]
REFERENCE = "The heart is normal. The lungs are clear. No acute bony abnormality."
CANDIDATES = ["Heart size is normal and the lungs are clear.", "Small left effusion, heart normal.",
              "Mild cardiomegaly. Lungs clear.", "Small apical pneumothorax.", "Normal heart, clear lungs."]
SCORES = [1.0, 2 / 4, 1 / 3, 0.0, 1.0]  # by hand from the judgments above and GREEN's formula


def build_scripted_judge(base, out):
    """The tiny judge of flare_exp's fixtures, its weights replaced as the module docstring says."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in JUDGMENTS + MARKERS])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in JUDGMENTS + MARKERS}
    eos, other = tokenizer.eos_token_id, 1
    judgment_dim = {t: 2 + i for i, t in enumerate(JUDGMENTS)}
    marker_dim = {t: 2 + len(JUDGMENTS) + i for i, t in enumerate(MARKERS)}
    params = dict(model.named_parameters())
    assert model.config.num_hidden_layers == 1 and marker_dim[MARKERS[-1]] < model.config.hidden_size
    with torch.no_grad():
        for name, p in params.items():
            p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed[:, other] = 1.0
        embed[eos, other], embed[eos, 0] = 0.0, 1.0
        for t, d in judgment_dim.items():
            embed[ids[t], other], embed[ids[t], d] = 0.0, 1.0
            head[eos, d] = 1000.0  # after a judgment: EOS
        value = next(p for n, p in params.items() if n.endswith("self_attn.v_proj.weight"))
        output = next(p for n, p in params.items() if n.endswith("self_attn.o_proj.weight"))
        head[ids[JUDGMENTS[0]], 0] = 10.0  # after EOS: the default judgment ...
        for marker, judgment in zip(MARKERS, JUDGMENTS[1:]):
            d = marker_dim[marker]
            embed[ids[marker], d] = 1.0
            value[d, d], output[d, d] = 100.0, 1.0
            head[ids[judgment], 0], head[ids[judgment], d] = 9.9, 10.0  # ... or the marker's
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scripted_judge(tmp_path_factory):
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("scripted_judge")
    return build_scripted_judge(build_tiny_causal_lm(root / "base"), root / "judge")


def test_the_scripted_judge_writes_its_judgments(scripted_judge):
    judge = GreenJudge.from_pretrained(scripted_judge, "float32", batch_size=3, decode_loop="generate")
    outputs = judge.judge([REFERENCE] * len(CANDIDATES), CANDIDATES)
    # the package's cleaning keeps what follows the last "<|assistant|>" ("\n", then the judgment), then what
    # follows the judgment's own "[Explanation]:" where it has one
    # (the unreadable one is one added token right after the prompt's "\n": transformers 5 decodes an added
    # token without the whitespace before it, so only its text is compared)
    cleaned = [j.split("[Explanation]:", 1)[1] for j in JUDGMENTS[:3]]
    assert outputs[:3] + outputs[4:] == [cleaned[0], cleaned[1], cleaned[2], cleaned[0]]
    assert outputs[3].strip() == JUDGMENTS[3]
    assert [green_score(parse_green(o)) for o in outputs] == pytest.approx(SCORES)
    robust, samples = GreenJudge(judge.model, judge.tokenizer, batch_size=3, parser="robust").score(
        [REFERENCE] * len(CANDIDATES), CANDIDATES)
    readable = SCORES[:3] + SCORES[4:]
    assert robust["green_n"] == 4 and robust["green_unparsed"] == 1 and samples[3]["green"] is None
    assert robust["green_score"] == pytest.approx(np.mean(readable))


def test_eval_green_aggregates_the_judgments(base_overrides, scripted_judge, tmp_path):
    from flare_exp.io import write_jsonl

    rows = [{"id": f"IU_XRay/{i}", "dataset": "IU_XRay", "task_type": "report_generation", "answer": REFERENCE,
             "prediction": candidate, "model": "scripted", "split": "val"} for i, candidate in enumerate(CANDIDATES)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'p.jsonl'}]",
                     f"data.prepared_dir={tmp_path / 'hand_made'}",  # rows of no prepared split
                     "eval.radgraph=false", f"eval.green.model_path={scripted_judge}", "eval.green.dtype=float32",
                     "eval.green.batch_size=2"]), run_dir=tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["scripted"]
    report = metrics["by_task"]["report_generation"]
    mean = sum(SCORES) / 5  # (1 + 1/2 + 1/3 + 0 + 1) / 5 = 17/30
    assert report["green_score"] == pytest.approx(17 / 30) == pytest.approx(mean)
    assert report["green_std"] == pytest.approx(np.sqrt(np.mean((np.array(SCORES) - mean) ** 2)))  # population
    assert report["green_n"] == 5 and "green_unparsed" not in report
    # per category: the share of pairs without such an error, and the mean count (an insignificant error and
    # the unreadable judgment count none)
    assert report["green_error_free_share"] == pytest.approx(dict(zip(CATEGORY_NAMES, [0.8, 0.8, 0.8, 1, 1, 1])))
    assert report["green_significant_errors_mean"] == pytest.approx(
        dict(zip(CATEGORY_NAMES, [0.2, 0.2, 0.4, 0, 0, 0])))
    assert report["green_matched_findings_mean"] == pytest.approx((3 + 2 + 1 + 0 + 3) / 5)
    assert metrics["official"]["report_generation"]["green_score"] == pytest.approx(17 / 30)
    samples = [json.loads(line) for line in (tmp_path / "eval" / "green_samples_scripted.jsonl").read_text().splitlines()]
    assert [s["green"] for s in samples] == pytest.approx(SCORES) and samples[1]["significant"] == [1, 1, 0, 0, 0, 0]
    # eval's ROUGE and BLEU on the same rows, against the reference implementations
    from test_text_metrics_reference import rouge_score_reference, sacrebleu_scores

    hyps, refs = CANDIDATES, [REFERENCE] * len(CANDIDATES)
    assert {k: report[k] for k in ("rouge_1", "rouge_2", "rouge_l")} == pytest.approx(rouge_score_reference(hyps, refs))
    assert {k: report[k] for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4")} == pytest.approx(sacrebleu_scores(hyps, refs))
    assert 0 < report["rouge_l"] < 1 and 0 < report["bleu_1"] < 1


@pytest.mark.parametrize("loop", ["generate", "graph"])
def test_a_judgment_has_its_own_prompts_room_whatever_its_batch_mates(scripted_judge, loop):
    """A report whose judge input reaches max_length left its batch-mates no room: their judgments came out
    empty (score 0), so eval's green_score moved with eval.green.batch_size (0.0 at 16, 0.79 at 4 on one file).
    Each judgment now gets the room its own prompt leaves, as judged alone; exact mode keeps the package's
    batches (a batch's budget set by its longest prompt)."""
    long_one = " ".join(["clear"] * 200)
    cands = CANDIDATES + [long_one]
    judge = GreenJudge.from_pretrained(scripted_judge, "float32", batch_size=8, decode_loop=loop)
    judge.max_length = max(judge.input_tokens([REFERENCE] * 6, cands))  # the long one's input fills it
    alone = [judge.judge([REFERENCE], [c])[0] for c in CANDIDATES]
    assert [green_score(parse_green(o)) for o in alone] == pytest.approx(SCORES)
    for batch_size in (8, 3, 1):
        judge.batch_size = batch_size
        judge.journal = None
        outputs = judge.judge([REFERENCE] * 6, cands)
        assert outputs[:5] == alone and outputs[5] == "", (batch_size, outputs)
    exact = GreenJudge(judge.model, judge.tokenizer, max_length=judge.max_length, exact=True)
    assert exact.judge([REFERENCE] * 6, cands) == [""] * 6  # the package's batch of 8: no room for any of them
