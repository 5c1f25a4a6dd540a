"""The report a researcher sends: report.html self-contained with results first, metrics.png one panel per
official metric, scored.xlsx with its metrics sheet and scored regression rows, and our own model card."""
import base64
import math
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import compose_cfg

INF = math.inf


def _result(root, name, ba, mae, caveats=()):
    return {"file": str(root / "runs" / name / "infer" / "predictions.jsonl"), "n": 12, "split": "val",
            "run": {"model": "tiny", "model_path": str(root / "models" / "tiny"), "backend": "hf",
                    "checkpoint": str(root / "runs" / name / "final"), "adapter_sha256": "ab" * 32,
                    "commit": "0123456789abcdef0123456789abcdef01234567"},
            "caveats": list(caveats),
            "official": {"classification": {"balanced_accuracy": ba}, "multi_label": {"f1_score": 0.0},
                         "regression": {"mean_absolute_error": mae, **({"note": "infinite: 1 prediction(s)"}
                                                                       if mae == INF else {})},
                         "report_generation": {"green_score": None}},
            "official_by_dataset": {"dental": {"balanced_accuracy": ba}},
            "by_task": {"classification": {"n": 4, "accuracy": ba}, "regression": {"n": 4, "mae_parseable": 2.5},
                        "report_generation": {"green_score": None, "green_note": "not computed: no judge"}},
            "by_dataset": {}}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.cells, self.order, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [v for k, v in attrs.items() if k in ("src", "href", "action", "background")]
        if tag == "link" or tag == "script":
            self.refs.append(tag)
        if tag == "td":
            self._cell = [attrs.get("class"), ""]
        if tag in ("img", "table", "h2"):
            self.order.append(tag)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self.order and self.order[-1] == "h2":
            self.order[-1] = f"h2:{data}"

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(tuple(self._cell))
            self._cell = None


def test_report_html_is_one_self_contained_page_with_results_first(tmp_path):
    from flare_exp.reports.eval_report import write_reports

    root, out = tmp_path / "outputs", tmp_path / "outputs" / "runs" / "cmp" / "eval"
    out.mkdir(parents=True)
    results = {"base": _result(root, "base", 0.25, INF),
               "rl": _result(root, "rl", 0.6667, 3.5, ["green_score comes from a random judge: meaningless"])}
    tests = [{"run_a": "base", "run_b": "rl", "task": "classification", "metric": "balanced_accuracy", "a": 0.25,
              "b": 0.6667, "difference": 0.4167, "difference_ci95": [0.1, 0.7], "p_value": 0.01, "n": 4}]
    write_reports(out, results, tests, [], {"rl": {"classification": [0.4, 0.9]}}, None, root=root)
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    # one file: the figure inside it, no reference to anything outside (a mailed copy shows the same)
    assert page.refs == [page.refs[0]] and page.refs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(page.refs[0].split(",", 1)[1]) == (out / "metrics.png").read_bytes()
    assert "http" not in text and "@import" not in text and "url(" not in text
    # results first: the official table, then the figure; caveats after, with the run's own line
    assert page.order[:3] == ["h2:Official numbers (FLARE's evaluator)", "table", "img"]
    assert page.order.index("h2:Caveats") > page.order.index("img")
    assert "rl: green_score comes from a random judge: meaningless" in text
    assert "base: regression: infinite: 1 prediction(s)" in text
    # numbers right-aligned, floats with four decimals; paths relative to the output root; short hashes
    numeric = [(cls, c) for cls, c in page.cells if re.fullmatch(r"-?\d+(\.\d+)?|Infinity|n/a", c)]
    assert numeric and all(cls == "num" for cls, _ in numeric)
    assert all(re.fullmatch(r"-?\d+\.\d{4}", c) for _, c in numeric if "." in c)
    assert ("num", "0.6667") in page.cells and ("num", "Infinity") in page.cells
    cells = [c for _, c in page.cells]
    assert "runs/rl/final" in cells and "runs/base/infer/predictions.jsonl" in cells and str(root / "runs") not in text
    assert "0123456789ab" in cells and "ab" * 32 not in text
    # the runs table has one column per run, not one per field (it stays inside the page)
    assert text.count("<tr>") - text.count("<tr><th") >= 10


