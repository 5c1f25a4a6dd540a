"""runs.compare and the runs listing on what users do to finished runs: the scored predictions redone or edited
after the eval (the table showed the eval's numbers, the tests the new file's), an output root moved or copied,
a metrics.json deleted, turned into a list or given a string for a number, a run dir linked under a second name."""
import json
import shutil

import pytest
from conftest import compose_cfg

from flare_exp.catalog import listing
from flare_exp.io import file_digest, read_jsonl, write_jsonl
from flare_exp.run.lifecycle import run_with_markers
from flare_exp.run.record import write_run_metadata
from flare_exp.runs_compare import comparison


def _eval(root, name, hits: int):
    """An eval run that scored an infer run's predictions (multi-label, ``hits`` of 4 right) under ``root``."""
    infer = root / "runs" / f"infer-{name}"
    infer.mkdir(parents=True)
    rows = [{"id": f"q{i}", "task_type": "multi_label", "dataset": "chestdr", "split": "val", "answer": "effusion",
             "prediction": "effusion" if i < hits else "edema"} for i in range(4)]
    write_jsonl(infer / "predictions.jsonl", rows)
    run_dir = root / "runs" / name
    write_run_metadata(run_dir, compose_cfg(["stage=eval"]))
    block = {"file": str(infer / "predictions.jsonl"), "file_sha256": file_digest(infer / "predictions.jsonl"),
             "n": 4, "split": "val", "official": {"multi_label": {"f1_score": hits / 4}},
             "official_by_dataset": {"chestdr": {"f1_score": hits / 4}}}
    (run_dir / "metrics.json").write_text(json.dumps({name: block}))
    run_with_markers(run_dir, lambda: {})
    return run_dir


def test_predictions_changed_after_the_eval_are_refused_not_tested(tmp_path):
    root = tmp_path / "out"
    _eval(root, "a", 1), _eval(root, "b", 4)
    assert "Paired tests" in "\n".join(comparison(root, ["a", "b"], resamples=20))
    redone = root / "runs" / "infer-b" / "predictions.jsonl"  # infer redone with overwrite=true: other predictions
    redone.write_text(redone.read_text().replace('"prediction": "effusion"', '"prediction": "edema"'))
    with pytest.raises(ValueError, match=r"runs.compare: b: the predictions its eval scored, \S+infer-b/predictions"
                                         r".jsonl, have changed since .*Rerun that eval"):
        comparison(root, ["a", "b"], resamples=20)


def test_an_output_root_moved_elsewhere_finds_its_scored_files_by_their_bytes(tmp_path):
    root = tmp_path / "out"
    _eval(root, "a", 1), _eval(root, "b", 4)
    moved = tmp_path / "laptop" / "outputs"
    shutil.move(str(root), str(moved))
    text = "\n".join(comparison(moved, ["a", "b"], resamples=20))
    assert "multi_label: f1_score" in text and "0.2500" in text and "1.0000" in text
    (moved / "runs" / "infer-a" / "predictions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"runs.compare: a: its eval scored \S+/out/runs/infer-a/predictions"
                                                r".jsonl, which is not there \(nor under \S+/laptop/outputs by the end"):
        comparison(moved, ["a", "b"], resamples=20)


def test_hand_edited_metrics_files_are_said_in_the_listing_and_refused_by_compare(tmp_path):
    root = tmp_path / "out"
    for name in ("gone", "listed", "word", "ok", "empty", "other", "flat"):
        _eval(root, name, 2)
    (root / "runs" / "empty" / "metrics.json").write_text("{}")
    (root / "runs" / "other" / "metrics.json").write_text('{"infer-x": 5}')
    flat = root / "runs" / "flat" / "metrics.json"
    flat.write_text(json.dumps({k: {**v, "official": []} for k, v in json.loads(flat.read_text()).items()}))
    for name, official in (("bare", {}), ("hollow", {"multi_label": {}})):
        _eval(root, name, 2)
        bare = root / "runs" / name / "metrics.json"
        bare.write_text(json.dumps({k: {**v, "official": official} for k, v in json.loads(bare.read_text()).items()}))
    (root / "runs" / "gone" / "metrics.json").unlink()
    (root / "runs" / "listed" / "metrics.json").write_text("[]")
    word = root / "runs" / "word" / "metrics.json"
    word.write_text(word.read_text().replace('"f1_score": 0.5', '"f1_score": "high"'))
    rows = {row[0]: row for row in listing(root)[1]}
    assert rows["gone"][2] == "DONE (metrics.json missing)" and "deleted since its eval" in rows["gone"][5]
    assert rows["listed"][2] == "DONE (metrics.json unreadable)" and "not an object" in rows["listed"][5]
    assert rows["word"][5].startswith("official.multi_label.f1_score='high': no number")
    assert rows["ok"][5] == "multi_label.f1_score=0.5000"
    for name in ("empty", "other", "flat", "bare", "hollow"):
        assert rows[name][2] == "DONE (metrics.json unreadable)" and "no block of official metrics" in rows[name][5]
    with pytest.raises(ValueError, match=r"word: \S+/metrics.json has official.multi_label.f1_score='high', no num"):
        comparison(root, ["ok", "word"], resamples=20)
    with pytest.raises(ValueError, match=r"listed has \S+metrics.json, but it holds no metrics as eval"):
        comparison(root, ["ok", "listed"], resamples=20)


