import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose_cfg
from flare_exp.fixtures.demo_data import generate_demo
from flare_exp.io import read_jsonl
from flare_exp.main import run
from flare_exp.run.record import RunFinishedError


def _cfg(tmp_path, root, *extra):
    return compose_cfg(["~experiment", "data=flare_xray", "model=tiny", "stage=prepare",
                        f"data.root={root}", f"paths.output_root={tmp_path / 'out'}",
                        f"paths.cache_dir={tmp_path / 'cache'}", *extra])


def _prepare(tmp_path, root, *extra):
    cfg = _cfg(tmp_path, root, *extra)
    run(cfg, run_dir=tmp_path / "run")
    return tmp_path / "out" / "prepared" / "flare_xray"


@pytest.fixture
def demo_root(tmp_path):
    return generate_demo(tmp_path / "raw", seed=0)


def test_demo_is_deterministic(tmp_path):
    a, b = generate_demo(tmp_path / "a", seed=3), generate_demo(tmp_path / "b", seed=3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = generate_demo(tmp_path / "c", seed=4)
    assert (a / "training/Xray/IU_XRay/IU_XRay_questions_train.json").read_text() != \
        (c / "training/Xray/IU_XRay/IU_XRay_questions_train.json").read_text()


def test_demo_has_the_real_flare_layout(demo_root):
    assert (demo_root / "training/Xray/periapical.zip").exists()  # nested archive, unzipped by prepare
    assert (demo_root / "val/validation-public/Xray/IU_XRay/IU_XRay_all_val.json").exists()
    tests = json.loads((demo_root / "testing/Xray/dental/dental_questions_test.json").read_text())
    assert tests and all("Answer" not in r for r in tests)
    iu = json.loads((demo_root / "training/Xray/IU_XRay/IU_XRay_questions_train.json").read_text())
    assert {r["TaskType"] for r in iu} == {"Report_Generation"}
    assert all(isinstance(r["ImageName"], list) and len(r["ImageName"]) == 2 for r in iu)


def test_prepare_demo(tmp_path, demo_root):
    out = _prepare(tmp_path, demo_root, "data.val_splits=[validation-public,validation-hidden]")
    train, val, test = (read_jsonl(out / f"{s}.jsonl") for s in ("train", "val", "test"))
    assert {r["dataset"] for r in train} == {"IU_XRay", "chestdr", "dental", "periapical", "boneresorption"}
    assert {r["task_type"] for r in train} == {"report_generation", "multi_label", "classification", "regression"}
    for r in train + val + test:
        assert set(r) >= {"id", "dataset", "task_type", "split", "images", "question", "answer", "messages"}
        assert all((demo_root / p).is_file() for p in r["images"])
        user = r["messages"][0]["content"]
        assert [p["type"] for p in user] == ["image"] * len(r["images"]) + ["text"]
    iu = [r for r in train if r["dataset"] == "IU_XRay"]
    assert all(r["images"][0].endswith("-0.png") and r["images"][1].endswith("-1.png") for r in iu)
    assert any(r["image_name"][0].endswith("-1.png") for r in iu)  # some came lateral-first
    assert all(r["answer"] is None and len(r["messages"]) == 1 for r in test)
    assert all(r["messages"][1]["content"][0]["text"] == r["answer"] for r in train)
    assert any("Endodontic Treatment, Restorative Treatment, and Complications" in r["answer"]
               for r in train if r["dataset"] == "periapical")
    assert any(r["answer"] in "GHIJK" for r in train + val if r["dataset"] == "dental")
    assert len({r["id"] for r in train + val + test}) == len(train + val + test)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == {"train": len(train), "val": len(val), "test": len(test)}
    assert (out / "DONE").exists() and (tmp_path / "run" / "config.yaml").exists()
    done = json.loads((out / "DONE").read_text())  # the run dir the catalog lists says what prepare took
    assert done["seconds"] > 0 and json.loads((tmp_path / "run" / "DONE").read_text()) == done
    assert (demo_root / "training/Xray/periapical.zip.unzipped").exists()


def test_an_archive_replaced_after_extracting_is_extracted_again(tmp_path):
    """A re-downloaded archive over an extracted one (its marker records the size, time and sha1 it was
    extracted at) is pending again; the same bytes copied again (new times) are not, and the marker takes the new
    time. A marker of an earlier version, without a record, is pending only when the archive is newer."""
    import os
    import zipfile

    from flare_exp.data.unzip import pending_zips, unzip_nested

    archive = tmp_path / "training" / "set.zip"
    marker = archive.with_name("set.zip.unzipped")
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/a_questions_train.json", "[]")
    assert unzip_nested(tmp_path) == 1 and pending_zips(tmp_path) == []
    later = archive.stat().st_mtime_ns + 10**9
    os.utime(archive, ns=(later, later))  # copied again, same bytes
    assert pending_zips(tmp_path) == [] and f"modified {later}," in marker.read_text()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/a_questions_train.json", '[{"corrected": 1}]')
    assert pending_zips(tmp_path) == [archive]
    assert unzip_nested(tmp_path) == 1 and "corrected" in (tmp_path / "training/set/a_questions_train.json").read_text()
    marker.write_text("extracted by flare_exp prepare\n")  # an earlier version's marker, newer than the archive
    assert pending_zips(tmp_path) == []
    newer = marker.stat().st_mtime_ns + 10**9
    os.utime(archive, ns=(newer, newer))  # the archive replaced after that version extracted it
    assert pending_zips(tmp_path) == [archive]


def test_files_deleted_since_their_archive_was_extracted_come_back_from_it(tmp_path, caplog):
    """The marker said extracted, but the folder was cleaned up (or a copy of the download kept the markers): a
    new prepare trusted the marker and rejected every question as 'missing image'. The files gone come back from
    the archive; one edited in place is left as it is."""
    import zipfile

    from flare_exp.data.unzip import pending_zips, unzip_nested, why_pending

    archive = tmp_path / "training" / "set.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/imagesTr/a.png", "a")
        zf.writestr("set/imagesTr/b.png", "b")
        zf.writestr("set/a_questions_train.json", "[]")
    assert unzip_nested(tmp_path) == 1
    images = tmp_path / "training" / "set" / "imagesTr"
    (images / "a.png").unlink()
    (tmp_path / "training/set/a_questions_train.json").write_text('[{"edited": 1}]')
    assert pending_zips(tmp_path) == [archive]
    assert why_pending(archive) == ("extracted before, 1 of its files gone since (e.g. set/imagesTr/a.png): "
                                    "extracted again")  # a finished prepare's reuse names it so
    assert unzip_nested(tmp_path) == 1 and (images / "a.png").read_text() == "a"
    assert "edited" in (tmp_path / "training/set/a_questions_train.json").read_text()
    assert "1 file(s) of" in caplog.text and "extracted before, are gone (e.g. set/imagesTr/a.png)" in caplog.text
    assert pending_zips(tmp_path) == []
    for name in ("a.png", "b.png"):
        (images / name).unlink()
    images.rmdir()
    assert unzip_nested(tmp_path) == 1 and sorted(p.name for p in images.iterdir()) == ["a.png", "b.png"]