def test_metrics_png_has_one_panel_per_official_metric_and_a_bar_per_run(tmp_path, monkeypatch):
    from flare_exp import plotting
    from flare_exp.reports import eval_figure
    from flare_exp.metrics.significance import bootstrap_interval

    stats = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # classification: correct?, class
    interval = bootstrap_interval("classification", stats, resamples=200)
    assert interval is not None and 0 <= interval[0] <= interval[1] <= 1
    figures = []
    monkeypatch.setattr(plotting, "save_png", lambda fig, path: figures.append(fig))
    root = tmp_path
    for results in ({"base": _result(root, "base", 0.0, INF), "rl": _result(root, "rl", 0.5, 2.0)},
                    {"a": {"n": 4, "official": {"classification": {"balanced_accuracy": 0.0},
                                                "regression": {"mean_absolute_error": None}}}}):
        eval_figure.plot(tmp_path / "m.png", results, {"rl": {"classification": interval}})
        fig = figures[-1]
        tasks = {t for r in results.values() for t in r["official"]}
        assert len(fig.axes) == len(tasks)  # one panel per official metric, no empty slot
        assert fig._suptitle is not None and "official" in fig._suptitle.get_text()
        for ax in fig.axes:
            bars = [p for p in ax.patches if p.get_height() > 0]
            assert len(bars) == len(results)  # a visible bar for every run, also at 0 and with no number
            assert len(ax.texts) >= len(results)  # and its value
        assert sorted(ax.get_title().split("\n")[0] for ax in fig.axes) == sorted(
            eval_figure.FLARE_TASK_TYPE[t] for t in tasks)
    zero = figures[0].axes[0]  # classification: base at 0.0 still shows
    assert [t.get_text() for t in zero.texts][:2] == ["0.0000", "0.5000"]


def test_scored_sheet_has_a_metrics_sheet_and_scores_every_regression_row(tmp_path):
    from openpyxl import load_workbook

    from flare_exp.metrics.official import regression_stats
    from flare_exp.reports.sheets import write_scored_sheet

    preds = ["12.5", "about 22.9%", "none visible"]
    rows = [{"id": f"r{k}", "task_type": "regression", "dataset": "boneresorption", "image_name": "x.png",
             "question": "q", "answer": "20.0", "prediction": p} for k, p in enumerate(preds)]
    samples = {"regression": ([r["id"] for r in rows], regression_stats(preds, ["20.0"] * 3))}
    result = _result(tmp_path, "a", 0.5, INF)
    write_scored_sheet(tmp_path / "scored.xlsx", rows, "a", samples, result)
    wb = load_workbook(tmp_path / "scored.xlsx")
    assert wb.sheetnames == ["predictions", "metrics", "adapter"]
    sheet = wb["predictions"]
    header = [c.value for c in sheet[1]]
    scores = {r[header.index("id")]: (r[header.index("score")], r[header.index("score_kind")])
              for r in sheet.iter_rows(min_row=2, values_only=True)}
    assert scores["r0"] == (7.5, "absolute error")
    assert scores["r1"][0] == pytest.approx(2.9) and "first number" in scores["r1"][1]
    assert scores["r2"] == (None, "no number in the prediction")
    assert [sheet.cell(k, header.index("id") + 1).value for k in (2, 3, 4)] == ["r2", "r0", "r1"]  # worst first
    metrics = {r[0]: r[1] for r in wb["metrics"].iter_rows(min_row=2, values_only=True)}
    assert metrics["official classification: balanced_accuracy"] == 0.5
    assert metrics["official regression: mean_absolute_error"] == "Infinity" and metrics["n"] == 12
    for ws in wb["predictions"], wb["metrics"]:
        assert all(ws.column_dimensions[c].width >= 12 for c in "AB")


TRL_CARD = "---\ntags:\n- trl\n---\n# Model Card for rl\nIt has been trained using [TRL](https://github.com/huggingface/trl)."


def test_training_runs_get_our_model_card_not_trl_boilerplate(tmp_path):
    from flare_exp.reports.model_card import write_model_cards
    from flare_exp.models.checkpoints import incomplete, mark_complete

    cfg = compose_cfg(["stage=rl", "rl.init_from=outputs/runs/sft"])
    run_dir = tmp_path / "rl"
    for where in (run_dir, run_dir / "final", run_dir / "checkpoint-2"):
        where.mkdir(parents=True)
        (where / "README.md").write_text(TRL_CARD)
    mark_complete(run_dir / "checkpoint-2")
    # the fields of the Trainer's state that the card reads
    state = SimpleNamespace(global_step=2, best_metric=None, best_model_checkpoint=None, log_history=[
        {"loss": 0.5, "reward": 0.25, "step": 1}, {"loss": 0.4, "reward": 0.75, "step": 2}])
    data = [{"path": "/data/prepared/train.jsonl", "sha256": "c" * 64}]
    trainer = SimpleNamespace(state=state, args=SimpleNamespace(metric_for_best_model=None),
                              callback_handler=SimpleNamespace(callbacks=[]))
    write_model_cards(run_dir, "rl", cfg, "/models/Qwen3-VL-4B-Instruct", data, trainer)
    for where in (run_dir, run_dir / "final", run_dir / "checkpoint-2"):
        card = (where / "README.md").read_text()
        assert "TRL" not in card and "More Information Needed" not in card and "huggingface.co" not in card
        assert "/models/Qwen3-VL-4B-Instruct" in card and "/data/prepared/train.jsonl" in card
        assert "started from: outputs/runs/sft" in card and "last reward: 0.7500" in card
        assert "num_generations" in card and "learning_rate" in card
    assert incomplete(run_dir / "checkpoint-2") is None  # the checkpoint stays usable for a resume