def test_a_run_linked_under_a_second_name_is_one_run(tmp_path):
    root = tmp_path / "out"
    _eval(root, "a", 1), _eval(root, "b", 4)
    (root / "runs" / "a-link").symlink_to(root / "runs" / "a")
    assert [row[0] for row in listing(root)[1]] == ["a", "b"]
    with pytest.raises(ValueError, match=r"runs.compare: a and a-link are one run dir"):
        comparison(root, ["a", "a-link"], resamples=20)


def test_a_number_edited_into_metrics_json_is_refused_not_shown_beside_tests_of_the_true_one(tmp_path):
    root = tmp_path / "out"
    _eval(root, "a", 1), _eval(root, "b", 4)
    metrics = root / "runs" / "a" / "metrics.json"
    for edited in ('"f1_score": 0.99', '"f1_score": "NaN"'):
        metrics.write_text(metrics.read_text().replace('"f1_score": 0.25', edited))
        with pytest.raises(ValueError, match=r"runs.compare: a: multi_label.f1_score: (0.99|nan) in metrics.json, "
                                             r"0.25 from the predictions it scored: \S+ was edited since"):
            comparison(root, ["a", "b"], resamples=20)
        metrics.write_text(metrics.read_text().replace(edited, '"f1_score": 0.25'))
    assert "Paired tests" in "\n".join(comparison(root, ["a", "b"], resamples=20))
    # a dataset's own row of the table, edited alone
    block = json.loads(metrics.read_text())
    block["a"]["official_by_dataset"]["chestdr"]["f1_score"] = 0.5
    metrics.write_text(json.dumps(block))
    with pytest.raises(ValueError, match=r"runs.compare: a: chestdr \(multi_label\).f1_score: 0.5 in metrics.json, "
                                         r"0.25 from the predictions it scored"):
        comparison(root, ["a", "b"], resamples=20)


def test_the_listing_says_a_number_edited_into_metrics_json_instead_of_showing_it(tmp_path):
    """The listing shows one number per run: one typed into metrics.json (here the headline's own) is named with
    the number its predictions give, not shown as the run's; a file changed since (not recomputable) is left to
    runs.compare, which names it."""
    from flare_exp.runs_compare import listed_disagreement

    root = tmp_path / "out"
    _eval(root, "a", 1), _eval(root, "b", 4)
    metrics = root / "runs" / "a" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"multi_label": {"f1_score": 0.25}', '"multi_label": {"f1_score": 0.9}'))
    rows = {row[0]: row[5] for row in listing(root, lambda d: listed_disagreement(d, root))[1]}
    assert rows["b"] == "multi_label.f1_score=1.0000"
    assert rows["a"] == ("multi_label.f1_score: 0.9 in metrics.json, 0.25 from the predictions it scored: "
                         "metrics.json edited since its eval wrote it; rerun that eval")
    assert {row[0]: row[5] for row in listing(root)[1]}["a"] == "multi_label.f1_score=0.9000"  # no recheck asked
    (root / "runs" / "infer-a" / "predictions.jsonl").write_text("")  # changed since: compare says so, not this
    assert listed_disagreement(root / "runs" / "a", root) is None