def test_a_whole_split_of_a_dataset_rejected_is_said(tmp_path, demo_root, caplog):
    """Hand-edited answers with decimal commas (or its images gone): every training question of boneresorption
    rejected, prepare finished without a word while its val split kept it going (an emptied file was said)."""
    questions = demo_root / "training/Xray/boneresorption/boneresorption_questions_train.json"
    records = json.loads(questions.read_text())
    for record in records:
        record["Answer"] = str(record["Answer"]).replace(".", ",") if "." in str(record["Answer"]) else \
            f"{record['Answer']},5"
    questions.write_text(json.dumps(records))
    out = _prepare(tmp_path, demo_root)
    assert not any(r["dataset"] == "boneresorption" for r in read_jsonl(out / "train.jsonl"))
    assert f"prepare: train gets nothing from boneresorption: its {len(records)} questions there were all " \
           f"rejected ({len(records)} regression answer not a finite number (decimal comma); each in" in caplog.text
    reason = read_jsonl(out / "rejects.jsonl")[0]["reason"]
    assert reason.endswith("is not a finite number (a decimal comma? FLARE's evaluator reads float(answer): write "
                           "it with a point)")


def test_question_files_named_or_placed_as_copies_are_said_not_skipped_silently(tmp_path, caplog):
    """A second download unpacked beside the first ("training (1)/"), or a file saved twice ("... (1).json"):
    not FLARE's names, so not read, and said (they may hold the data meant); other JSON files are not."""
    from flare_exp.data.question_files import question_files, unread_copies

    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD])
    for copy in (root / "training (1)" / "Xray" / "chestdr" / "chestdr_questions_train.json",
                 d / "chestdr_questions_train (1).json", d / "Copy of chestdr_questions_train.json",
                 d / "chestdr_questions_train - Copy (2).json", d / "chestdr_questions_train(3).json",
                 d / "dental_questions_train copy.json",
                 d / "notes (1).json"):
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(json.dumps([GOOD]))
    unread = unread_copies(root, question_files(root), ["chestdr"])
    assert sorted(str(p.relative_to(root)) for p in unread) == [  # dental's: not asked for; notes: no name
        "training (1)/Xray/chestdr/chestdr_questions_train.json",
        "training/Xray/chestdr/Copy of chestdr_questions_train.json",
        "training/Xray/chestdr/chestdr_questions_train (1).json",
        "training/Xray/chestdr/chestdr_questions_train - Copy (2).json",
        "training/Xray/chestdr/chestdr_questions_train(3).json"]
    _prepare(tmp_path, root, "data.datasets=[chestdr]")
    assert "prepare: 5 question file(s) not read, named or placed as a copy (no FLARE name), e.g. " in caplog.text


def test_a_broken_archive_of_a_dataset_not_asked_for_is_passed_over(tmp_path, caplog):
    """A cut chestdr.zip stops no prepare of dental alone (said), nor its reuse; one that may hold the data asked
    for stops it, saying what to do."""
    from flare_exp.data.unzip import PrepareError, pending_zips, unzip_nested

    broken = tmp_path / "training" / "Xray" / "chestdr.zip"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PK\x03\x04 cut short")
    caplog.set_level("WARNING", logger="flare_exp.data.unzip")
    assert unzip_nested(tmp_path, ["dental"]) == 0
    assert "chestdr.zip is not a valid zip file" in caplog.text and "passed over" in caplog.text
    assert pending_zips(tmp_path) == [broken]  # left as it is, for a prepare that asks for chestdr
    with pytest.raises(PrepareError, match=r"chestdr.zip: not a valid zip file .*Download it again, or move it out"):
        unzip_nested(tmp_path, ["chestdr", "dental"])
    with pytest.raises(PrepareError, match="not a valid zip file"):  # a name that says no dataset: may hold any
        (tmp_path / "training" / "Xray" / "images_part2.zip").write_bytes(b"PK\x03\x04 cut")
        unzip_nested(tmp_path, ["dental"])


def test_rerun_refuses_then_overwrite(tmp_path, demo_root):
    out = _prepare(tmp_path, demo_root)
    before = (out / "train.jsonl").read_bytes()
    with pytest.raises(RunFinishedError, match=r"overwrite=true .* or choose another data.prepared_dir= \(prepare writes there"):
        _prepare(tmp_path, demo_root)
    _prepare(tmp_path, demo_root, "overwrite=true")  # idempotent unzip, same output
    assert (out / "train.jsonl").read_bytes() == before


