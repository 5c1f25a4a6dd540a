"""A question prepare rejected (an unreadable image) is still one FLARE scores: a test submission without it goes
to submission_subset/ with a warning naming why, infer's summary counts it, and eval's report says the metrics
cover fewer questions than the split has."""
import json
import shutil

import pytest

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


def test_rejects_no_split_can_be_told_of_are_said_as_unknown_not_as_none(tmp_path):
    """A prepare from before the split tags, a torn rejects.jsonl, or one deleted while summary.json counts rejects:
    the split's rejected questions are not known, and that is said (they read as none: a submission was declared
    complete without them); duplicates are answered by the record kept, so they never count."""
    from flare_exp.data.rejects import describe_rejected

    split = tmp_path / "test.jsonl"
    split.write_text("")
    rejects = tmp_path / "rejects.jsonl"
    old = [{"file": "t.json", "index": 0, "reason": "corrupt image a.png: OSError"},
           {"file": "t.json", "index": 1, "reason": "duplicate ImageName||Question"}]
    rejects.write_text("\n".join(json.dumps(r) for r in old) + "\n")
    found = rejected_questions(split)
    assert found["count"] is None and found["at_most"] == 1 and "names no split for them" in found["why"]
    assert describe_rejected(found, "test").startswith("up to 1 question(s) of the test split that prepare "
                                                       "rejected (which split each was for is not known")
    rejects.write_text(rejects.read_text() + '{"file": "t.json", "ind')  # torn
    (tmp_path / "summary.json").write_text(json.dumps({"rejects": {"corrupt image": 2,
                                                                   "duplicate ImageName||Question": 5}}))
    found = rejected_questions(split)
    assert found["at_most"] == 2 and "cannot be read (" in found["why"]
    rejects.unlink()
    assert rejected_questions(split)["why"].endswith("is gone, while prepare's summary.json counts them")
    (tmp_path / "summary.json").write_text(json.dumps({"rejects": {"duplicate ImageName||Question": 5}}))
    assert rejected_questions(split) is None  # only duplicates: every question is answered
    rejects.write_text(json.dumps({**old[0], "split": "val"}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"rejects": {"corrupt image": 1}}))  # as prepare writes both
    assert rejected_questions(split) is None and rejected_questions(tmp_path / "val.jsonl")["count"] == 1
    (tmp_path / "summary.json").write_text(json.dumps({"rejects": {"corrupt image": 3}}))  # 2 lines deleted by hand
    found = rejected_questions(split)
    assert found["at_most"] == 3 and "lists 1 rejected question(s) and prepare's summary.json 3" in found["why"]
    rejects.write_text("")  # emptied by hand
    assert rejected_questions(split)["at_most"] == 3


def test_an_infer_whose_rejects_name_no_split_does_not_call_its_submission_complete(tmp_path, base_overrides,
                                                                                     demo_prepared, caplog):
    prepared = shutil.copytree(demo_prepared, tmp_path / "prepared")
    untagged = {"file": "t.json", "index": 0, "reason": "corrupt image"}  # a prepare before the split tags
    (prepared / "rejects.jsonl").write_text(json.dumps(untagged) + "\n")
    summary = run(compose_cfg(["stage=infer", *base_overrides, f"data.prepared_dir={prepared}", "infer.split=test",
                               "infer.max_new_tokens=2"]), run_dir=tmp_path / "infer")
    assert summary["submission_complete"] is None and summary["rejected_at_prepare"] == "up to 1, split unknown"
    assert "may have no prediction" in caplog.text and "the submission may lack some" in caplog.text


