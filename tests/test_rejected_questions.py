"""A question prepare rejected (an unreadable image) is still one FLARE scores: a test submission without it goes
to submission_subset/ with a warning naming why, infer's summary counts it, and eval's report says the metrics
cover fewer questions than the split has."""
import json
import shutil

from conftest import compose_cfg
from flare_exp.data.rejects import rejected_questions
from flare_exp.io import read_jsonl
from flare_exp.main import run


def _break_first_image(root, questions: str) -> None:
    file = root / questions
    first = json.loads(file.read_text())[0]["ImageName"]
    image = file.parent / (first[0] if isinstance(first, list) else first)
    image.write_bytes(image.read_bytes()[:300])  # a download cut short


def test_a_rejected_test_question_keeps_the_submission_a_subset(tmp_path, base_overrides, demo_prepared, caplog):
    root = shutil.copytree(demo_prepared.parent / "raw", tmp_path / "raw")  # the demo tree, its marker too
    _break_first_image(root, "testing/Xray/chestdr/chestdr_questions_test.json")
    _break_first_image(root, "val/validation-public/Xray/chestdr/chestdr_questions_val.json")
    prepared = tmp_path / "prepared"
    data = [f"data.root={root}", f"data.prepared_dir={prepared}"]
    run(compose_cfg(["stage=prepare", *base_overrides, *data]), run_dir=tmp_path / "prep")
    splits = {r["split"] for r in read_jsonl(prepared / "rejects.jsonl")}
    assert splits == {"test", "val"}
    assert rejected_questions(prepared / "test.jsonl")["count"] == 1
    assert rejected_questions(prepared / "train.jsonl") is None
    assert rejected_questions(tmp_path / "elsewhere.jsonl") is None  # no prepared split: nothing to count

    out = tmp_path / "infer"
    summary = run(compose_cfg(["stage=infer", *base_overrides, *data, "infer.split=test", "infer.max_new_tokens=2"]),
                  run_dir=out)
    assert summary["rejected_at_prepare"] == 1 and summary["submission_complete"] is False
    assert (out / "submission_subset").is_dir() and not (out / "submission").exists()
    assert "1 question(s) of the test split that prepare rejected (corrupt image: 1; see" in caplog.text

    infer_val = tmp_path / "infer-val"
    run(compose_cfg(["stage=infer", *base_overrides, *data, "infer.split=val", "infer.max_new_tokens=2"]),
        run_dir=infer_val)
    run(compose_cfg(["stage=eval", *base_overrides, *data, f"eval.predictions=[{infer_val}]"]),
        run_dir=tmp_path / "eval")
    report = (tmp_path / "eval" / "report.md").read_text()
    total = len(read_jsonl(prepared / "val.jsonl")) + 1
    assert (f"1 question(s) of the val split that prepare rejected (corrupt image: 1; see {prepared / 'rejects.jsonl'})"
            f" are in no prepared split: the numbers cover {total - 1} of the split's {total} questions") in report
    assert json.loads((out / "infer_summary.json").read_text())["rejected_at_prepare"] == 1