def test_the_run_dir_of_a_failed_prepare_into_another_dir_says_failed_not_the_last_done(tmp_path, demo_root):
    """Hydra's run dir records each prepare launch, whatever its prepared dir: a later prepare that failed left
    the earlier one's DONE beside its own config, and the runs table listed the failure as DONE. (Into another
    prepared dir under a finished prepare's record it is refused now, unless overwrite=true.)"""
    _prepare(tmp_path, demo_root, f"data.prepared_dir={tmp_path / 'pA'}")
    assert (tmp_path / "run" / "DONE").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=f"holds the record of a finished prepare into {tmp_path / 'pA'}"):
        _prepare(tmp_path, tmp_path / "empty", f"data.prepared_dir={tmp_path / 'pB'}")
    with pytest.raises(Exception, match="no train or val records at all"):
        _prepare(tmp_path, tmp_path / "empty", f"data.prepared_dir={tmp_path / 'pB'}", "overwrite=true")
    assert not (tmp_path / "run" / "DONE").exists() and "no train or val records" in (
        tmp_path / "run" / "FAILED").read_text()
    filed = sorted((tmp_path / "run" / "attempts").iterdir())
    assert (filed[-1] / "DONE").is_file()  # the earlier prepare's end, with its config


def test_instruction_prefix(tmp_path, demo_root):
    out = _prepare(tmp_path, demo_root, "+data.instructions.report_generation='Write the report.'")
    iu = [r for r in read_jsonl(out / "train.jsonl") if r["dataset"] == "IU_XRay"]
    assert iu[0]["messages"][0]["content"][-1]["text"].startswith("Write the report.\n")


def _small_tree(root: Path, records: list, dataset="chestdr", split="training", images=("a.png", "b.png")):
    from PIL import Image

    d = root / split / "Xray" / dataset
    (d / "imagesTr").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (32, 32), 128).save(d / "imagesTr" / name)
    (d / f"{dataset}_questions_train.json").write_text(json.dumps(records))
    return d


GOOD = {"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": "imagesTr/a.png",
        "Question": "Which?", "Answer": "Effusion, Mass", "Split": "train"}


def test_each_reject_reason(tmp_path):
    root = tmp_path / "raw"
    d = _small_tree(root, [
        GOOD,
        {**GOOD, "ImageName": "imagesTr/missing.png", "Question": "q1"},
        {**GOOD, "ImageName": "imagesTr/corrupt.png", "Question": "q2"},
        {k: v for k, v in GOOD.items() if k != "Question"},
        {**GOOD, "TaskType": "Detection", "Question": "q3"},
        {**GOOD, "Answer": "  ", "Question": "q4"},
        GOOD,  # duplicate ImageName||Question
        {**GOOD, "Question": "Which? \ud83d"},  # half of a surrogate pair: text cut inside a character
        {**GOOD, "ImageName": "imagesTr/a\udcff.png", "Question": "q5"},
        {**GOOD, "Question": 42},
        {**GOOD, "Answer": "Effusion"},  # the same question again, answered otherwise
    ])
    (d / "imagesTr" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [r["index"] for r in rejects] == list(range(10))  # of two answers the earlier (0), the later is kept
    reasons = [r["reason"] for r in rejects[1:] + rejects[:1]]
    assert reasons[0] == "missing image imagesTr/missing.png"
    assert reasons[1].startswith("corrupt image corrupt.png")
    assert reasons[2] == "missing key Question"
    assert reasons[3] == "unknown TaskType 'Detection'"
    assert reasons[4] == "empty answer"
    assert reasons[5].startswith("duplicate")
    assert reasons[6:] == ["Question is not valid Unicode (a lone UTF-16 surrogate: text cut inside a character)",
                           "ImageName is not valid Unicode (a lone UTF-16 surrogate: text cut inside a character)",
                           "Question is not text (int)",
                           "duplicate ImageName||Question with another answer ('Effusion, Mass'; a later record "
                           "of the question replaces it, as FLARE's evaluator keeps the last)"]
    assert json.loads((out / "summary.json").read_text())["rejects"][
        "duplicate ImageName||Question with another answer"] == 1
    assert all(r["file"] == "training/Xray/chestdr/chestdr_questions_train.json" for r in rejects)
    assert [r["answer"] for r in read_jsonl(out / "train.jsonl")] == ["Effusion"]  # FLARE keys by id: the last


def test_strict_mode_names_file_and_index(tmp_path):
    root = tmp_path / "raw"
    _small_tree(root, [GOOD, {**GOOD, "TaskType": "Segmentation", "Question": "q"}])
    with pytest.raises(ValueError, match=r"chestdr_questions_train.json record 1: unknown TaskType"):
        _prepare(tmp_path, root, "data.datasets=[chestdr]", "data.strict=true")


@pytest.mark.parametrize("encoding, question, said", [
    ("utf-16", "Which opacité?", "it looks like UTF-16, an editor's 'Unicode' save"),
    ("utf-16-le", "Which opacité?", "it looks like UTF-16"),  # no byte-order mark
    ("utf-16-le", "Which?", r"it looks like UTF-16 without a byte-order mark"),  # ASCII: valid UTF-8, with NULs
    ("utf-16-be", "Which?", r"it looks like UTF-16 without a byte-order mark"),
    ("latin-1", "Which opacité?", r"byte 0xe9 at position \d+: Latin-1 or Windows-1252")])
def test_a_question_file_saved_in_another_encoding_is_named_as_such(tmp_path, encoding, question, said):
    """Not 'malformed JSON' with a codec's message: the file is JSON in another encoding; save it as UTF-8."""
    root = tmp_path / "raw"
    d = _small_tree(root, [])
    text = json.dumps([{**GOOD, "Question": question}], ensure_ascii=False)
    (d / "chestdr_questions_train.json").write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=r"chestdr_questions_train.json: not UTF-8 text, as JSON is \(" + said):
        _prepare(tmp_path, root, "data.datasets=[chestdr]")