def test_a_dataset_missing_from_the_test_folders_keeps_the_submission_a_subset(tmp_path, base_overrides,
                                                                                 demo_prepared, caplog):
    """An archive not unpacked: testing/ lacks periapical and training/ lacks chestdr, which other splits have.
    Prepare says each (a warning), records them, and the test submission goes to submission_subset/ naming the
    dataset (it said it was whole, with none of periapical's questions)."""
    root = shutil.copytree(demo_prepared.parent / "raw", tmp_path / "raw")
    shutil.rmtree(root / "testing" / "Xray" / "periapical")
    shutil.rmtree(root / "training" / "Xray" / "chestdr")
    prepared = tmp_path / "prepared"
    data = [f"data.root={root}", f"data.prepared_dir={prepared}"]
    with caplog.at_level("WARNING"):
        run(compose_cfg(["stage=prepare", *base_overrides, *data]), run_dir=tmp_path / "prep")
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["datasets_without_questions"] == {"train": ["chestdr"], "test": ["periapical"]}
    assert "prepare: test (FLARE folders testing/) has no question file of periapical, while other splits do" \
           in caplog.text
    assert "train (FLARE folders training/) has no question file of chestdr" in caplog.text

    out = tmp_path / "infer"
    summary = run(compose_cfg(["stage=infer", *base_overrides, *data, "infer.split=test", "infer.max_new_tokens=2"]),
                  run_dir=out)
    assert summary["submission_complete"] is False and summary["datasets_without_questions"] == ["periapical"]
    assert "datasets_left_out" not in summary
    assert (out / "submission_subset").is_dir() and not (out / "submission").exists()
    assert "infer: the test split has no question of periapical" in caplog.text
    # the prepared test split given as infer.input_file (infer.split left at val): a test submission all the same
    given = run(compose_cfg(["stage=infer", *base_overrides, *data, f"infer.input_file={prepared / 'test.jsonl'}",
                             "infer.max_new_tokens=2", "run_name=given"]), run_dir=tmp_path / "given")
    assert given["submission_complete"] is False and (tmp_path / "given" / "submission_subset").is_dir()
    # a link to the prepared file is read as the prepared file; a copy elsewhere (or a part of it) cannot be held
    # against prepare's record: submission_subset/, completeness not known (it said submission/, complete)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.jsonl").symlink_to(prepared / "test.jsonl")
    shutil.copy(prepared / "test.jsonl", tmp_path / "elsewhere" / "test.jsonl")
    for name, complete in (("link.jsonl", False), ("test.jsonl", None)):
        got = run(compose_cfg(["stage=infer", *base_overrides, *data, "infer.max_new_tokens=2", f"run_name={name}",
                               f"infer.input_file={tmp_path / 'elsewhere' / name}"]), run_dir=tmp_path / name)
        assert got["submission_complete"] is complete and (tmp_path / name / "submission_subset").is_dir(), name
        assert got["split"] == "test"  # the records' own split (infer.split was left at val)
    assert "is no prepared split" in got["submission_unverified"]
    assert "whether these 14 test questions are all of the split's is not known" in caplog.text
    # prepare's record edited or cut by hand: said, and nothing vouched for
    from flare_exp.data.rejects import what_the_split_lacks

    records = [json.loads(line) for line in (prepared / "test.jsonl").read_text().splitlines()]
    assert what_the_split_lacks(prepared / "test.jsonl", records) == ({"datasets_without_questions": ["periapical"]},
                                                                      None)
    assert "prepare wrote 14 (edited or cut" in what_the_split_lacks(prepared / "test.jsonl", records[3:]).unverified
    text = (prepared / "summary.json").read_text()
    for edit in ({"test": "periapical"}, ["periapical"], None, {"testing": ["periapical"]}, {"test": [1]}):
        (prepared / "summary.json").write_text(json.dumps({**json.loads(text), "datasets_without_questions": edit}))
        lacking, unverified = what_the_split_lacks(prepared / "test.jsonl", records)
        assert lacking == {} and "datasets_without_questions is not a list of dataset names by split" in unverified
    (prepared / "summary.json").write_text(text[:300])
    assert "summary.json does not read" in what_the_split_lacks(prepared / "test.jsonl", records).unverified


def test_an_empty_test_question_file_and_datasets_left_out_keep_the_submission_a_subset(tmp_path, base_overrides,
                                                                                         demo_prepared, caplog):
    """A test question file holding [] is a dataset the split has no question of (prepare warned of the file, and
    infer called the submission complete); data.datasets leaving out a dataset that testing/ holds makes a
    submission FLARE scores as lacking it: both go to submission_subset/, each said with its own cause."""
    root = shutil.copytree(demo_prepared.parent / "raw", tmp_path / "raw")
    (emptied,) = (root / "testing" / "Xray" / "dental").glob("dental_questions_test*.json")
    emptied.write_text("[]")
    prepared = tmp_path / "prepared"
    data = [f"data.root={root}", f"data.prepared_dir={prepared}", "data.datasets=[IU_XRay,chestdr,dental,periapical]"]
    with caplog.at_level("INFO"):
        run(compose_cfg(["stage=prepare", *base_overrides, *data]), run_dir=tmp_path / "prep")
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["datasets_without_questions"] == {"test": ["dental"]}
    assert summary["datasets_left_out"] == {"test": ["boneresorption"]}
    assert "prepare: test has no question of dental (their question files there hold no record): a test submission " \
           "misses their questions" in caplog.text and "put their records back in those files" in caplog.text
    assert "data.datasets leaves out boneresorption, whose question files are under testing/" in caplog.text
    out = tmp_path / "infer"
    summary = run(compose_cfg(["stage=infer", *base_overrides, *data, "infer.split=test", "infer.max_new_tokens=2"]),
                  run_dir=out)
    assert summary["submission_complete"] is False and (out / "submission_subset").is_dir()
    assert summary["datasets_without_questions"] == ["dental"]
    assert summary["datasets_left_out"] == ["boneresorption"]
    assert "infer: the test split has no question of dental (prepare read no question of theirs" in caplog.text
    assert "infer: the test split has no question of boneresorption (data.datasets left them out" in caplog.text
    # the same prepared dir with every dataset asked for: said as left out by that prepare (it said "added")
    from flare_exp.data.prepare_inputs import check_prepared_questions

    every = compose_cfg(["stage=infer", *base_overrides, f"data.root={root}", f"data.prepared_dir={prepared}",
                         "infer.split=test"])
    with pytest.raises(ValueError, match=r"data.datasets names boneresorption, which the prepare in \S+ left out "
                                         r"while testing holds their question files"):
        check_prepared_questions(every, [prepared / "test.jsonl"])