def test_a_green_score_edited_into_metrics_json_is_refused_from_the_judgments_eval_kept(tmp_path):
    """Report generation's official number is the GREEN judge's mean: recomputed from the judgments eval kept
    (green_samples_<model>.jsonl, read by the package's parser) as the other tasks' are from their predictions."""
    from test_green_end_to_end import JUDGMENTS, SCORES

    root = tmp_path / "out"
    _eval(root, "b", 4)
    run_dir = _eval(root, "a", 1)
    infer = root / "runs" / "infer-a"
    reports = [{"id": f"r{i}", "task_type": "report_generation", "dataset": "IU_XRay", "split": "val",
                "answer": "The heart is normal.", "prediction": "Heart normal."} for i in range(4)]
    write_jsonl(infer / "predictions.jsonl", read_jsonl(infer / "predictions.jsonl") + reports)
    write_jsonl(run_dir / "green_samples_a.jsonl", [{"id": r["id"], "judge_output": j} for r, j in zip(reports, JUDGMENTS)])
    mean = sum(SCORES[:4]) / 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["a"].update(file_sha256=file_digest(infer / "predictions.jsonl"), n=8)
    metrics["a"]["official"]["report_generation"] = {"green_score": mean}
    metrics["a"]["official_by_dataset"]["IU_XRay"] = {"green_score": mean}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert "report_generation: green_score" in "\n".join(comparison(root, ["a", "b"], resamples=20))
    metrics["a"]["official_by_dataset"]["IU_XRay"]["green_score"] = 0.9
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=rf"runs.compare: a: IU_XRay \(report_generation\).green_score: 0.9 in "
                                         rf"metrics.json, {mean!r} from the predictions it scored"):
        comparison(root, ["a", "b"], resamples=20)


def test_numbers_edited_from_infinite_null_or_no_judge_are_refused_too(tmp_path):
    """Three edits the recomputation let through: FLARE's infinite MAE (a prediction float() does not read) typed
    over with a finite one (the tolerance grew with the infinite value), a per-dataset number set to null, and a
    GREEN score typed where no judge ran (nothing to recompute it from)."""
    root = tmp_path / "out"
    _eval(root, "b", 4)
    run_dir = _eval(root, "a", 1)
    infer = root / "runs" / "infer-a"
    extra = [{"id": "n0", "task_type": "regression", "dataset": "boneresorption", "split": "val", "answer": "20.0",
              "prediction": "about twenty"},
             {"id": "r0", "task_type": "report_generation", "dataset": "IU_XRay", "split": "val",
              "answer": "No effusion.", "prediction": "Normal."}]
    write_jsonl(infer / "predictions.jsonl", read_jsonl(infer / "predictions.jsonl") + extra)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    block = metrics["a"]
    block.update(file_sha256=file_digest(infer / "predictions.jsonl"), n=6)
    block["official"].update(regression={"mean_absolute_error": "Infinity"}, report_generation={"green_score": None})
    block["official_by_dataset"].update(boneresorption={"mean_absolute_error": "Infinity"},
                                        IU_XRay={"green_score": None})

    def compare_with(edit):
        edited = json.loads(json.dumps(metrics))
        edit(edited["a"])
        (run_dir / "metrics.json").write_text(json.dumps(edited))
        return comparison(root, ["a", "b"], resamples=20)

    assert "regression: mean_absolute_error" in "\n".join(compare_with(lambda b: None))  # as eval wrote it
    for edit, said in (
            (lambda b: b["official"]["regression"].update(mean_absolute_error=2.0),
             r"regression.mean_absolute_error: 2.0 in metrics.json, inf from the predictions it scored"),
            (lambda b: b["official_by_dataset"]["chestdr"].update(f1_score=None),
             r"chestdr \(multi_label\).f1_score: None in metrics.json, 0.25 from the predictions it scored"),
            (lambda b: b["official"]["report_generation"].update(green_score=0.7),
             r"report_generation.green_score: 0.7 in metrics.json, no judgment eval kept \(no judge ran")):
        with pytest.raises(ValueError, match=rf"runs.compare: a: {said}"):
            compare_with(edit)


def test_one_model_emptied_by_hand_in_an_eval_of_several_is_named_not_dropped(tmp_path):
    """A three-model eval whose one block's official part was emptied: compare left that model's column out and
    the listing counted two models, without a word."""
    root = tmp_path / "out"
    run_dir = _eval(root, "a", 1)
    _eval(root, "b", 4)
    metrics = run_dir / "metrics.json"
    blocks = json.loads(metrics.read_text())
    blocks = {"x": {**blocks["a"], "official": {}}, **blocks}
    metrics.write_text(json.dumps(blocks))
    with pytest.raises(ValueError, match=r"metrics.json: the block of x holds no official metric: edited since"):
        comparison(root, ["a", "b"], resamples=20)
    row = next(r for r in listing(root)[1] if r[0] == "a")
    assert row[2] == "DONE (metrics.json unreadable)" and "the block of x holds no official metric" in row[5]


