"""prepare treats records as untrusted input: paths stay inside data.root, every image is decoded, fields are
typed; symlinked folders the user made are followed; a requested dataset or split with no record is an error."""
import json
import struct
import zlib

import pytest
from PIL import Image

from flare_exp.data.images import check_images, inside
from flare_exp.io import read_jsonl
from test_prepare import GOOD, _prepare, _small_tree


def _rejects(tmp_path, root, *extra):
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", *extra)
    return out, {r["index"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}


def test_image_paths_that_leave_data_root_are_rejected_unopened(tmp_path):
    root = tmp_path / "raw"
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    _small_tree(root, [GOOD, {**GOOD, "ImageName": "../../../outside/secret.png", "Question": "q1"},
                       {**GOOD, "ImageName": "/etc/passwd", "Question": "q2"},
                       {**GOOD, "ImageName": str(outside / "secret.png"), "Question": "q3"},
                       {**GOOD, "ImageName": ["imagesTr/a.png", "../x.png"], "Question": "q4"},
                       {**GOOD, "ImageName": "imagesTr/../imagesTr/b.png", "Question": "q5"}])
    out, reasons = _rejects(tmp_path, root)
    assert sorted(reasons) == [1, 2, 3, 4] and all(r.startswith("outside data.root") for r in reasons.values())
    train = read_jsonl(out / "train.jsonl")
    assert sorted(r["images"][0] for r in train) == ["training/Xray/chestdr/imagesTr/a.png",
                                                      "training/Xray/chestdr/imagesTr/b.png"]


def test_inside_is_judged_on_the_text():
    from pathlib import Path

    assert inside(Path("/d"), "a/../b.png") == Path("/d/b.png")
    assert [inside(Path("/d"), n) for n in ("../b.png", "a/../../b", "/etc/x", "C:/x", "\\\\srv\\x", "", ".")] == \
        [None] * 7


def test_symlinked_dataset_and_split_folders_are_followed(tmp_path):
    staged = tmp_path / "staged"
    _small_tree(staged, [GOOD])
    root = tmp_path / "raw"
    (root / "training" / "Xray").mkdir(parents=True)
    (root / "training" / "Xray" / "chestdr").symlink_to(staged / "training" / "Xray" / "chestdr")
    out, _ = _rejects(tmp_path, root)
    assert len(read_jsonl(out / "train.jsonl")) == 1
    linked = tmp_path / "raw2"
    linked.mkdir()
    (linked / "training").symlink_to(staged / "training")
    out = _prepare(tmp_path / "b", linked, "data.datasets=[chestdr]")
    assert len(read_jsonl(out / "train.jsonl")) == 1


def test_a_requested_dataset_or_split_with_no_record_is_an_error(tmp_path):
    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    with pytest.raises(ValueError, match=r"dataset periapical yielded no record in any split"):
        _prepare(tmp_path, root, "data.datasets=[chestdr,periapical]")
    _small_tree(root, [{**GOOD, "ImageName": "imagesTr/gone.png"}], split="validation-public")
    with pytest.raises(ValueError, match=r"val \(FLARE splits \['validation-public'\]\) yielded no record.*"
                                         r"missing image"):
        _prepare(tmp_path / "b", root, "data.datasets=[chestdr]")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_every_image_is_decoded_and_a_broken_one_is_named_with_its_size(tmp_path):
    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD, {**GOOD, "ImageName": "imagesTr/broken.png", "Question": "q1"},
                           {**GOOD, "ImageName": "imagesTr/bomb.png", "Question": "q2"}])
    rows = b"".join(b"\x00" + bytes(64) for _ in range(64))
    broken = _png(64, 64, zlib.compress(rows)[:-40] + b"\x00" * 40)  # valid chunks and CRCs, broken zlib data
    (d / "imagesTr" / "broken.png").write_bytes(broken)
    with Image.open(d / "imagesTr" / "broken.png") as im:
        im.verify()  # what prepare used to check: passes
    (d / "imagesTr" / "bomb.png").write_bytes(_png(20000, 20000, zlib.compress(b"\x00" * 100)))
    out, reasons = _rejects(tmp_path, root)
    assert reasons[1].startswith("corrupt image broken.png: ") and "(64x64 px, " in reasons[1]
    assert reasons[2].startswith("decompression bomb bomb.png: ") and "400000000 pixels" in reasons[2]
    assert len(read_jsonl(out / "train.jsonl")) == 1