def test_malformed_json_names_the_file(tmp_path):
    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD])
    (d / "chestdr_questions_train.json").write_text('[{"TaskType": ')
    with pytest.raises(ValueError, match="chestdr_questions_train.json: malformed JSON"):
        _prepare(tmp_path, root, "data.datasets=[chestdr]")
    assert not (tmp_path / "out" / "prepared" / "flare_xray" / "DONE").exists()
    assert (tmp_path / "out" / "prepared" / "flare_xray" / "FAILED").exists()


@pytest.mark.parametrize("text,said", [
    ("", r"the file is empty \(0 bytes\): a download or copy cut short\?"),
    ("\n  \n", r"the file holds only white space \(4 bytes\)"),
    (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "Question": "q2"}) + "\n",
     r"one JSON object per line \(JSON Lines\), while FLARE's question files are one JSON list")])
def test_an_empty_or_json_lines_question_file_is_named_as_such(tmp_path, text, said):
    """Not the parser's 'Expecting value' / 'Extra data': what the file is, and what FLARE's files are."""
    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD])
    (d / "chestdr_questions_train.json").write_text(text)
    with pytest.raises(ValueError, match="chestdr_questions_train.json: " + said):
        _prepare(tmp_path, root, "data.datasets=[chestdr]")


def test_leakage_guard(tmp_path):
    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    val = root / "validation-public" / "Xray" / "chestdr"
    shutil.copytree(root / "training" / "Xray" / "chestdr" / "imagesTr", val / "imagesVal")
    (val / "chestdr_questions_val.json").write_text(json.dumps([{**GOOD, "ImageName": "imagesVal/a.png"}]))
    with pytest.raises(ValueError, match=r"(?s)1 studies appear in more than one split \(train/val: 1;.*chestdr:a.png"):
        _prepare(tmp_path, root, "data.datasets=[chestdr]")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "data.allow_overlap=true")
    assert len(read_jsonl(out / "val.jsonl")) == 1


def test_a_picture_kept_in_two_splits_with_answers_that_differ_is_a_doubt(tmp_path):
    """data.allow_overlap keeps a training picture copied into val; with another answer there, eval scores the
    model against the answer it was trained away from: counted and listed like a conflict within one split."""
    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    val = root / "validation-public" / "Xray" / "chestdr"
    shutil.copytree(root / "training" / "Xray" / "chestdr" / "imagesTr", val / "imagesVal")
    (val / "chestdr_questions_val.json").write_text(json.dumps([{**GOOD, "ImageName": "imagesVal/a.png",
                                                                  "Answer": "Effusion"}]))
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "data.allow_overlap=true")
    summary = json.loads((out / "summary.json").read_text())["same_pixels_other_answers"]
    assert summary["count"] == 1 and summary["first"][0].startswith("train+val: ")
    (listed,) = read_jsonl(out / "doubts.jsonl")
    assert listed["split"] == "train+val" and sorted(r["answer"] for r in listed["records"]) == [
        "Effusion", "Effusion, Mass"]


def test_leakage_guard_sees_the_same_picture_under_another_name(tmp_path):
    from PIL import Image

    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    val = root / "validation-public" / "Xray" / "chestdr"
    (val / "imagesVal").mkdir(parents=True)
    shutil.copy(root / "training/Xray/chestdr/imagesTr/a.png", val / "imagesVal" / "renamed.png")
    Image.new("RGB", (32, 32), 7).save(val / "imagesVal" / "other.png")
    recs = [{**GOOD, "ImageName": "imagesVal/renamed.png"}, {**GOOD, "ImageName": "imagesVal/other.png"}]
    (val / "chestdr_questions_val.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"(?s)^1 studies.*chestdr:a.png"):
        _prepare(tmp_path, root, "data.datasets=[chestdr]")


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root="):
        _prepare(tmp_path, tmp_path / "nope")


def test_launch_py_subprocess_refusal_is_a_message(tmp_path, session_dir, demo_prepared):
    """The real entry point refusing a finished prepare (the session's): exit 1 and the message only, the
    traceback with HYDRA_FULL_ERROR=1 (a whole `python launch.py`: tests/test_pipeline.py)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "launch.py", "stage=prepare", f"paths.output_root={tmp_path / 'out'}",
           f"paths.cache_dir={session_dir / 'cache'}"]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "overwrite=true" in again.stderr
    assert "flare-exp: RunFinishedError:" in again.stderr and "Traceback" not in again.stderr  # message only
    verbose = subprocess.run(cmd, cwd=REPO, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True,
                             timeout=300)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert (demo_prepared / "DONE").exists()


def test_a_second_prepare_of_one_download_waits_for_the_first_ones_unzip(tmp_path):
    """Two prepares of one download (into two prepared dirs) must not extract over each other: the second
    waits for the first's unzip lock, then finds the archive done; nothing is written where nothing is zipped."""
    import threading
    import time
    import zipfile

    from flare_exp.data.prepare import unzip_nested
    from flare_exp.run.lock import RunLock

    root = tmp_path / "raw"
    root.mkdir()
    assert unzip_nested(root) == 0 and list(root.iterdir()) == []
    with zipfile.ZipFile(root / "a.zip", "w") as archive:
        archive.writestr("a/x.txt", "x")
    other = RunLock(root, name=".flare_exp_unzip.lock").acquire()  # the first prepare, extracting
    threading.Timer(2.0, other.release).start()
    start = time.monotonic()
    assert unzip_nested(root) == 1 and time.monotonic() - start >= 1.5
    assert (root / "a" / "x.txt").read_text() == "x" and not (root / ".flare_exp_unzip.lock").exists()
    assert unzip_nested(root) == 0


def test_a_copy_of_the_tree_under_data_root_loses_to_the_real_one_and_is_said(tmp_path, caplog):
    """A backup of training/ kept inside data.root: the real (shallowest) question files win, the copy's
    records are rejected as duplicates, and the log names both folders."""
    root = tmp_path / "raw"
    _small_tree(root, [GOOD, {**GOOD, "Question": "q1"}])
    shutil.copytree(root / "training", root / "backup" / "training")
    with caplog.at_level("WARNING"):
        out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == 2 and all(r["images"][0].startswith("training/") for r in train)
    assert {r["file"] for r in read_jsonl(out / "rejects.jsonl")} == {
        "backup/training/Xray/chestdr/chestdr_questions_train.json"}
    assert "chestdr's training questions are in 2 folders" in caplog.text
    # a copy beside the real folder, at the same depth and first by name ("Copy of chestdr"), loses too
    shutil.rmtree(root / "backup")
    shutil.copytree(root / "training" / "Xray" / "chestdr", root / "training" / "Xray" / "Copy of chestdr")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "overwrite=true")
    assert all(r["images"][0].startswith("training/Xray/chestdr/") for r in read_jsonl(out / "train.jsonl"))
    assert {r["file"] for r in read_jsonl(out / "rejects.jsonl")} == {
        "training/Xray/Copy of chestdr/chestdr_questions_train.json"}
    # a copy of the modality folder ("Copy of Xray") too
    shutil.rmtree(root / "training" / "Xray" / "Copy of chestdr")
    shutil.copytree(root / "training" / "Xray", root / "training" / "Copy of Xray")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "overwrite=true")
    assert all(r["images"][0].startswith("training/Xray/chestdr/") for r in read_jsonl(out / "train.jsonl"))