def test_a_sweep_report_does_not_rank_by_a_number_typed_into_a_jobs_metrics(tmp_path):
    """The sweep report ranked its jobs by a number edited into one job's metrics.json (the listing and
    runs.compare already recompute it): that job is left out of the ranking, said in its error column."""
    from flare_exp.reports.sweep import write_sweep_report

    sweep = tmp_path / "out" / "sweeps" / "s"
    for number, hits in ((0, 1), (1, 3)):
        job = sweep / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- reward.x.weights.y={number}\n")
        rows = [{"id": f"q{i}", "task_type": "multi_label", "dataset": "chestdr", "split": "val",
                 "answer": "effusion", "prediction": "effusion" if i < hits else "edema"} for i in range(4)]
        write_jsonl(job / "infer" / "predictions.jsonl", rows)
        block = {"file": str(job / "infer" / "predictions.jsonl"),
                 "file_sha256": file_digest(job / "infer" / "predictions.jsonl"), "n": 4, "split": "val",
                 "official": {"multi_label": {"f1_score": hits / 4}}, "official_by_dataset": {}}
        (job / "eval").mkdir()
        (job / "eval" / "metrics.json").write_text(json.dumps({"m": block}))
        (job / "DONE").write_text("")
    write_sweep_report(sweep, None)
    assert [line.split("|")[2].strip() for line in (sweep / "report" / "sweep.md").read_text().splitlines()
            if line.startswith("| 1 ")] == ["1"]  # job 1 (0.75) ranks first
    edited = sweep / "0" / "eval" / "metrics.json"
    edited.write_text(edited.read_text().replace('"f1_score": 0.25', '"f1_score": 0.99'))
    write_sweep_report(sweep, None)
    text = (sweep / "report" / "sweep.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["1"].startswith("| 1 |") and "| 0.99 |" not in text
    assert "multi_label.f1_score: 0.99 in metrics.json, 0.25 from the predictions it scored: metrics.json edited" \
        in rows["0"] and not rows["0"].startswith("| 1 |")


def test_every_named_runs_problem_is_said_at_once(tmp_path):
    """runs.compare=[a,nonexist] with a's predictions gone named a's problem alone; a rerun then named the next."""
    root = tmp_path / "out"
    _eval(root, "a", 1), _eval(root, "b", 4)
    (root / "runs" / "infer-a" / "predictions.jsonl").unlink()
    with pytest.raises(ValueError, match=r"runs.compare: 2 problems:\n  1\. a: its eval scored .*\n  2\. no run "
                                         r"'nonexist' under"):
        comparison(root, ["a", "nonexist", "b"], resamples=20)


def test_an_eval_whose_regression_flare_aborts_is_not_called_edited(tmp_path):
    """A 'nan' prediction stops FLARE's evaluator: eval writes no number (aborted); the listing's recomputation gave
    NaN and called the untouched metrics.json edited, and runs.compare refused it."""
    from flare_exp.main import run
    from flare_exp.runs_compare import listed_disagreement

    root = tmp_path / "out"
    rows = [{"id": f"boneresorption/{i}", "dataset": "boneresorption", "task_type": "regression", "split": "val",
             "answer": "5", "prediction": p, "model": "m"} for i, p in enumerate(["nan", "4"])]
    write_jsonl(tmp_path / "p.jsonl", rows)
    run(compose_cfg(["stage=eval", f"paths.output_root={root}", f"eval.predictions=[{tmp_path / 'p.jsonl'}]",
                     "eval.radgraph=false", f"data.prepared_dir={tmp_path / 'hand_made'}"]), run_dir=root / "runs" / "e")
    assert json.loads((root / "runs" / "e" / "metrics.json").read_text())["m"]["official"]["regression"]["aborted"]
    assert listed_disagreement(root / "runs" / "e", root) is None


def test_an_aborted_regression_is_said_in_the_listing_and_the_paired_table(tmp_path):
    """FLARE's evaluator stops on a NaN or infinite regression value (no number): the listing's headline was
    blank and the paired table read NaN."""
    import math

    from flare_exp.catalog import headline
    from flare_exp.reports.eval_report import significance_rows

    run_dir = tmp_path / "aborted"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"aborted": {"file": "p.jsonl", "n": 2, "official": {
        "regression": {"mean_absolute_error": None, "aborted": True, "abort_ids": ["b/1"]}}}}))
    assert headline(run_dir).startswith("regression.mean_absolute_error=aborted")
    row = significance_rows([{"run_a": "A", "run_b": "E", "task": "regression", "metric": "mean_absolute_error",
                              "a": 15.0625, "b": math.nan, "difference": math.nan, "n": 8}])[0]
    assert row[2:5] == ["15.0625", "aborted", "n/a"] and "NaN" not in row, row
