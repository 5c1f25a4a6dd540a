"""The question files of a FLARE download: found under data.root by name (any prefix), one dataset's split in
several folders said, and the image file each record's ImageName names."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from flare_exp.data.images import OUTSIDE_ROOT, inside, walk_files
from flare_exp.data.unzip import PrepareError

log = logging.getLogger(__name__)

FLARE_SPLITS = ("training", "validation-public", "validation-hidden", "testing")
_QUESTION_FILE = re.compile(r"^(?P<dataset>.+?)_(?:questions_(?:train|val|test)(?P<gt>_withGT)?|all_(?:train|val))\.json$")


@dataclass(frozen=True)
class QuestionFile:
    path: Path
    split: str  # the FLARE split folder it sits under
    dataset: str


def split_sources_of(cfg_data) -> dict[str, list[str]]:
    """Each prepared split (train, val, test) -> the FLARE split folders its records come from."""
    return {"train": list(cfg_data.train_splits), "val": list(cfg_data.val_splits),
            "test": list(cfg_data.test_splits)}


def discover(files: list[tuple], datasets: list[str], splits: list[str]) -> list[QuestionFile]:
    """The question JSON files of the wanted datasets under the wanted FLARE split folders, in sorted order
    (``files``: what ``question_files(root)`` found)."""
    found: dict[tuple[str, str], list[tuple[Path, bool]]] = defaultdict(list)
    for path, dataset, split, with_gt in files:
        if dataset in datasets and split in splits:
            found[(split, dataset)].append((path, with_gt))
    out = []
    for (split, dataset), paths in sorted(found.items()):
        # validation-hidden may ship both <ds>_questions_val.json (no answers) and ..._withGT.json: use the latter.
        with_gt = [p for p, gt in paths if gt]
        # FLARE's own place first (<split>/<modality>/<dataset>/), then the shallowest: a copy elsewhere ("Copy of
        # dental", backup/training/...) loses the duplicates to it
        chosen = sorted(with_gt or [p for p, _ in paths], key=lambda p: (not _own_place(p, split, dataset),
                                                                         len(p.parts), p))
        _say_copies(split, dataset, chosen)
        out += [QuestionFile(p, split, dataset) for p in chosen]
    return out


MODALITY_FOLDER = "Xray"  # FLARE Task 5's modality folder: <split>/Xray/<dataset>/


def _own_place(path: Path, split: str, dataset: str) -> bool:
    """Whether a question file sits where FLARE puts it: <split>/Xray/<dataset>/<file> (a "Copy of Xray" is not)."""
    return (path.parent.name == dataset and path.parent.parent.name == MODALITY_FOLDER
            and path.parent.parent.parent.name == split)


SAID_COPIES: set[tuple] = set()


def _say_copies(split: str, dataset: str, paths: list[Path]) -> None:
    """Question files of one dataset and split in several folders: a copy of the tree under data.root (a
    backup, an unpacked second archive) whose records compete with the real ones, said once per prepare, naming
    the folder whose records are kept."""
    folders = list(dict.fromkeys(p.parent for p in paths))  # in the order they are read
    if len(folders) > 1 and tuple(paths) not in SAID_COPIES:
        SAID_COPIES.add(tuple(paths))
        log.warning("prepare: %s's %s questions are in %d folders: %s. All are read, %s first (its records are "
                    "kept), and a record found again (same ImageName and Question) is rejected as a duplicate; move "
                    "a backup or second copy out of data.root, or limit it with data.datasets", dataset, split,
                    len(folders), ", ".join(str(d) for d in folders), folders[0])


def question_files(root: Path, files: list[Path] | None = None) -> list[tuple[Path, str, str | None, bool]]:
    """(path, dataset, FLARE split, has _withGT) of every question file under root, symlinked folders included
    (the tree is walked once per prepare: ``files``, its JSON files where the caller walked it)."""
    found = []
    for path in walk_files(root, ".json") if files is None else files:
        m = _QUESTION_FILE.match(path.name)
        parts = path.relative_to(root).parts
        if m and not any(part.startswith(".") for part in parts):
            split = next((p for p in parts if p in FLARE_SPLITS), None)
            found.append((path, m.group("dataset"), split, bool(m.group("gt"))))
    return found


# what a browser or file manager adds to a second copy's name: "x (1)", "x - Copy", "x copy 2", "Copy of x"
_COPIED_NAME = re.compile(r"(?: ?\(\d+\)| - copy(?: ?\(\d+\))?| copy(?: \d+)?)$|^copy of ", re.IGNORECASE)


def unread_copies(root: Path, found: list[tuple], datasets: list[str],
                  files: list[Path] | None = None) -> list[Path]:
    """Question files of the datasets asked for that prepare does not read: named as a copy of one
    ("dental_questions_train (1).json", "Copy of ...") or under a folder that is no FLARE split ("training (1)/"):
    a second download unpacked beside the first may hold the data meant. ``files``: the JSON files under root
    where the caller walked it (question_files' walk)."""
    read = {path for path, dataset, split, _ in found if split is not None and dataset in datasets}
    unread = []
    for path in walk_files(root, ".json") if files is None else files:
        if path in read or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        named = _QUESTION_FILE.match(_COPIED_NAME.sub("", _COPIED_NAME.sub("", path.stem)) + ".json")
        if named and named.group("dataset") in datasets:
            unread.append(path)
    return unread


def resolve_image(dataset_dir: Path, name: str) -> Path | str:
    """The image file an ImageName names, or why there is none ("outside data.root": never opened)."""
    direct = inside(dataset_dir, name)
    if direct is None:
        return f"{OUTSIDE_ROOT}: ImageName {name!r}"
    # a name typed in one Unicode form and stored on disk in the other (macOS writes NFD) is the same file
    for spelling in dict.fromkeys([name, *(unicodedata.normalize(form, name) for form in ("NFC", "NFD"))]):
        found = _image_file(dataset_dir, spelling)
        if found is not None:
            return found
    shown = repr(name) if name != name.strip() else name  # a stray space shows
    if direct.is_dir():
        return f"missing image {shown} (a directory of that name is there, not an image file)"
    if direct.is_symlink():
        return f"missing image {shown} ({link_chain(direct)})"
    near, more = near_names(dataset_dir, name)
    if near:  # Linux names differ in case; a converted export changes the suffix: said, never taken in its place
        also = f" and {more} more named alike" if more else ""
        return (f"missing image {shown} (the dataset's folder holds {', '.join(near)}{also}: an ImageName is "
                "matched exactly, letter for letter; correct the ImageName or rename the file)")
    return f"missing image {shown}"


def near_names(dataset_dir: Path, name: str, shown: int = 3) -> tuple[list[str], int]:
    """The files under ``dataset_dir`` (relative to it) that ``name`` likely meant, the first ``shown`` of them,
    and how many more names are alike: each folder of the name and the file matched by their ``near_key`` (two
    files of one key are all listed: never one chosen for the other); a bare name is looked for in the images*/
    folders too. Two copies of one download (x (1).png, x (2).png) are other files, not a misspelling; the same
    copy in another case or suffix is one (Scan (1).PNG for scan (1).png)."""
    parts = Path(name.strip()).parts
    if not parts:
        return [], 0
    folders = [dataset_dir, *(_image_folders(dataset_dir) if len(parts) == 1 else [])]
    for part in parts[:-1]:
        folders = [folder / found for folder in folders for found in _listing(folder).get(near_key(part), [])
                   if (folder / found).is_dir()]
    mark = _copy_mark(parts[-1])
    found = sorted(folder / hit for folder in folders for hit in _listing(folder).get(near_key(parts[-1]), [])
                   if mark is None or _copy_mark(hit) in (None, mark))
    wanted, files = dataset_dir / name, []
    for i, path in enumerate(found):  # a stat each, only until enough are shown: a key may hold thousands
        if path != wanted and path.is_file():
            files.append(str(path.relative_to(dataset_dir)))
            if len(files) == shown:
                return files, len(found) - i - 1
    return files, 0


def _copy_mark(name: str) -> str | None:
    """The copy number a name carries (x (2).png: 2), None without one."""
    found = _COPY_MARK.search(_bare(name))
    return found.group(0) if found else None


# an image file's type suffix (not any dotted word: scan.left.png is no misspelling of scan.png)
_TYPE_SUFFIX = re.compile(r"\.(png|jpe?g|jfif|tiff?|bmp|gif|webp|dcm|dicom|jp2|j2k|pgm|ppm|pnm)$")
_COPY_MARK = re.compile(r"\(\d+\)$")  # a browser's second download of a file: x (1).png
_PADDED = re.compile(r"(?<!\d)0+(?=\d+$)")  # the zeros padding a trailing number: _01009


def near_key(name: str) -> str:
    """What is left of a name once the ways an ImageName and its file drift apart are set aside: case, spaces,
    hyphen for underscore, its file-type suffixes (another one, none, or two: x.png.jpg), a browser's copy mark
    (x (1).png) and the zeros padding its trailing number (_1009 for _01009). Both names are mapped through it."""
    return _PADDED.sub("", _COPY_MARK.sub("", _bare(name)))


def _bare(name: str) -> str:
    """A name without spaces, case, hyphens (for underscores) and its file-type suffixes (all of them)."""
    key = "".join(name.split()).casefold().replace("-", "_")
    while _TYPE_SUFFIX.search(key):
        key = _TYPE_SUFFIX.sub("", key)
    return key


def _listing(folder: Path) -> dict[str, list[str]]:
    try:
        return _near_names(str(folder), folder.stat().st_mtime_ns)
    except OSError:
        return {}


@functools.lru_cache(maxsize=64)
def _near_names(folder: str, mtime_ns: int) -> dict[str, list[str]]:
    """A folder's entries by their ``near_key`` (listed once per folder while it is unchanged: the missing images
    of a folder of tens of thousands are looked up without listing it again)."""
    index: dict[str, list[str]] = defaultdict(list)
    for entry in os.scandir(folder):
        index[near_key(entry.name)].append(entry.name)
    return dict(index)


def _image_folders(dataset_dir: Path) -> list[Path]:
    """The dataset's images*/ folders (imagesTr/, imagesTs/), sorted; listed once while the dataset's folder is
    unchanged: a flat folder of tens of thousands of images is not listed again for every missing one."""
    try:
        return [dataset_dir / name for name in _folders_named_images(str(dataset_dir), dataset_dir.stat().st_mtime_ns)]
    except OSError:
        return []


@functools.lru_cache(maxsize=64)
def _folders_named_images(folder: str, mtime_ns: int) -> tuple[str, ...]:
    return tuple(sorted(e.name for e in os.scandir(folder) if e.name.startswith("images") and e.is_dir()))


def _image_file(dataset_dir: Path, name: str) -> Path | None:
    """The file ``name`` names in the dataset's folder, or under one of its images*/ folders."""
    direct = inside(dataset_dir, name)
    if direct is not None and direct.is_file():
        return direct
    for sub in _image_folders(dataset_dir):  # ImageName given relative to imagesTr/ etc.
        if (sub / name).is_file():
            return sub / name
    return None


def link_chain(link: Path, most: int = 40) -> str:
    """Why a symbolic link leads to no file: that its chain of links loops, or where it ends."""
    chain = [Path(os.path.normpath(link))]
    while chain[-1].is_symlink() and len(chain) <= most:
        target = Path(os.path.normpath(chain[-1].parent / os.readlink(chain[-1])))
        if target in chain:
            return "a loop of symbolic links: " + " -> ".join(step.name for step in [*chain, target])
        chain.append(target)
    if len(chain) > most:
        return f"a chain of more than {most} symbolic links"
    return f"a symbolic link to {os.readlink(link)}, which is not there" + (
        f" (the chain of links ends at {chain[-1]})" if len(chain) > 2 else "")


def load_question_file(qf: QuestionFile) -> list:
    try:
        data = json.loads(qf.path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Notepad's) is not JSON
    except UnicodeDecodeError as e:
        raise PrepareError(f"{qf.path}: not UTF-8 text, as JSON is ({not_utf8(qf.path.read_bytes(), e)}): save it "
                           "as UTF-8") from None
    except json.JSONDecodeError as e:
        data = qf.path.read_bytes()
        if b"\x00" in data[:64]:  # UTF-16 without its byte-order mark: ASCII with a NUL beside each byte
            raise PrepareError(f"{qf.path}: not UTF-8 text, as JSON is (it looks like UTF-16 without a byte-order "
                               "mark): save it as UTF-8") from None
        if not data.strip():
            what = "is empty (0 bytes)" if not data else f"holds only white space ({len(data)} bytes)"
            raise PrepareError(f"{qf.path}: the file {what}: a download or copy cut short? Replace it with the "
                               "download's own") from None
        if e.msg == "Extra data" and _json_lines(data):
            raise PrepareError(f"{qf.path}: one JSON object per line (JSON Lines), while FLARE's question files are "
                               "one JSON list of records: rewrite it as a list ([{...}, {...}])") from None
        raise PrepareError(f"{qf.path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise PrepareError(f"{qf.path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """What a question file that is not UTF-8 most likely is: an editor's "Unicode" save (UTF-16, by its
    byte-order mark or its NUL bytes) or a single-byte code page (Latin-1, Windows-1252)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[1:20:2].count(0) > 5 or data[:20:2].count(0) > 5:
        return "it looks like UTF-16, an editor's 'Unicode' save"
    return (f"byte 0x{data[error.start]:02x} at position {error.start}: Latin-1 or Windows-1252, an editor's "
            "'ANSI' save?")


def say_unread_splits(found: list[tuple], datasets: list[str], split_sources: dict) -> None:
    """FLARE split folders under data.root holding question files of the datasets asked for that no prepared split
    reads (validation-hidden, left out of data.val_splits by default: val then lacks dental, periapical and
    boneresorption)."""
    wanted = set(datasets)
    read = {source for sources in split_sources.values() for source in sources}
    unread: dict[str, set] = {}
    for _, dataset, split, _ in found:
        if split is not None and split not in read and dataset in wanted:
            unread.setdefault(split, set()).add(dataset)
    for split, datasets in sorted(unread.items()):
        into = "val" if split.startswith("validation") else "train" if split == "training" else "test"
        log.warning("prepare: %s/ under data.root holds question files of %s that no split reads: add it to "
                    "data.%s_splits (e.g. data.%s_splits=[%s]) to prepare them", split, ", ".join(sorted(datasets)),
                    into, into, ",".join([*split_sources[into], split]))


def datasets_without_questions(found: list[tuple], datasets: list[str], split_sources: dict) -> dict[str, list]:
    """{prepared split: [datasets]}: the datasets asked for that have question files under some split but none
    under this split's FLARE folders, where those folders hold other datasets' (an archive not unpacked, a folder
    not copied). A test submission made from such a split lacks the dataset's questions, and FLARE scores each
    as wrong; train without it teaches nothing of its task. Said here: test and train as warnings, val at info
    (FLARE's validation-public holds only IU_XRay and chestdr)."""
    anywhere = {dataset for _, dataset, split, _ in found if split is not None}
    out = {}
    for into, sources in split_sources.items():
        here = {dataset for _, dataset, split, _ in found if split in sources}
        lacking = [d for d in datasets if d in anywhere and d not in here] if here else []
        if lacking:
            out[into] = lacking
            (log.info if into == "val" else log.warning)(
                "prepare: %s (FLARE folders %s) has no question file of %s, while other splits do: %s", into,
                ", ".join(f"{s}/" for s in sources), ", ".join(lacking), f"{COST[into]}; {fix_for(into, sources)}")
    return out


def datasets_left_out(found: list[tuple], datasets: list[str], split_sources: dict) -> dict[str, list]:
    """{"test": [datasets]}: those with question files under the test split's FLARE folders that data.datasets
    leaves out. A choice (a chest-only study), so said at info; recorded because a test submission from this
    prepare lacks their questions, and FLARE scores each as wrong (infer writes it to submission_subset/)."""
    sources = split_sources.get("test") or []
    left_out = sorted({dataset for _, dataset, split, _ in found if split in sources} - set(datasets))
    if not left_out:
        return {}
    log.info("prepare: data.datasets leaves out %s, whose question files are under %s: a test submission made from "
             "this prepare lacks their questions (infer writes it to submission_subset/)", ", ".join(left_out),
             ", ".join(f"{s}/" for s in sources))
    return {"test": left_out}


COST = {"test": "a test submission misses their questions (FLARE scores each as wrong) and infer writes it to "
                "submission_subset/",
        "train": "sft and rl train without their tasks",
        "val": "held-out metrics and in-training evals have none of them"}


def fix_for(split: str, sources: list[str]) -> str:
    """What brings a lacking dataset's question files into a prepared split made from these FLARE folders."""
    if split == "val":
        return ("add validation-hidden to data.val_splits where you have it" if "validation-hidden" not in sources
                else "unpack or copy their validation folders where you have them")
    return f"unpack or copy their {', '.join(f'{s}/' for s in sources)} folders, then prepare with overwrite=true"


def _json_lines(data: bytes) -> bool:
    """Whether every non-empty line is a JSON object of its own."""
    try:
        lines = [line for line in data.decode("utf-8-sig").splitlines() if line.strip()]
        return len(lines) > 1 and all(isinstance(json.loads(line), dict) for line in lines)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