def test_classification_answers_that_are_not_one_letter_are_kept_and_said(tmp_path, caplog):
    """'E.', '(e)' or a finding's name are what the download holds (FLARE scores against them as written): kept,
    counted in summary.json and said, since a model trained on them learns to write them."""
    dental = {"TaskType": "Classification", "Modality": "Xray", "ImageName": "imagesTr/a.png",
              "Question": "Which? A. x B. y C. z", "Split": "train"}
    root = tmp_path / "raw"
    _small_tree(root, [{**dental, "Answer": "B"}, {**dental, "Question": "q1 A. x B. y", "Answer": "B."},
                       {**dental, "Question": "q2", "Answer": "Impacted tooth"}], dataset="dental")
    with caplog.at_level("WARNING"):
        out = _prepare(tmp_path, root, "data.datasets=[dental]")
    said = json.loads((out / "summary.json").read_text())["classification_answers_not_one_letter"]
    assert said["count"] == 2 and {s.split(": ", 1)[1] for s in said["first"]} == {"'B.'", "'Impacted tooth'"}
    assert len(read_jsonl(out / "train.jsonl")) == 3
    assert "2 classification answer(s) are not one option letter" in caplog.text


def test_an_image_name_in_another_unicode_form_is_found_and_a_missing_one_says_why(tmp_path):
    """A name typed in NFC and stored on disk in NFD (macOS) is the same file; a name with a stray space, or a
    link to nothing, is said as such in the reject."""
    import os
    import unicodedata

    root = tmp_path / "raw"
    stored = unicodedata.normalize("NFD", "é.png")
    d = _small_tree(root, [{**GOOD, "ImageName": "imagesTr/" + unicodedata.normalize("NFC", "é.png")},
                           {**GOOD, "ImageName": "imagesTr/a.png ", "Question": "q1"},
                           {**GOOD, "ImageName": "imagesTr/link.png", "Question": "q2"}],
                    images=("a.png", stored))
    os.symlink(d / "imagesTr" / "gone.png", d / "imagesTr" / "link.png")
    os.symlink("loopb.png", d / "imagesTr" / "loopa.png")  # a loop: each link's target is there, no file is
    os.symlink("loopa.png", d / "imagesTr" / "loopb.png")
    questions = json.loads((d / "chestdr_questions_train.json").read_text())
    (d / "chestdr_questions_train.json").write_text(json.dumps(
        [*questions, {**GOOD, "ImageName": "imagesTr/loopa.png", "Question": "q3"}]))
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    (kept,) = read_jsonl(out / "train.jsonl")
    assert kept["images"] == [f"training/Xray/chestdr/imagesTr/{stored}"]
    reasons = [r["reason"] for r in read_jsonl(out / "rejects.jsonl")]
    assert reasons == ["missing image 'imagesTr/a.png ' (the dataset's folder holds imagesTr/a.png: an ImageName is "
                       "matched exactly, letter for letter; correct the ImageName or rename the file)",
                       f"missing image imagesTr/link.png (a symbolic link to {d / 'imagesTr' / 'gone.png'}, "
                       "which is not there)",
                       "missing image imagesTr/loopa.png (a loop of symbolic links: loopa.png -> loopb.png -> "
                       "loopa.png)"]


def test_a_missing_image_names_the_file_it_was_likely_meant_to_be(tmp_path):
    """An ImageName in other case than the file (written on Windows or macOS) or with another suffix (a
    converted export) is still missing (never taken in its place), and the reject names the near file."""
    root = tmp_path / "raw"
    _small_tree(root, [GOOD, {**GOOD, "ImageName": "imagesTr/case.png", "Question": "q1"},
                       {**GOOD, "ImageName": "scan.png", "Question": "q2"},
                       {**GOOD, "ImageName": "imagesTr/none.png", "Question": "q3"},
                       # a folder in other case, a space before the suffix, a doubled suffix
                       {**GOOD, "ImageName": "IMAGESTR/Case.png", "Question": "q4"},
                       {**GOOD, "ImageName": "imagesTr/a .png", "Question": "q5"},
                       {**GOOD, "ImageName": "imagesTr/a.png.png", "Question": "q6"}],
                images=("a.png", "CASE.PNG", "scan.jpg"))
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    assert len(read_jsonl(out / "train.jsonl")) == 1
    reasons = [r["reason"] for r in read_jsonl(out / "rejects.jsonl")]
    assert reasons == ["missing image imagesTr/case.png (the dataset's folder holds imagesTr/CASE.PNG: an ImageName "
                       "is matched exactly, letter for letter; correct the ImageName or rename the file)",
                       "missing image scan.png (the dataset's folder holds imagesTr/scan.jpg: an ImageName is "
                       "matched exactly, letter for letter; correct the ImageName or rename the file)",
                       "missing image imagesTr/none.png"] + [
        f"missing image {name} (the dataset's folder holds imagesTr/{file}: an ImageName is matched exactly, "
        "letter for letter; correct the ImageName or rename the file)"
        for name, file in (("IMAGESTR/Case.png", "CASE.PNG"), ("imagesTr/a .png", "a.png"),
                           ("imagesTr/a.png.png", "a.png"))]


