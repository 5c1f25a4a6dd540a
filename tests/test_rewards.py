
import pytest

from conftest import compose_cfg
from flare_exp.rewards import get_term
from flare_exp.rewards.choice import Choice, extract_choice
from flare_exp.rewards.combine import build_reward
from flare_exp.rewards.format import FormatFlare, FormatSeed
from flare_exp.rewards.label_f1 import LabelF1
from flare_exp.rewards.numeric import Numeric, parse_number
from flare_exp.rewards.rouge import RougeL


@pytest.mark.parametrize("text,expected", [
    ("C", "C"), ("C.", "C"), ("(C)", "C"), ("Answer: C", "C"), ("The answer is C", "C"), ("option H", "H"),
    ("K", "K"), ("J. Bridge", "J"), ("answer: g", "G"), ("b", "B"),
    # seed defect 1: the article "a" (upper-cased by the seed) read as option A
    ("There is a small caries lesion.", None), ("A small caries lesion is seen.", None),
    ("A small lesion; the answer is D", "D"), ("I think it is (E)", "E"),
    ("", None), ("no idea", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_choice_scores_with_seed_values():
    assert Choice()(["H", "B", "there is a lesion", "answer: h"], ["H", "H", "A", "H"]) == [1.0, -0.2, -0.2, 1.0]


@pytest.mark.parametrize("text,value", [
    ("22.9", 22.9), ("22.9%", 22.9), ("80%", 80.0), ("1,234", 1234.0), ("about 20 percent", 20.0),
    ("The resorption is 35.1 %.", 35.1), ("-3", -3.0), ("none", None), (None, None), (12, 12.0),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numeric_tiers_and_range():
    term = Numeric()
    got = term(["22.9%", "24.5", "27", "30", "50", "nothing", "150"], ["22.9"] * 6 + ["145"])
    assert got == pytest.approx([1.0, 1.0, 0.5, 0.0, -0.5, -0.5, 0.5 - 0.3])


def test_numeric_pays_nothing_for_length_or_headings():
    # seed defect 3: the numeric reward paid for long text with Findings/Impression headings
    long = "Findings: " + "the bone level is reduced " * 10 + "Impression: 23"
    assert Numeric()([long], ["23"]) == Numeric()(["23"], ["23"])


@pytest.mark.parametrize("dataset,completion,answer,f1", [
    ("chestdr", "Pneumonia, Effusion", "Effusion, Pneumonia", 1.0),
    ("chestdr", "pneumonia ,  EFFUSION.", "Effusion, Pneumonia", 1.0),
    ("chestdr", "Pneumonia", "Effusion, Pneumonia", 2 / 3),
    ("chestdr", "", "Effusion", 0.0),
    ("periapical", "Caries;Endodontic Treatment, Restorative Treatment, and Complications",
     "Endodontic Treatment, Restorative Treatment, and Complications;Caries", 1.0),
    ("periapical", "Endodontic Treatment, Restorative Treatment, and Complications",
     "Endodontic Treatment, Restorative Treatment, and Complications;Caries", 2 / 3),
])
def test_label_f1(dataset, completion, answer, f1):
    assert LabelF1()([completion], [answer], [{"dataset": dataset}]) == [pytest.approx(f1)]


def test_rouge_l():
    got = RougeL()(["The heart size is normal.", "", "lungs clear"], ["The heart size is normal."] * 3)
    assert got[0] == pytest.approx(1.0) and got[1] == 0.0 and 0 < RougeL()(["heart normal"], ["heart size normal"])[0] < 1


def test_format_seed_constants():
    words = lambda n: " ".join(["word"] * n)  # noqa: E731
    assert FormatSeed()([words(25)]) == [pytest.approx(0.3)]
    assert FormatSeed()([words(5)]) == [pytest.approx(-0.3)]
    both = "Findings: the lungs are clear. Impression: no acute disease."
    assert FormatSeed()([both]) == [pytest.approx(-0.3 + 0.7 + 0.6)]
    same = "Findings: lungs clear. Impression: lungs clear."
    assert FormatSeed()([same]) == [pytest.approx(-0.3 + 0.7)]
    assert FormatSeed()(["Findings: x <REASONING>"]) == [pytest.approx(-0.3 + 0.3 - 1.0)]


def test_format_flare_prefers_the_reference_style():
    ref = "The heart size is normal."
    concise, long_headed = FormatFlare()(["Heart size is normal.", "Findings: " + "heart normal " * 20 +
                                         "Impression: normal."], [ref, ref])
    assert concise > 0.5 > long_headed
    # seed defect 4: the seed format term rewards exactly what FLARE answers are not
    assert FormatSeed()(["Heart size is normal."])[0] < FormatSeed()(["Findings: " + "heart normal " * 20 +
                                                                      "Impression: normal."])[0]


def test_unknown_term_lists_known_ones():
    with pytest.raises(KeyError, match="known terms: .*choice.*label_f1"):
        get_term("bleu")


@pytest.fixture(scope="module")
def tiny_radgraph(tmp_path_factory):
    from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph

    return build_tiny_radgraph(tmp_path_factory.mktemp("radgraph"))


def test_radgraph_term_through_the_real_package(tiny_radgraph):
    term = get_term("radgraph")(model_dir=str(tiny_radgraph), reward_level="RG_E")
    refs = ["The heart size is normal.", "the lungs are clear", "no pleural effusion"]
    hyps = ["the heart size is normal.", "mild cardiomegaly", ""]
    scores = term(hyps, refs)
    assert scores[0] == pytest.approx(1.0)  # identical after lower-casing (0.1.18 is case-sensitive)
    assert scores[2] == 0.0 and all(0.0 <= s <= 1.0 for s in scores)
    from radgraph import F1RadGraph

    direct = F1RadGraph(reward_level="all", model_type="radgraph-xl", model_cache_dir=str(tiny_radgraph))
    _, lists, _, _ = direct(refs=[r.lower() for r in refs[:2]], hyps=hyps[:2])
    assert scores[:2] == pytest.approx(lists[0])


def test_radgraph_parses_each_report_once(tiny_radgraph, monkeypatch):
    from flare_exp.metrics.radgraph_f1 import get_scorer
    from flare_exp.rewards.radgraph_term import RadGraphTerm

    term = RadGraphTerm(model_dir=str(tiny_radgraph))
    annotator = get_scorer(term.scorer.model_dir, "radgraph-xl").radgraph
    seen = []
    real = annotator.forward
    monkeypatch.setattr(annotator, "forward", lambda reports: (seen.append(list(reports)), real(reports))[1])
    first = term(["heart is normal"] * 4 + ["lungs clear"], ["the heart size is normal"] * 5)
    second = term(["heart is normal", "no effusion"], ["the heart size is normal"] * 2)
    # one call per step, each distinct report once, graphs kept across steps
    assert seen == [["heart is normal", "the heart size is normal", "lungs clear"], ["no effusion"]]
    assert first[0] == first[3] == second[0]


def test_radgraph_scores_equal_the_packages_own(tiny_radgraph):
    """The per-report graphs + radgraph.rewards.compute_reward give F1RadGraph's numbers, all three levels."""
    from radgraph import F1RadGraph

    from flare_exp.metrics.radgraph_f1 import RadGraphScorer
    from flare_exp.metrics.radgraph_tokenizer import supply_radgraph_tokenizer_methods

    supply_radgraph_tokenizer_methods()  # what get_scorer does before it builds an F1RadGraph

    words = "no acute cardiopulmonary abnormality the heart size is normal lungs are clear pleural effusion".split()
    rng = __import__("random").Random(3)
    refs = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(12)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(12)] + refs[:3]
    refs = refs + refs[:3][::-1]
    direct = F1RadGraph(reward_level="all", model_type="radgraph-xl", model_cache_dir=str(tiny_radgraph), cuda=-1)
    _, lists, _, _ = direct(refs=refs, hyps=hyps)
    ours = RadGraphScorer(str(tiny_radgraph), device="cpu").score_pairs(hyps, refs)
    reference = RadGraphScorer(str(tiny_radgraph), use_cache=False, device="cpu").score_pairs(hyps, refs)
    assert ours == reference == list(zip(*lists))
    assert len({v for triple in ours for v in triple}) > 2  # the random model finds entities: not all zeros


def test_radgraph_device_setting(tiny_radgraph):
    from flare_exp.metrics.radgraph_f1 import RadGraphScorer, radgraph_device

    assert radgraph_device("cpu") == -1 and radgraph_device("auto") in (-1, 0)
    with pytest.raises(ValueError, match="reward.radgraph.device='gpu0'"):
        RadGraphScorer(str(tiny_radgraph), device="gpu0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU here"):
            RadGraphScorer(str(tiny_radgraph), device="cuda:0")


def test_radgraph_missing_weights_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.radgraph.model_dir"):
        get_term("radgraph")(model_dir=None)
    with pytest.raises(FileNotFoundError, match="radgraph-xl.tar.gz"):
        get_term("radgraph")(model_dir=str(tmp_path))


def _reward(tiny_radgraph, preset, *overrides):
    cfg = compose_cfg([f"reward={preset}", f"reward.radgraph.model_dir={tiny_radgraph}", *overrides])
    return build_reward(cfg.reward)


def test_flare_preset_routes_by_task_type(tiny_radgraph):
    fn = _reward(tiny_radgraph, "flare")
    got = fn(prompts=[None] * 4, completions=["H", "Pneumonia, Effusion", "22.9%", "The heart size is normal."],
             task_type=["classification", "multi_label", "regression", "report_generation"],
             answer=["H", "Effusion, Pneumonia", "22.9", "The heart size is normal."],
             dataset=["dental", "chestdr", "boneresorption", "IU_XRay"])
    assert got[:3] == [1.0, 1.0, 1.0]
    assert set(fn.last_term_means) == {"classification/choice", "multi_label/label_f1", "regression/numeric",
                                       "report_generation/radgraph", "report_generation/rouge_l",
                                       "report_generation/format_flare"}


def test_weights_are_overridable_from_the_command_line(tiny_radgraph):
    fn = _reward(tiny_radgraph, "flare", "reward.report_generation.weights.radgraph=0",
                 "reward.report_generation.weights.rouge_l=2.0", "reward.report_generation.weights.format_flare=0")
    out = fn(completions=["The heart size is normal."], task_type=["report_generation"],
             answer=["The heart size is normal."], dataset=["IU_XRay"])
    assert out == [pytest.approx(2.0)]
    with pytest.raises(KeyError, match="unknown reward term 'bleu'"):
        _reward(tiny_radgraph, "flare", "+reward.report_generation.weights.bleu=1")


def test_seed_preset_reproduces_the_seed_values(tiny_radgraph):
    fn = _reward(tiny_radgraph, "seed")
    rows = dict(task_type=["classification", "classification", "regression", "regression"],
                answer=["C", "C", "22.9", "22.9"], dataset=["dental"] * 2 + ["boneresorption"] * 2)
    got = fn(completions=["C", "B", "23", "80"], **rows)
    # choice +1 / -0.2; numeric 0.7 x value + 0.3 x seed format (a 1-word answer: -0.3)
    assert got == pytest.approx([1.0, -0.2, 0.7 * 1.0 + 0.3 * -0.3, 0.7 * -0.5 + 0.3 * -0.3])
    # ... with its parsing defects fixed: "80%" is a number, options past F exist, "a" is no option
    assert fn(completions=["22.9%"], task_type=["regression"], answer=["22.9"], dataset=["x"]) == \
        pytest.approx([0.7 + 0.3 * -0.3])
    assert fn(completions=["H", "a lesion"], task_type=["classification"] * 2, answer=["H", "A"],
              dataset=["dental"] * 2) == [1.0, -0.2]


def test_bad_input_gets_a_defined_score(tiny_radgraph):
    fn = _reward(tiny_radgraph, "flare")
    got = fn(completions=[None, 3, "", [{"role": "assistant", "content": "H"}], "x"],
             task_type=["classification", "classification", "classification", "classification", "detection"],
             answer=["H"] * 5, dataset=["dental"] * 5)
    assert got == [-1.0, -1.0, -0.2, 1.0, -1.0]


def test_clipping(tiny_radgraph):
    fn = _reward(tiny_radgraph, "flare", "reward.classification.weights.choice=10", "reward.clip_max=2.0")
    assert fn(completions=["H"], task_type=["classification"], answer=["H"], dataset=["dental"]) == [2.0]


def test_radgraph_parses_equal_those_made_on_transformers_4(tiny_radgraph):
    """radgraph 0.1.18 runs on transformers 5 with the two tokenizer methods it calls supplied
    (flare_exp.metrics.radgraph_tokenizer): the same graphs and scores as on transformers 4.57.6, where the package
    has them (tests/golden, made there on the same tiny model: its weights do not depend on the version)."""
    import json
    from pathlib import Path

    from flare_exp.metrics.radgraph_f1 import RadGraphScorer

    golden = json.loads((Path(__file__).parent / "golden" / "radgraph_tiny_parses.json").read_text())
    scorer = RadGraphScorer(str(tiny_radgraph), device="cpu")
    scores = scorer.score_pairs(golden["hyps"], golden["refs"])
    assert {r: scorer.graphs[r] for r in golden["graphs"]} == golden["graphs"]
    assert [list(s) for s in scores] == golden["scores"]
    assert sum(len(g["entities"]) for g in golden["graphs"].values()) > 100  # the tiny model finds entities


def test_a_negative_weight_is_kept_and_said(caplog):
    """reward.regression.weights.numeric=-1 rewards wrong numbers: allowed (a penalty term), said in the log."""
    import logging

    caplog.set_level(logging.WARNING, logger="flare_exp")
    build_reward(compose_cfg(["reward.regression.weights.numeric=-1"]).reward)
    assert "reward.regression.weights.numeric=-1 is negative: the better a completion scores on numeric" in caplog.text