def test_the_card_names_each_best_by_its_own_metric(tmp_path):
    """The card said "best checkpoint: checkpoint-80 (official_mean 0.0391)": the Trainer's lowest eval loss under
    the held-out metric's name; with sft.eval_per_task on it named another checkpoint and value than
    sft_summary.json's best/ (4.9584 at checkpoint-4 against official_mean 0.25 at best/)."""
    from flare_exp.reports.model_card import write_model_cards
    from flare_exp.rl_monitor.heldout_watch import HeldOutWatch

    cfg = compose_cfg(["stage=sft"])
    watch = object.__new__(HeldOutWatch)  # the fields its summary reads
    watch.heldout, watch.section, watch.out_dir = SimpleNamespace(records=[1, 2]), cfg.sft, tmp_path
    watch.best = {"step": 4, "value": 0.25}
    state = SimpleNamespace(global_step=4, best_metric=4.9584, best_model_checkpoint=str(tmp_path / "checkpoint-4"),
                            log_history=[{"loss": 5.0, "step": 4}, {"eval_loss": 4.9584, "step": 4}])
    trainer = SimpleNamespace(state=state, args=SimpleNamespace(metric_for_best_model="eval_loss"),
                              callback_handler=SimpleNamespace(callbacks=[watch]))
    (tmp_path / "final").mkdir()
    write_model_cards(tmp_path, "sft", cfg, "/models/q", [], trainer)
    card = (tmp_path / "README.md").read_text()
    assert f"- lowest eval_loss: 4.9584 at {tmp_path / 'checkpoint-4'}" in card
    assert f"- best held-out {cfg.sft.metric_for_best_model}: 0.2500 at step 4 ({tmp_path / 'best'})" in card


def test_the_sft_run_writes_our_card(sft_adapter):
    card = (sft_adapter / "final" / "README.md").read_text()
    assert "TRL" not in card and "More Information Needed" not in card and "tiny-qwen3vl" in card
    assert (sft_adapter / "README.md").read_text() == card


def test_an_infinite_difference_keeps_its_sign():
    """B - A where A's error is infinite and B's finite is -Infinity: shown as Infinity it would say B got worse."""
    from flare_exp.reports.eval_report import significance_rows
    from flare_exp.reports.tables import fmt

    assert (fmt(math.inf), fmt(-math.inf), fmt(-1e-7)) == ("Infinity", "-Infinity", "0.0000")
    (row,) = significance_rows([{"run_a": "base", "run_b": "sft", "task": "regression",
                                 "metric": "mean_absolute_error", "a": math.inf, "b": 7.5,
                                 "difference": -math.inf, "n": 8}])
    assert row[2:5] == ["Infinity", "7.5000", "-Infinity"]
    from flare_exp.reports.eval_report import SIGNIFICANCE_HEADER  # "sft vs base": B first, as the header says

    assert row[0] == "sft vs base" and SIGNIFICANCE_HEADER[:5] == ["B vs A", "metric", "A", "B", "B - A"]


def test_long_run_labels_under_a_panel_wrap_after_a_space_or_a_slash():
    """Two long labels side by side under a metrics.png panel overlapped."""
    from flare_exp.reports.eval_figure import wrapped

    assert wrapped("demo-pipeline/rl") == "demo-pipeline/rl"
    assert wrapped("demo-pipeline/rl [2: predictions.xlsx]") == "demo-pipeline/rl [2:\npredictions.xlsx]"
    assert wrapped("sweeps/reward-search-IU_XRay/12/rl") == "sweeps/\nreward-search-IU_XRay/\n12/rl"
    assert max(len(line) for line in wrapped("a/" * 30).splitlines()) <= 22