@pytest.mark.parametrize("name, meant", [
    ("x.png.jpg", "x.png"),  # a doubled suffix of another kind (a converter that appends its own)
    ("x (1).png", "x.png"), ("x(2).png", "x.png"),  # a browser's second download
    ("boneresorption_1009.png", "boneresorption_01009.png"),  # zero padding dropped from the trailing number
    ("boneresorption_001010.png", "boneresorption_01010.png"),  # ... or added
    ("boneresorption-01010.png", "boneresorption_01010.png"),  # hyphen for underscore
    ("Scan-7 (1).PNG.jpg", "scan_007.png"),  # several at once
])
def test_a_missing_image_is_hinted_through_one_normalisation_of_both_names(tmp_path, name, meant):
    from flare_exp.data.question_files import resolve_image

    for file in ("x.png", "boneresorption_01009.png", "boneresorption_01010.png", "scan_007.png", "x_10.png"):
        (tmp_path / file).touch()
    assert resolve_image(tmp_path, name) == (
        f"missing image {name} (the dataset's folder holds {meant}: an ImageName is matched exactly, letter for "
        "letter; correct the ImageName or rename the file)")


def test_two_files_of_one_near_key_are_both_listed_and_a_large_folder_is_listed_once(tmp_path):
    """Two existing files the missing name is near in the same way (padding dropped in one, added in the other)
    are both named, never one of them alone; tens of thousands of files are indexed once for every lookup."""
    import time

    from flare_exp.data import question_files
    from flare_exp.data.question_files import near_names, resolve_image

    for file in ("img_01.png", "img_001.png", "img_10.png"):
        (tmp_path / file).touch()
    assert near_names(tmp_path, "img_1.png") == (["img_001.png", "img_01.png"], 0)
    assert near_names(tmp_path, "img_100.png") == ([], 0)  # 10 is not 100: only padding zeros are set aside
    for file in ("tooth (1).png", "tooth (2).png", "scan.left.png", "x.jpg", "x.jpeg", "X.png", "x (1).png"):
        (tmp_path / file).touch()
    assert near_names(tmp_path, "tooth (3).png") == ([], 0)  # another copy of one download, not a misspelling
    assert near_names(tmp_path, "TOOTH (2).jpg") == (["tooth (2).png"], 0)  # the same copy, in other case and suffix
    assert near_names(tmp_path, "scan.png") == ([], 0)  # a dotted word is no file type
    assert near_names(tmp_path, "x.png") == (["X.png", "x (1).png", "x.jpeg"], 1)  # the fourth is counted
    assert "x.jpeg and 1 more named alike: an ImageName" in resolve_image(tmp_path, "x.png")
    big = tmp_path / "big"
    big.mkdir()
    for i in range(20000):
        (big / f"case_{i:05d}.png").touch()
    question_files._near_names.cache_clear()
    started = time.perf_counter()
    said = [resolve_image(big, f"case_{i}.jpg") for i in range(0, 20000, 40)]
    assert said[1] == ("missing image case_40.jpg (the dataset's folder holds case_00040.png: an ImageName is "
                       "matched exactly, letter for letter; correct the ImageName or rename the file)")
    assert question_files._near_names.cache_info().misses == 1  # the folder indexed once for 500 missing names
    print(f"500 lookups in a folder of 20000: {time.perf_counter() - started:.2f} s")


def test_kept_records_a_careful_user_wants_named_are_counted_in_the_summary(tmp_path, caplog):
    """The same question on the same pixels under two names with answers that differ (label order aside), a
    record listing one view twice, and a bone-resorption percentage outside 0-100: kept, said once each, listed
    in summary.json."""
    root = tmp_path / "raw"
    _small_tree(root, [GOOD, {**GOOD, "ImageName": "imagesTr/b.png", "Answer": "Mass, Effusion"},  # same labels
                       {**GOOD, "ImageName": "imagesTr/c.png", "Answer": "Effusion"},  # the same pixels, other labels
                       {**GOOD, "ImageName": ["imagesTr/a.png", "imagesTr/a.png"], "Question": "Twice?"},
                       # a TaskType edited by hand: chestdr then trains and scores as two tasks
                       {**GOOD, "ImageName": "imagesTr/b.png", "Question": "Which one?", "TaskType": "Classification",
                        "Answer": "A"}],
                images=("a.png", "b.png", "c.png"))
    _small_tree(root, [{"TaskType": "Regression", "Modality": "Xray", "ImageName": f"imagesTr/{name}",
                        "Question": f"Resorption of {name}?", "Answer": answer, "Split": "train"}
                       for name, answer in (("a.png", "-5"), ("b.png", "35"))], dataset="boneresorption")
    caplog.set_level("WARNING")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr,boneresorption]", "data.allow_overlap=true")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"]["train"] == 7
    conflicts = summary["same_pixels_other_answers"]
    assert conflicts["count"] == 1 and "a.png" in conflicts["first"][0] and "c.png" in conflicts["first"][0]
    assert "'Effusion'" in conflicts["first"][0] and "b.png" in conflicts["first"][0]
    assert summary["repeated_images_in_a_record"]["count"] == 1
    bone = next(r for r in read_jsonl(out / "train.jsonl") if r["answer"] == "-5")
    assert summary["percentages_out_of_range"] == {"count": 1, "first": [
        f"train: training/Xray/boneresorption/imagesTr/a.png ({bone['id']}) = '-5'"]}
    other = next(r for r in read_jsonl(out / "train.jsonl") if r["task_type"] == "classification")
    assert summary["other_task_type_than_its_dataset"] == {"count": 1, "first": [
        f"train: training/Xray/chestdr/imagesTr/b.png ({other['id']}) is classification"]}
    for said in ("asked of the same pixels under several names with answers that differ",
                 "show one picture more than once", "percentage answer(s) lie outside 0-100",
                 "1 record(s) of chestdr have another task type than the rest of their dataset"):
        assert caplog.text.count(said) == 1
    listed = read_jsonl(out / "doubts.jsonl")  # every case, each record in full
    assert [d["kind"] for d in listed] == ["same_pixels_other_answers", "repeated_images_in_a_record",
                                           "percentages_out_of_range", "other_task_type_than_its_dataset"]
    assert sorted(r["answer"] for r in listed[0]["records"]) == ["Effusion", "Effusion, Mass", "Mass, Effusion"]
    assert listed[2]["records"] == [{"id": bone["id"], "images": bone["images"], "question": bone["question"],
                                     "answer": "-5"}] and listed[2]["split"] == "train"
    assert "doubts.jsonl lists all" in caplog.text