def test_a_file_that_is_no_image_and_a_folder_in_its_place_are_named_as_such(tmp_path):
    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD, {**GOOD, "ImageName": "imagesTr/page.png", "Question": "q1"},
                           {**GOOD, "ImageName": "imagesTr/empty.png", "Question": "q2"},
                           {**GOOD, "ImageName": "imagesTr/folder.png", "Question": "q3"}])
    (d / "imagesTr" / "page.png").write_text("<html>the download's error page</html>")
    (d / "imagesTr" / "empty.png").write_bytes(b"")
    (d / "imagesTr" / "folder.png").mkdir()
    _, reasons = _rejects(tmp_path, root)
    assert reasons[1] == ("corrupt image page.png: no image format Pillow reads: an empty or cut download, or another "
                          "kind of file under an image's name (38 bytes)")
    assert reasons[2] == "corrupt image empty.png: the file is empty (0 bytes)"
    assert reasons[3] == ("missing image imagesTr/folder.png (a directory of that name is there, not an image "
                          "file)")
    assert "BytesIO" not in " ".join(reasons.values())


def test_parallel_decoding_gives_what_one_process_gives(tmp_path):
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (16, 16), i).save(paths[-1])
    paths[7].write_bytes(b"\x89PNG\r\n\x1a\nnope")
    assert check_images(paths, workers=2) == check_images(paths, workers=1)
    assert check_images(paths, workers=2)[paths[7]][0].startswith("corrupt image 7.png")


def test_records_are_typed(tmp_path):
    root = tmp_path / "raw"
    reg = {**GOOD, "TaskType": "regression", "Question": "How much?"}
    options = "Which? A. one B. two C. three Answer with a letter."
    cls = {**GOOD, "TaskType": "Classification", "Question": "q6 " + options}
    _small_tree(root, [GOOD, {**GOOD, "ImageName": None, "Question": "q1"}, {**GOOD, "ImageName": 5, "Question": "q2"},
                       {**reg, "Answer": "NaN"}, {**reg, "Answer": "twenty", "Question": "q4"},
                       {**reg, "Answer": 22.9, "Question": "q5"}, {**cls, "Answer": "D"},
                       {**cls, "Answer": "B", "Question": "q7 " + options},
                       {**cls, "Answer": "three", "Question": "q8 " + options},
                       {**GOOD, "Answer": ["Effusion", "Mass"], "Question": "q9"},
                       {**GOOD, "Answer": {"a": 1}, "Question": "q10"}, {**reg, "Answer": "40.5 %", "Question": "q11"}])
    out, reasons = _rejects(tmp_path, root)
    assert reasons == {1: "ImageName must be a string or a list of strings, got null",
                       2: "ImageName must be a string or a list of strings, got a number",
                       3: "regression answer 'NaN' is not a finite number",
                       4: "regression answer 'twenty' is not a finite number",
                       6: "classification answer 'D' is not one of the options A-C",
                       10: "answer must be text, got an object"}
    answers = {r["question"]: r["answer"] for r in read_jsonl(out / "train.jsonl")}
    assert answers["q5"] == "22.9" and answers["q9"] == "Effusion, Mass"
    assert answers["q11"] == "40.5"  # the number FLARE's evaluator reads (float("40.5 %") fails)
    assert answers["q7 " + options] == "B" and answers["q8 " + options] == "three"  # kept, not guessed away
    rejects = read_jsonl(out / "rejects.jsonl")
    assert rejects[0]["file"] == "training/Xray/chestdr/chestdr_questions_train.json"


