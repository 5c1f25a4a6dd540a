"""The leakage guard on every pair of splits (train/val, train/test, val/test), for a byte-identical copy under
the same name and for the same picture renamed, through prepare; and the per-pair counts by hand."""
import json

import pytest

from conftest import compose_cfg
from flare_exp.data.prepare import PrepareError, check_overlap
from flare_exp.io import read_jsonl
from flare_exp.main import run

FOLDERS = {"train": "training", "val": "validation-public", "test": "testing"}
FILES = {"train": "questions_train", "val": "questions_val", "test": "questions_test"}


def _split_tree(root, split, images: dict[str, int]):
    """One chestdr question per image of one split; ``images``: file name -> grey level (its content)."""
    from PIL import Image

    d = root / FOLDERS[split] / "Xray" / "chestdr"
    (d / "images").mkdir(parents=True)
    records = []
    for name, grey in images.items():
        Image.new("RGB", (32, 32), grey).save(d / "images" / name)
        record = {"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": f"images/{name}",
                  "Question": "Which?", "Split": split}
        records.append(record if split == "test" else {**record, "Answer": "Effusion, Mass"})
    (d / f"chestdr_{FILES[split]}.json").write_text(json.dumps(records))


def _prepare(tmp_path, root, *extra):
    run(compose_cfg(["~experiment", "data=flare_xray", "model=tiny", "stage=prepare", f"data.root={root}",
                     "data.datasets=[chestdr]", f"paths.output_root={tmp_path / 'out'}",
                     f"paths.cache_dir={tmp_path / 'cache'}", *extra]), run_dir=tmp_path / "run")
    return tmp_path / "out" / "prepared" / "flare_xray"


# each split's own pictures (distinct grey levels): no study is shared
CLEAN = {"train": {"t1.png": 10, "t2.png": 20}, "val": {"v1.png": 30, "v2.png": 40}, "test": {"s1.png": 50}}


@pytest.mark.parametrize("first,second", [("train", "val"), ("train", "test"), ("val", "test")])
@pytest.mark.parametrize("copy", ["identical", "renamed"])
def test_every_pair_of_splits_is_guarded(tmp_path, first, second, copy):
    trees = {split: dict(images) for split, images in CLEAN.items()}
    leaked, grey = next(iter(trees[first].items()))
    trees[second]["copy.png" if copy == "renamed" else leaked] = grey  # the same bytes, renamed or not
    for split, images in trees.items():
        _split_tree(tmp_path / "raw", split, images)
    twin = rf" = chestdr:copy.png \({second}\)" if copy == "renamed" else ""  # the picture's other name, too
    with pytest.raises(PrepareError, match=rf"(?s)^1 studies appear in more than one split \({first}/{second}: 1;"
                                           rf".*\n  chestdr:{leaked}{twin}\n"):
        _prepare(tmp_path, tmp_path / "raw")
    out = _prepare(tmp_path, tmp_path / "raw", "data.allow_overlap=true")
    assert json.loads((out / "summary.json").read_text())["overlapping_studies_allowed"] == 1
    assert len(read_jsonl(out / f"{second}.jsonl")) == len(trees[second])


def test_no_shared_study_prepares(tmp_path):
    for split, images in CLEAN.items():
        _split_tree(tmp_path / "raw", split, images)
    out = _prepare(tmp_path, tmp_path / "raw")
    assert json.loads((out / "summary.json").read_text())["records"] == {"train": 2, "val": 2, "test": 1}


def _rows(*studies):
    """Prepared rows (before writing) of single-image chestdr studies: (name, content digest)."""
    return [{"dataset": "chestdr", "images": [f"images/{name}"], "_digests": [digest]} for name, digest in studies]


def test_overlap_counts_each_pair_and_each_study_once():
    by_split = {"train": _rows(("a.png", "1"), ("b.png", "2"), ("c.png", "3")),
                "val": _rows(("a.png", "9"), ("x.png", "3")),           # a by name, c's picture renamed
                "test": _rows(("y.png", "9"), ("b.png", "7"), ("z.png", "5"))}  # val's a renamed, train's b
    with pytest.raises(PrepareError) as error:
        check_overlap(by_split, allow=False)
    message = str(error.value)
    assert message.startswith("3 studies appear in more than one split (train/val: 2, train/test: 1, val/test: 1;")
    assert message.split("\n")[1:4] == ["  chestdr:a.png = chestdr:y.png (test)", "  chestdr:b.png",
                                         "  chestdr:c.png = chestdr:x.png (val)"]
    assert check_overlap(by_split, allow=True) == ["chestdr:a.png", "chestdr:b.png", "chestdr:c.png"]
    assert check_overlap({"train": by_split["train"], "val": _rows(("q.png", "8"))}, allow=False) == []