def test_more_doubts_than_the_summary_names_are_all_in_doubts_jsonl(tmp_path):
    """summary.json names the first SHOWN cases of a kind; doubts.jsonl lists every one."""
    from flare_exp.data.record_doubts import SHOWN

    root = tmp_path / "raw"
    names = [f"s{i}.png" for i in range(SHOWN + 3)]
    _small_tree(root, [{"TaskType": "Regression", "Modality": "Xray", "ImageName": f"imagesTr/{name}",
                        "Question": f"Resorption of {name}?", "Answer": "250", "Split": "train"}
                       for name in names], dataset="boneresorption", images=tuple(names))
    out = _prepare(tmp_path, root, "data.datasets=[boneresorption]")
    summary = json.loads((out / "summary.json").read_text())["percentages_out_of_range"]
    assert summary["count"] == SHOWN + 3 and len(summary["first"]) == SHOWN
    assert len(read_jsonl(out / "doubts.jsonl")) == SHOWN + 3


def test_regression_answers_in_another_scripts_digits_become_ascii():
    """'３５' (fullwidth) and '٣٥' (Arabic-Indic) are 35 to float() and FLARE: the model is trained to write 35."""
    from flare_exp.data.records import answer_text

    for written in ("３５", "٣٥", "35 %", "３５％", "٣٥٪", "35\u200b"):
        assert answer_text(written, "regression", "boneresorption", "q") == ("35", None)