def test_a_periapical_list_answer_is_joined_with_its_separator():
    from flare_exp.data.records import answer_text

    assert answer_text(["Caries", "Periapical Lesion"], "multi_label", "periapical", "?") == \
        ("Caries;Periapical Lesion", None)
    assert answer_text(json.loads('["No Finding"]'), "multi_label", "chestdr", "?") == ("No Finding", None)


def test_the_demo_fills_no_root_the_user_named(tmp_path):
    """data=demo generates its synthetic tree under paths.cache_dir only: a mistyped data.root (the FLARE
    download meant, experiment=flare forgotten) is an error naming it, and nothing is written there."""
    from conftest import compose_cfg
    from flare_exp.main import run

    cfg = compose_cfg(["stage=prepare", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_root={tmp_path}",
                       f"data.root={tmp_path / 'FLARE_Taks5'}", f"data.prepared_dir={tmp_path / 'prepared'}"])
    with pytest.raises(FileNotFoundError, match=r"data.root=\S+FLARE_Taks5: no such directory .* experiment=flare"):
        run(cfg, run_dir=tmp_path / "prep")
    assert not (tmp_path / "FLARE_Taks5").exists()


def test_a_demo_tree_made_with_other_settings_is_not_taken_for_this_runs(tmp_path):
    """data.demo.seed / sizes changed while the generated tree is there: refused, naming both settings (the
    run's config.yaml would record the new ones while its records came from the old tree)."""
    from flare_exp.fixtures.demo_data import generate_demo

    root = tmp_path / "demo"
    generate_demo(root, seed=0, train_per_dataset=2, val_per_dataset=1, test_per_dataset=1, image_size=32)
    assert generate_demo(root, seed=0, train_per_dataset=2, val_per_dataset=1, test_per_dataset=1,
                         image_size=32) == root  # the same settings: kept
    with pytest.raises(ValueError, match=r"generated with data.demo.seed=0, data.demo.train_per_dataset=2, this "
                                         r"run asks for data.demo.seed=7, data.demo.train_per_dataset=3\. Delete"):
        generate_demo(root, seed=7, train_per_dataset=3, val_per_dataset=1, test_per_dataset=1, image_size=32)


def test_an_empty_question_file_is_said(tmp_path, caplog):
    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    _small_tree(root, [], dataset="dental")
    _small_tree(root, [GOOD], dataset="dental", split="validation-public")  # its val has records
    caplog.set_level("WARNING", logger="flare_exp.data.prepare")
    _prepare(tmp_path, root, "data.datasets=[chestdr,dental]", "data.allow_overlap=true")  # one grey image
    assert "training/Xray/dental/dental_questions_train.json holds no records (an empty list): train gets nothing " \
           "from dental's training split" in caplog.text


def test_each_copy_of_data_root_is_read_once_and_the_prepares_record_stays(tmp_path, monkeypatch):
    """Two copies of the download with new file times (the original and a node's scratch), checked in turn: each
    copy's images are read once, their times kept under its path; the prepare's own record is not rewritten."""
    import os
    import shutil

    import flare_exp.data.prepare_inputs as inputs

    root, copy = tmp_path / "raw", tmp_path / "scratch" / "raw"
    _small_tree(root, [GOOD])
    images = {p: inputs.file_digest(p, "sha1") for p in root.rglob("*.png")}
    inputs.record_inputs(tmp_path, root, [], images)
    original = json.loads((tmp_path / inputs.INPUTS).read_text())["images"]
    shutil.copytree(root, copy)
    for p in copy.rglob("*.png"):
        os.utime(p, ns=(p.stat().st_mtime_ns + 10**9,) * 2)
    reads = []
    real = inputs.file_digest
    monkeypatch.setattr(inputs, "file_digest", lambda path, *a: reads.append(path) or real(path, *a))
    for where, expected_reads in ((copy, len(images)), (copy, 0), (root, 0), (copy, 0)):
        reads.clear()
        assert inputs.input_changes(tmp_path, where, [], lambda folder, name: folder / name) == []
        assert inputs.moved_here(tmp_path, where) is None
        assert len(reads) == expected_reads, (where, reads)
    record = json.loads((tmp_path / inputs.INPUTS).read_text())
    assert record["images"] == original and list(record["times"]) == [str(copy)]
    next(copy.rglob("*.png")).write_bytes(b"\0" * 10)  # an edit at the copy is still seen
    assert inputs.moved_here(tmp_path, copy).startswith("1 of the")


