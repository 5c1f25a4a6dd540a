"""A prepared split edited by hand since prepare wrote it: sft, rl and infer refuse what prepare would never have
written, naming the file, the record and what is wrong, before any model loads."""
import copy
import json

import pytest

from conftest import compose_cfg
from flare_exp.data.prepared_split import read_prepared_split
from flare_exp.io import read_jsonl, write_jsonl
from flare_exp.main import run


def _edited(demo_prepared, tmp_path, edit, name="val.jsonl"):
    rows = read_jsonl(demo_prepared / name)
    edit(rows)
    write_jsonl(tmp_path / name, rows)
    return tmp_path / name


def _drop_image_entry(rows):
    two = next(r for r in rows if len(r["images"]) == 2)
    two["messages"][0]["content"] = [p for p in two["messages"][0]["content"] if p.get("type") != "image"][:1] + \
        [p for p in two["messages"][0]["content"] if p.get("type") == "image"][:1]


@pytest.mark.parametrize("edit, said", [
    (lambda rows: rows.insert(3, copy.deepcopy(rows[2])), r"record 4 \(id \S+\): the id of record 3 again"),
    (lambda rows: rows[1].update(task_type="banana"), r"record 2 \(id \S+\): task_type 'banana' is none of"),
    (lambda rows: rows[0].pop("messages"), r"record 1 \(id \S+\): no 'messages'"),
    (lambda rows: rows[0].update(images=["/etc/hostname"] * len(rows[0]["images"])),
     r"the image '/etc/hostname' lies outside data.root"),
    (lambda rows: rows[0].update(images=["../../../etc/passwd"] * len(rows[0]["images"])),
     r"the image '../../../etc/passwd' lies outside data.root"),
    (_drop_image_entry, r"its messages show 1 image\(s\) and its 'images' list 2"),
    (lambda rows: rows.__setitem__(0, ["not", "a", "record"]), r"record 1: a list, not a record"),
    (lambda rows: rows[0].update(answer=[rows[0]["answer"]]), r"record 1 \(id \S+\): 'answer' is a list, not text"),
    (lambda rows: rows[0].update(answer=5), r"'answer' is a int, not text"),
    (lambda rows: rows[0].update(answer="  "), r"'answer' is empty \(prepare writes none"),
])
def test_what_prepare_would_not_have_written_is_named(demo_prepared, tmp_path, edit, said):
    path = _edited(demo_prepared, tmp_path, edit)
    with pytest.raises(ValueError, match=said + r".*Undo the edit, or rerun stage=prepare"):
        read_prepared_split(path)


def test_the_split_as_prepare_wrote_it_reads_whole(demo_prepared):
    for name in ("train.jsonl", "val.jsonl"):
        assert read_prepared_split(demo_prepared / name) == read_jsonl(demo_prepared / name)


def test_infer_refuses_an_edited_split_before_loading_a_model(base_overrides, demo_prepared, tmp_path):
    path = _edited(demo_prepared, tmp_path, lambda rows: rows.insert(1, copy.deepcopy(rows[0])))
    cfg = compose_cfg(["stage=infer", *base_overrides, f"infer.input_file={path}"])
    with pytest.raises(ValueError, match=r"val.jsonl: 1 record\(s\) are not as prepare writes them"):
        run(cfg, run_dir=tmp_path / "infer")
    assert not (tmp_path / "infer" / "predictions.jsonl").exists()
    assert json.loads((tmp_path / "infer" / "run_info.json").read_text())  # the attempt is on record


def test_eval_refuses_answers_that_are_not_text_and_names_the_split_of_an_empty_one(demo_prepared, tmp_path):
    """A prepared split whose multi-label answers were rewritten as lists (or a class as a number) was scored F1 0 /
    balanced accuracy 0 with no caveat; a val answer set to null was called "the test split"."""
    from flare_exp.data.predictions import load_rows

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    rows = read_jsonl(demo_prepared / "val.jsonl")[:6]
    predictions = tmp_path / "predictions.jsonl"
    write_jsonl(predictions, [{"id": r["id"], "prediction": "x", "split": "val"} for r in rows])
    for edit, said in ((lambda r: r.update(answer=[r["answer"]]), r"are not text or empty, e.g. .*\(a list\).*rerun "
                                                                   r"stage=prepare"),
                       (lambda r: r.update(answer=" "), r"are not text or empty, e.g. \S+: ' ' \(a str\)"),
                       (lambda r: r.update(answer=None), r"no ground truth .*their answers in the val split .* are "
                                                         r"empty \(edited since\?\)")):
        edited = copy.deepcopy(rows)
        edit(edited[2])
        write_jsonl(prepared / "val.jsonl", edited)
        with pytest.raises(ValueError, match=said):
            load_rows(predictions, False, str(prepared))


def test_the_split_an_infer_run_read_is_found_from_where_it_was_launched(tmp_path, monkeypatch):
    """A relative data.prepared_dir in an infer run's config.yaml was taken from eval's working directory: launched
    elsewhere, eval found no split, scored edited answers unchecked and said the split was gone."""
    from flare_exp.data.references import run_split

    run_dir = tmp_path / "runs" / "inf"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("data:\n  prepared_dir: .cache/prepared\ninfer:\n  split: val\n  input_file: null\n")
    (run_dir / "run_info.json").write_text(json.dumps({"launch_dir": str(tmp_path / "clone")}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_split(run_dir / "predictions.jsonl") == tmp_path / "clone" / ".cache" / "prepared" / "val.jsonl"