def test_a_prepared_dir_whose_prepare_did_not_finish_is_not_read(tmp_path, demo_root):
    """sft and infer read the splits of a prepare killed before its end (no DONE, no inputs.json or summary.json)
    without a word; a failed one too. Each is refused naming the dir, and the same command finishes it."""
    from flare_exp.checks import input_problems
    from flare_exp.data.prepare_inputs import check_prepare_finished

    prepared = _prepare(tmp_path, demo_root)
    check_prepare_finished("sft.train_file", str(prepared / "train.jsonl"))  # finished: read
    (prepared / "DONE").unlink()
    with pytest.raises(ValueError, match=r"sft.train_file=\S+train.jsonl: the prepare that writes \S+flare_xray has "
                                         r"not finished \(it was stopped before its end: no DONE marker\).*Run "
                                         r"stage=prepare with data.prepared_dir=\S+flare_xray to the end"):
        check_prepare_finished("sft.train_file", str(prepared / "train.jsonl"))
    (prepared / "FAILED").write_text("RuntimeError: boom\n")
    with pytest.raises(ValueError, match=r"has not finished \(it FAILED: \S+FAILED\)"):
        check_prepare_finished("infer.input_file", str(prepared / "val.jsonl"))
    cfg = compose_cfg(["~experiment", "data=flare_xray", "model=tiny", "stage=sft", f"data.root={demo_root}",
                       f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert any("the prepare that writes" in str(p) for p in input_problems(cfg))
    infer = compose_cfg(["~experiment", "data=flare_xray", "model=tiny", "stage=infer", "infer.split=test",
                         f"data.root={demo_root}", f"paths.output_root={tmp_path / 'out'}",
                         f"paths.cache_dir={tmp_path / 'cache'}"])  # its split's file by default: checked too
    assert any("infer.input_file=" in str(p) and "the prepare that writes" in str(p) for p in input_problems(infer))
    hand_made = tmp_path / "hand"  # a prepared dir made by hand (no prepare's records): read as it is
    hand_made.mkdir()
    (hand_made / "train.jsonl").write_text("")
    check_prepare_finished("sft.train_file", str(hand_made / "train.jsonl"))


def test_a_question_file_changed_since_prepare_is_refused_for_the_splits_a_stage_reads(tmp_path, demo_root):
    """A test question added to the download after prepare: a standalone infer wrote a submission/ without it,
    saying it was complete. The question files of the splits a stage reads are compared with prepare's record;
    the others are not (a data.root holding only testing/ serves a test infer)."""
    from flare_exp.data.prepare_inputs import check_prepared_questions

    prepared = _prepare(tmp_path, demo_root)

    def cfg(split):
        return compose_cfg(["~experiment", "data=flare_xray", "model=tiny", "stage=infer", f"infer.split={split}",
                            f"data.root={demo_root}", f"paths.cache_dir={tmp_path / 'cache'}",
                            f"paths.output_root={tmp_path / 'out'}"])

    check_prepared_questions(cfg("test"), [prepared / "test.jsonl"])
    shutil.rmtree(demo_root / "training")  # only some splits kept: the others are not compared
    check_prepared_questions(cfg("test"), [prepared / "test.jsonl"])
    questions = demo_root / "testing" / "Xray" / "dental" / "dental_questions_test.json"
    records = json.loads(questions.read_text())
    questions.write_text(json.dumps(records + [{**records[0], "Question": "Which single option fits?"}]))
    with pytest.raises(ValueError, match=r"1 question file\(s\) of testing differ from those the prepare in \S+ "
                                         r"read, e.g. testing/Xray/dental/dental_questions_test.json: changed"):
        check_prepared_questions(cfg("test"), [prepared / "test.jsonl"])
    check_prepared_questions(cfg("val"), [prepared / "val.jsonl"])  # another split's files: as they were


def test_a_later_record_of_a_kept_question_that_prepare_refuses_is_what_flares_evaluator_reads(tmp_path):
    """FLARE keys its ground truth by ImageName||Question, the last record winning: a later record prepare rejects
    ("n/a", null) left the earlier answer scored silently (FLARE: another answer, an infinite MAE) and counted as a
    question the split lacks. The kept record carries the later raw answer for eval's FLARE caveat; the reject is
    a duplicate, not a missing question."""
    from flare_exp.data.rejects import rejected_questions

    root = tmp_path / "raw"
    good = {"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": "imagesTr/a.png",
            "Split": "train"}
    _small_tree(root, [{**good, "Question": "q0", "Answer": "Effusion"}, {**good, "Question": "q1", "Answer": "Mass"},
                       {**good, "Question": "q0", "Answer": None}, {**good, "Question": "q1", "Answer": "  "},
                       {**good, "Question": "q1", "Answer": "Mass", "TaskType": "Detection"}])
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    kept = {r["question"]: r for r in read_jsonl(out / "train.jsonl")}
    assert kept["q0"]["answer"] == "Effusion" and kept["q0"]["raw_answer"] is None  # FLARE reads the null
    assert kept["q1"]["answer"] == "Mass" and "raw_answer" not in kept["q1"]  # the last: "Mass" again
    assert kept["q1"]["raw_task_type"] == "Detection" and "_at" not in kept["q1"]
    rejects = read_jsonl(out / "rejects.jsonl")
    assert all(r["reason"].startswith("duplicate ImageName||Question whose later record prepare refuses")
               for r in rejects) and len(rejects) == 3
    assert rejected_questions(out / "train.jsonl") is None  # no question of the split is missing


@pytest.mark.parametrize("answers,flare_reads,missing", [
    (["Effusion", "n/a", "Effusion"], None, 0),      # good, refused, good again: FLARE reads the last, the kept one
    (["", "Effusion"], None, 0),                     # refused, then good: the refused one is a duplicate
    (["", None], None, 1),                           # refused twice, never kept: one question left out, not two
    (["Effusion", "MISSING"], "", 0),                # a later record without an Answer: FLARE's get("Answer", "")
])
def test_each_order_of_a_questions_records_gives_what_flare_reads_and_counts_it_once(tmp_path, answers, flare_reads,
                                                                                     missing):
    from flare_exp.data.rejects import rejected_questions

    root = tmp_path / "raw"
    good = {"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": "imagesTr/a.png",
            "Split": "train", "Question": "q0"}
    other = {**good, "Question": "q1", "Answer": "Mass"}  # a question that keeps the split from being empty
    _small_tree(root, [other] + [{k: v for k, v in good.items()} if a == "MISSING" else {**good, "Answer": a}
                                 for a in answers])
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    kept = {r["question"]: r for r in read_jsonl(out / "train.jsonl")}
    if answers[-1] is None and not any(answers):
        assert "q0" not in kept
    else:
        assert kept["q0"]["answer"] == "Effusion" and kept["q0"].get("raw_answer") == flare_reads
    left = rejected_questions(out / "train.jsonl")
    assert (left or {}).get("count", 0) == missing, read_jsonl(out / "rejects.jsonl")


def test_a_flare_split_folder_no_prepared_split_reads_is_said(demo_root, caplog):
    """data=flare_xray leaves validation-hidden/ out of val by default (FLARE ships it later): found under
    data.root, val silently lacked dental, periapical and boneresorption. Said, with the setting that adds it."""
    from flare_exp.data.question_files import question_files, say_unread_splits

    found = question_files(demo_root)
    caplog.set_level("WARNING", logger="flare_exp.data.question_files")
    sources = {"train": ["training"], "val": ["validation-public"], "test": ["testing"]}
    say_unread_splits(found, ["IU_XRay", "chestdr", "dental", "periapical", "boneresorption"], sources)
    assert ("validation-hidden/ under data.root holds question files of boneresorption, dental, periapical that no "
            "split reads: add it to data.val_splits (e.g. data.val_splits=[validation-public,validation-hidden])"
            in caplog.text)
    caplog.clear()
    say_unread_splits(found, ["IU_XRay", "chestdr"], sources)  # the datasets asked for are all read
    say_unread_splits(found, ["dental"], {**sources, "val": ["validation-public", "validation-hidden"]})
    assert not caplog.text


def test_a_counting_question_is_prepared_as_regression(tmp_path):
    """FLARE's evaluator scores TaskType 'Counting' by its regression rule (MAE): prepare rejected it as an unknown
    TaskType, so a test split holding one had no complete submission, and nothing the user could fix."""
    root = tmp_path / "raw"
    _small_tree(root, [{**GOOD, "TaskType": "Counting", "Question": "How many?", "Answer": "3"}])
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    record, = read_jsonl(out / "train.jsonl")
    assert record["task_type"] == "regression" and record["answer"] == "3" and record["raw_task_type"] == "Counting"