def test_an_image_edited_at_the_same_size_with_its_time_set_back_is_seen(tmp_path):
    """An image rewritten in place, same size, its modification time restored (``touch -r``): the change time,
    which cannot be set back, sends it to be read again; an untouched tree is still compared by stat alone."""
    import os

    import flare_exp.data.prepare_inputs as inputs

    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    images = {p: inputs.file_digest(p, "sha1") for p in root.rglob("*.png")}
    inputs.record_inputs(tmp_path, root, [], images)
    assert inputs.input_changes(tmp_path, root, [], lambda folder, name: folder / name) == []
    edited = sorted(images)[0]
    before = edited.stat()
    data = bytearray(edited.read_bytes())
    data[-20] ^= 0xFF
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert edited.stat().st_size == before.st_size and edited.stat().st_mtime_ns == before.st_mtime_ns
    changes = inputs.input_changes(tmp_path, root, [], lambda folder, name: folder / name)
    assert changes == [f"data.root file {edited.relative_to(root).as_posix()}: changed"]


def test_the_multi_label_answers_labels_are_counted_and_the_rare_ones_named():
    """Each multi-label dataset's labels split by its own separator (periapical's comma label stays whole); a
    label seen once is named: a typo, or answers joined with the other separator."""
    from flare_exp.data.records import multi_label_labels

    comma_label = "Endodontic Treatment, Restorative Treatment, and Complications"
    rows = [{"dataset": "chestdr", "task_type": "multi_label", "answer": a}
            for a in ("Effusion, Mass", "Mass", "Effusion,  Cardiomegaly", "Cardiomegally", "Mass; Effusion",
                      "Cardiomegaly")] + \
           [{"dataset": "periapical", "task_type": "multi_label", "answer": a}
            for a in (f"Caries;{comma_label}", comma_label, "Caries")] + \
           [{"dataset": "dental", "task_type": "classification", "answer": "A"}]
    found = multi_label_labels(rows)
    assert found["chestdr"] == {"answers": 6, "labels": {"Mass": 2, "Effusion": 2, "Cardiomegaly": 2,
                                                         "Cardiomegally": 1, "Mass; Effusion": 1},
                                "rare": ["Cardiomegally", "Mass; Effusion"]}
    assert found["periapical"]["labels"] == {"Caries": 2, comma_label: 2} and not found["periapical"]["rare"]
    assert set(found) == {"chestdr", "periapical"}


def test_a_large_scan_is_no_bomb_below_pils_own_limit(tmp_path, monkeypatch):
    """PIL warns at MAX_IMAGE_PIXELS and refuses at twice that: an image between the two (a 100 MP scan under the
    default limits) is decoded and kept; one above is rejected as a decompression bomb."""
    import numpy as np
    from PIL import Image

    from flare_exp.data.images import _check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # 1,600 pixels: above the warning, below the error; 2,500: above both
        Image.fromarray((np.arange(side * side) % 251).reshape(side, side).astype(np.uint8)).save(tmp_path / f"{side}.png")
    assert _check_image(str(tmp_path / "40.png"), None).problem is None
    bomb = _check_image(str(tmp_path / "50.png"), None).problem
    assert bomb.startswith("decompression bomb 50.png") and "save it downscaled" in bomb  # and what to do


def test_a_stage_started_on_a_root_whose_images_differ_from_the_prepared_ones_is_refused(base_overrides,
                                                                                          demo_prepared, tmp_path):
    """infer (sft, rl) on a data.root whose images are not those prepare recorded (another tree, or an image
    edited at the same size with its time set back): refused before the run, naming the image; an exact copy
    (new times, same bytes) is the same data."""
    import os
    import shutil

    from conftest import compose_cfg
    from flare_exp.checks import input_problems

    copy = tmp_path / "raw"
    shutil.copytree(demo_prepared.parent / "raw", copy)
    cfg = lambda root: compose_cfg(["stage=infer", *base_overrides, f"data.root={root}"])  # noqa: E731
    assert not [p for p in input_problems(cfg(copy)) if "data.root" in str(p)]
    image = sorted(copy.rglob("val/**/*.png"))[0]  # one that infer's split (val) uses
    before = image.stat()
    data = bytearray(image.read_bytes())
    data[-30] ^= 0xFF
    image.write_bytes(bytes(data))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    (said,) = [str(p) for p in input_problems(cfg(copy)) if str(p).startswith("data.root=")]
    assert f"1 of the" in said and f"{image.relative_to(copy).as_posix()}: changed" in said
    assert f"point data.root at the folder prepare read ({demo_prepared.parent / 'raw'})" in said


def test_a_root_holding_only_the_split_a_stage_reads_serves_it(base_overrides, demo_prepared, tmp_path):
    """A copy of data.root with only the validation images (a node given just what infer reads) passes for
    infer on val; sft, which reads the training records too, is refused, naming a removed training image; an
    edit to an image no record of the stage uses is no reason to refuse it."""
    import shutil

    from conftest import compose_cfg
    from flare_exp.checks import input_problems

    copy = tmp_path / "raw"
    shutil.copytree(demo_prepared.parent / "raw", copy)
    for split in ("training", "testing"):
        shutil.rmtree(copy / split)
    cfg = lambda *more: compose_cfg([*more, *base_overrides, f"data.root={copy}"])  # noqa: E731
    assert not [p for p in input_problems(cfg("stage=infer")) if "data.root" in str(p)]
    (said,) = [str(p) for p in input_problems(cfg("stage=sft")) if str(p).startswith("data.root=")]
    assert "images prepare recorded that these records use differ there" in said
    assert ": removed" in said and "training/" in said
    (said,) = [str(p) for p in input_problems(cfg("stage=infer", "infer.split=test"))
               if str(p).startswith("data.root=")]
    assert "testing/" in said and ": removed" in said
    train_only = tmp_path / "train_only"  # rl reads the validation records only for its held-out evals
    shutil.copytree(demo_prepared.parent / "raw", train_only)
    for split in ("val", "testing"):
        shutil.rmtree(train_only / split)
    at = lambda *more: compose_cfg(["stage=rl", *more, *base_overrides, f"data.root={train_only}"])  # noqa: E731
    assert not [p for p in input_problems(at()) if str(p).startswith("data.root=")]
    (said,) = [str(p) for p in input_problems(at("rl.eval_steps=1")) if str(p).startswith("data.root=")]
    assert "val/" in said and ": removed" in said


def test_a_prepared_dir_without_a_readable_record_is_not_blamed_on_a_right_root(base_overrides, demo_prepared,
                                                                                tmp_path, caplog):
    """inputs.json cut short (or a prepare from before it was written): nothing to compare with. The root prepare
    read passes; another root passes with a warning that its images were not compared."""
    import shutil

    from conftest import compose_cfg
    from flare_exp.checks import input_problems

    prepared = tmp_path / "prepared"
    shutil.copytree(demo_prepared, prepared)
    (prepared / "inputs.json").write_text((prepared / "inputs.json").read_text()[:100])
    cfg = lambda root: compose_cfg(["stage=infer", *base_overrides, f"data.root={root}",  # noqa: E731
                                    f"data.prepared_dir={prepared}"])
    caplog.set_level("WARNING")
    assert not [p for p in input_problems(cfg(demo_prepared.parent / "raw")) if "data.root" in str(p)]
    assert "were not compared" not in caplog.text
    copy = tmp_path / "raw"
    shutil.copytree(demo_prepared.parent / "raw", copy)
    assert not [p for p in input_problems(cfg(copy)) if "data.root" in str(p)]
    assert f"data.root={copy} is not the folder the prepare in {prepared} read" in caplog.text
