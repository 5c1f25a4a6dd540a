"""A rerun in a run dir continues the same run, or refuses: what decides a stage's outputs is recorded as its
fingerprint (the deciding config keys, the sha256 of its input files and of the adapter it starts from) in
``fingerprint.json``; an unfinished run resumed with a different one stops and names the keys.

``overwrite=true`` starts afresh, finished or not: the earlier attempt's outputs move to ``attempts/NN/``
(nothing is deleted). Every attempt's config, run info and failure stay on record there too.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from flare_exp.io import file_fingerprint
from flare_exp.models.checkpoints import WEIGHTS, checkpoint_step
from flare_exp.run.layout import CONFIG, FINGERPRINT, RUN_INFO, predictions_file
from flare_exp.run.names import placed_by
from flare_exp.run.record import RunSettingsChangedError
from flare_exp.run.stage import declared_stages
from flare_exp.run.stage import stage as stage_named
from flare_exp.runtime import abspath

log = logging.getLogger(__name__)


# What each stage's declaration (run/stage.py) says decides its outputs, may change on a resume, and resumes from.
DECIDING = {s.name: s.deciding for s in declared_stages().values() if s.deciding}
FREE = {s.name: s.free for s in declared_stages().values() if s.free}
BUDGET = {s.name: s.budget for s in declared_stages().values() if s.budget}
RESUMABLE = {s.name: s.resumable for s in declared_stages().values() if s.resumable}
STARTS = {s.name: s.starts_from for s in declared_stages().values() if s.starts_from}  # the adapter it starts from


def _flatten(node, prefix: str) -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: node}


# deciding keys added after fingerprints were first recorded: a fingerprint recorded before has none to compare
DECIDING_SINCE = {"eval": ("eval.significance", "eval.radgraph", "eval.chexbert", "eval.keyword_metrics",
                           "eval.crimson", "eval.green.parser")}

# input files hashed since fingerprints were first recorded (as the adapter's config below): not compared with a
# fingerprint recorded before
HASHED_SINCE = ("rl.eval_file",)

# the starting adapter's adapter_config.json (rank, alpha, targets) is hashed too; a fingerprint recorded before it
# was has none to compare
ADAPTER_CONFIG = " (adapter config)"
MODEL_CONTENTS = " (contents)"  # a judge's model dir, digested since the twenty-second session
ADAPTER_WEIGHTS = " (adapter weights)"

# settings that name a file or folder, by their last name part (data.root, model.path, sft.train_file, ...)
PATH_NAMES = ("root", "path", "checkpoint", "init_from")
PATH_SUFFIXES = ("_dir", "_file", "_path")


def as_compared(key: str, value, launch_dir: str | None = None):
    """A path setting as the absolute path it names (relative ones from the directory launch.py started in:
    ``launch_dir`` for a recorded run's, else this launch's; links followed), so ``data`` and
    ``/home/me/project/data/`` are one setting and the same ``data`` from another directory is not; any other
    setting as it is."""
    name = key.rsplit(".", 1)[-1]
    if not isinstance(value, str) or not value or "://" in value or not (
            name in PATH_NAMES or name.endswith(PATH_SUFFIXES)):
        return value
    path = Path(launch_dir, value) if launch_dir else abspath(value)
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a link loop or an unreadable folder: the path as it is spelled
        return os.path.normpath(path)


def setting_compared(stage: str | None, key: str, value, launch_dir: str | None = None):
    """A deciding setting as fingerprints compare it: a path as ``as_compared`` gives it; the adapter a stage
    starts from (infer.checkpoint, rl.init_from) as the adapter dir the path means, so a run dir and its final/
    are one setting (a path that names no adapter, gone or unfinished, as it is)."""
    value = as_compared(key, value, launch_dir)
    if key != STARTS.get(stage) or not isinstance(value, str) or not value:
        return value
    from flare_exp.models.checkpoints import resolve_adapter

    try:
        return str(resolve_adapter(value))
    except (OSError, ValueError):
        return value


def launch_dir_of(run_dir: Path) -> str | None:
    """The directory a run's launch started in (run_info.json; None for runs recorded before it was)."""
    try:
        found = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("launch_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and found else None


def settings_of(stage: str, config: dict, launch_dir: str | None = None) -> dict:
    """The deciding settings of ``stage`` in a resolved config (a plain dict), flattened to dotted keys, as
    ``setting_compared`` gives them."""
    out = {}
    for key in DECIDING.get(stage, ()):
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.update(_flatten(node, key))
    return {k: setting_compared(stage, k, v, launch_dir) for k, v in out.items() if not is_free(stage, k)}


def is_free(stage: str, key: str) -> bool:
    """A setting a resume may change (a stage's ``free`` keys and those under them)."""
    return any(key == f or key.startswith(f + ".") for f in FREE.get(stage, ()))


def input_files(stage: str, cfg) -> dict[str, Path]:
    """The files whose contents decide a stage's outputs, by the key that names them."""
    declared = stage_named(stage)
    files = {}
    for key in declared.fingerprinted:
        value = declared.path_of(cfg, key)
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):  # runs or files: each one's predictions
            files.update({f"{key}[{i}]": predictions_file(abspath(entry)) for i, entry in enumerate(value)})
        else:
            files[key] = value
    adapter = starting_adapter(stage, cfg)
    if adapter is not None:
        files[f"{STARTS[stage]}{ADAPTER_WEIGHTS}"] = next((adapter / n for n in WEIGHTS if (adapter / n).exists()),
                                                             None)
        files[f"{STARTS[stage]}{ADAPTER_CONFIG}"] = adapter / "adapter_config.json"  # its rank, alpha, targets
    return {k: abspath(v) for k, v in files.items() if v}


def starting_adapter(stage: str, cfg) -> Path | None:
    """The adapter dir the stage starts from (checkpoints.chosen_adapter: a finished run's final adapter, an
    intermediate checkpoint only on purpose), None for the base model."""
    from flare_exp.models.checkpoints import chosen_adapter

    key = STARTS.get(stage)
    value = OmegaConf.select(cfg, key) if key else None
    return chosen_adapter(key, abspath(value), cfg.allow_intermediate_checkpoint) if value else None


def model_dirs(stage: str, cfg) -> dict[str, str]:
    """'<key> (contents)' -> the sampled digest of each model dir the stage reads (its judges): the same path
    with another model in it is another run."""
    from flare_exp.io import model_dir_digest

    found = {key: abspath(value) for key in stage_named(stage).models_read if (value := OmegaConf.select(cfg, key))}
    return {f"{key}{MODEL_CONTENTS}": model_dir_digest(path) for key, path in found.items() if path.is_dir()}


def fingerprint(stage: str, cfg) -> dict:
    files = {key: file_fingerprint(path)["sha256"] for key, path in input_files(stage, cfg).items()
             if path.is_file()}
    files.update(model_dirs(stage, cfg))
    return {"stage": stage, "settings": settings_of(stage, OmegaConf.to_container(cfg, resolve=True)),
            "files": files, "budget": {key: OmegaConf.select(cfg, key) for key in BUDGET.get(stage, ())}}


def listed(changed: list[str], shown: int = 8) -> str:
    """The first ``shown`` differences joined, the rest counted (a refusal's message)."""
    return "; ".join(changed[:shown]) + (f"; and {len(changed) - shown} more" if len(changed) > shown else "")


def differences(old: dict, new: dict, budget: bool = False) -> list[str]:
    """'key: old -> new' for every deciding setting or input file that differs; with ``budget`` also the budget
    keys (a finished run's; a fingerprint recorded before they were has none to compare)."""
    out = []
    for kind in ("settings", "files", *(("budget",) if budget and "budget" in old else ())):
        before, after = old.get(kind, {}), new.get(kind, {})
        added_later = DECIDING_SINCE.get(old.get("stage"), ())
        for key in sorted(set(before) | set(after)):
            if kind == "files" and key not in before and (key.endswith((ADAPTER_CONFIG, MODEL_CONTENTS)) or
                                                          key in HASHED_SINCE):
                continue  # recorded before these files were hashed
            if kind == "settings" and key not in before and any(key.startswith(k) for k in added_later):
                continue  # recorded before it decided
            a, b = before.get(key, "(unset)"), after.get(key, "(unset)")
            if a != b:
                if kind == "files":
                    a, b = (str(x)[:12] for x in (a, b))
                    key = f"{key} sha256"
                out.append(f"{key}: {a} -> {b}")
    return out


def _resumable(stage: str, run_dir: Path) -> list[Path]:
    """What an unfinished attempt left to continue from, newest step last (checkpoint-8 before checkpoint-12)."""
    def by_step(p: Path):
        step = checkpoint_step(p)
        return (step is not None, step or 0, p.name)

    return [p for pattern in RESUMABLE.get(stage, ()) for p in sorted(run_dir.glob(pattern), key=by_step)]


def recorded_fingerprint(run_dir: Path) -> dict:
    """The fingerprint a run dir recorded; one that does not parse (cut short, edited) is an error saying what to
    do, since the run's settings can no longer be compared with this one's."""
    path = run_dir / FINGERPRINT
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        recorded = e
    if not isinstance(recorded, dict):
        raise RunSettingsChangedError(
            f"{path} is unreadable ({type(recorded).__name__}: {recorded}), so the settings of the run in {run_dir} "
            "cannot be compared with this one's. Pass overwrite=true to start afresh (the earlier attempt moves to "
            f"attempts/NN/), or choose another {placed_by(run_dir)}=.")
    if isinstance(recorded.get("settings"), dict):
        # recorded before paths were made absolute: its relative ones from the directory that run started in
        launch_dir = launch_dir_of(run_dir)
        # a key free now was recorded while it still decided (data.prepared_dir for prepare): not compared
        stage = recorded.get("stage")
        recorded["settings"] = {k: setting_compared(stage, k, v, launch_dir)
                                for k, v in recorded["settings"].items() if not is_free(stage, k)}
    return recorded


def held_stage(run_dir: Path) -> str | None:
    """The stage of the run a dir holds: its config.yaml's (a pipeline writes no fingerprint of its own), else its
    fingerprint's; None where neither reads."""
    for read in (lambda: OmegaConf.select(OmegaConf.load(run_dir / CONFIG), "stage.name"),
                 lambda: recorded_fingerprint(run_dir).get("stage")):
        try:
            found = read()
        except Exception:  # noqa: BLE001  (unreadable or missing: the other record, or nothing)
            continue
        if isinstance(found, str) and found:
            return found
    return None


def left_by(held: str, run_dir: Path) -> list[Path]:
    """What an unfinished run of stage ``held`` left to continue from: its resumable outputs, or a pipeline's
    step dirs that hold anything."""
    if held == "pipeline":
        steps = set(declared_stages())
        return sorted(p for p in run_dir.iterdir() if p.is_dir() and (p.name in steps or p.name.startswith("infer-"))
                      and any(p.iterdir()))
    return _resumable(held, run_dir)


def other_stage_refusal(stage: str, held: str, run_dir: Path, left: list[Path]) -> RunSettingsChangedError:
    return RunSettingsChangedError(
        f"{run_dir} holds an unfinished {held} run ({', '.join(p.name for p in left[-3:])}); this launch is "
        f"stage={stage}, which would take that dir over and leave the {held} run unresumable. Finish it with "
        f"its own command (stage={held}), or choose another {placed_by(run_dir)}= for this one; overwrite=true "
        f"moves the {held} attempt to attempts/NN/ and starts this one there.")


def check_other_stage(stage: str, run_dir: Path) -> None:
    """An unfinished run of another stage left outputs to continue from (an sft's checkpoints, an infer's
    predictions so far, a pipeline's steps): a launch of this stage under its name took the dir over, finished
    there beside them, and that run could no longer be resumed (overwrite=true then filed its checkpoints away
    with this run)."""
    held = held_stage(run_dir)
    left = left_by(held, run_dir) if held and held != stage else []
    if left:
        raise other_stage_refusal(stage, held, run_dir, left)


def check_resume(stage: str, run_dir: Path, new: dict, cfg=None) -> None:
    """An unfinished attempt left outputs to continue from: its fingerprint must be this run's (with ``cfg``, a
    data.root that moved with the same images is the same, ``moved_data_root``)."""
    left = _resumable(stage, run_dir)
    if not left:
        return
    if (run_dir / FINGERPRINT).exists():
        old = recorded_fingerprint(run_dir)
        changed = differences(old, new)
    else:  # removed or never written: the settings the attempt recorded in config.yaml decide
        try:
            old = config_settings(stage, run_dir)
            lacking = sorted(set(new["settings"]) - set(old))  # cut short at a line, or keys deleted
        except Exception:  # noqa: BLE001  (missing, cut or hand-broken: nothing says what made the outputs)
            old, lacking = None, []
        if old is None or lacking:
            raise RunSettingsChangedError(
                f"{run_dir} holds an unfinished {stage} run ({', '.join(p.name for p in left[-3:])}) but neither a "
                f"readable {FINGERPRINT} nor {CONFIG} says which settings made it"
                + (f" ({CONFIG} lacks {len(lacking)} of them, e.g. {', '.join(lacking[:3])}: cut short or edited)"
                   if lacking else "") + ", so a resume could mix two runs. Pass overwrite=true to start afresh (the "
                f"earlier attempt moves to attempts/NN/), or choose another {placed_by(run_dir)}=.")
        paths = input_files(stage, cfg) if cfg is not None else {}
        changed = settings_differences(old, new) + checkpoint_data_differences(left, new, paths)
        old = None
    changed = unless_moved(stage, changed, old, new, cfg)
    if changed:
        raise RunSettingsChangedError(
            f"{run_dir} holds an unfinished {stage} run ({', '.join(p.name for p in left[-3:])}) made with other "
            f"settings, which a resume would mix with this one's: {'; '.join(changed)}. Rerun with the earlier "
            "settings to continue it, pass overwrite=true to start afresh (the earlier attempt moves to "
            f"attempts/NN/), or choose another {placed_by(run_dir)}=.")


def checkpoint_data_differences(left: list[Path], new: dict, paths: dict[str, Path]) -> list[str]:
    """The input files (``paths``: key -> file) whose bytes differ from those the newest checkpoint among ``left``
    recorded (flare_exp_checkpoint.json's data: path and sha256): config.yaml names the files, not their
    contents, so a run without its fingerprint would otherwise continue on a file rewritten in place."""
    import json

    from flare_exp.models.checkpoints import META

    for checkpoint in reversed(left):
        try:
            recorded = json.loads((checkpoint / META).read_text()).get("data") or []
        except (OSError, ValueError, AttributeError):
            continue
        by_path = {entry.get("path"): entry.get("sha256") for entry in recorded if isinstance(entry, dict)}
        return [f"{key} sha256: {str(by_path[str(path)])[:12]} -> {new['files'][key][:12]} (as {checkpoint.name} "
                "recorded it)" for key, path in paths.items()
                if str(path) in by_path and key in new["files"] and by_path[str(path)] != new["files"][key]]
    return []


MISSING_FINGERPRINT = f"{FINGERPRINT}: missing (deleted?)"


def finished_differences(stage: str, run_dir: Path, cfg) -> list[str]:
    """What differs between a finished run's fingerprint and this config's ('key: old -> new'). Without its
    fingerprint.json a run is held to the deciding settings of its config.yaml, and where it read input files
    (whose contents only the fingerprint recorded) the missing fingerprint is a difference itself. A stage
    whose inputs are more than files (prepare's data.root) says what changed there with its ``input_changes``."""
    new = fingerprint(stage, cfg)
    recorded = run_dir / FINGERPRINT
    if recorded.exists():
        old = recorded_fingerprint(run_dir)
        changed = unless_moved(stage, differences(old, new, budget=True), old, new, cfg)
    else:
        changed = settings_differences(config_settings(stage, run_dir) if (run_dir / CONFIG).exists() else {}, new)
        changed = unless_moved(stage, changed, None, new, cfg)
        if new["files"]:  # config.yaml names the files, not what they held: an edit since would go unseen
            changed.append(f"{MISSING_FINGERPRINT}, so the contents of {', '.join(sorted(new['files']))} it was "
                           "made from cannot be compared")
    inputs = getattr(stage_named(stage).runner(), "input_changes", None)  # inputs beyond files: a data tree
    return changed + (inputs(cfg, run_dir) if inputs and not changed else [])


def unless_moved(stage: str, changed: list[str], old: dict | None, new: dict, cfg) -> list[str]:
    """``changed`` without what moved rather than changed (``moved_files``, ``moved_data_root``); with no ``cfg``
    (nothing to compare the new place with) as it is. ``old``: the recorded fingerprint, None when the run's
    config.yaml stood in for it (no file hashes to compare)."""
    if cfg is None:
        return changed
    return moved_data_root(stage, moved_files(stage, changed, old, new), cfg)


NAMED_BY_ADAPTER_PATH = ("infer",)  # stages whose outputs are labelled by the adapter they start from's path


def _same_label(key: str, old: dict, new: dict) -> bool:
    """The adapter at both paths gives its outputs one label (a pipeline's tree copied elsewhere: <run>/sft)."""
    from flare_exp.models.checkpoints import checkpoint_label

    paths = [fp.get("settings", {}).get(key) for fp in (old, new)]
    return all(isinstance(p, str) and p for p in paths) and checkpoint_label(paths[0]) == checkpoint_label(paths[1])


def moved_files(stage: str, changed: list[str], old: dict | None, new: dict | None) -> list[str]:
    """``changed`` without the path settings whose files are the same bytes at the new path (a moved or copied
    output tree, prepared dir or adapter: its sha256 decides, recorded in ``old`` and ``new``'s files): an input
    file (sft.train_file, ...) or the adapter a training stage starts from (its weights and config)."""
    if old is None or new is None:
        return changed
    before, after = old.get("files", {}), new.get("files", {})
    kept = []
    for entry in changed:
        key = entry.split(": ", 1)[0]
        if key == STARTS.get(stage) and stage in NAMED_BY_ADAPTER_PATH and not _same_label(key, old, new):
            kept.append(entry)  # its rows are labelled by the adapter's path: elsewhere they would get another label
            continue
        hashed = [f"{key}{ADAPTER_WEIGHTS}", f"{key}{ADAPTER_CONFIG}"] if key == STARTS.get(stage) else [key]
        compared = [k for k in hashed if k in before]  # a record from before configs were hashed has weights only
        if key in new.get("settings", {}) and hashed[0] in before and all(before[k] == after.get(k) for k in compared):
            log.info("%s: %s moved (%s), the same bytes there: the same input", stage, key, entry[len(key) + 2:])
            continue
        kept.append(entry)
    return kept


ROOT_CHANGED = "data.root: "


def moved_data_root(stage: str, changed: list[str], cfg) -> list[str]:
    """``changed`` without its data.root entry where the data moved rather than changed (copied to a node's
    scratch, another mount): every image the prepare in data.prepared_dir recorded (prepare_inputs) is under the
    new data.root with the same bytes, and the stage's records come from that prepared dir. Else the entry says
    why the move could not be taken as the same data."""
    entry = next((c for c in changed if c.startswith(ROOT_CHANGED)), None)
    if entry is None:
        return changed
    from flare_exp.data.prepare_inputs import images_named, moved_here

    prepared, root = abspath(cfg.data.prepared_dir), abspath(cfg.data.root)
    adapter = STARTS.get(stage)  # its files are not records
    outside = [key for key, path in input_files(stage, cfg).items()
               if not (adapter and key.startswith(adapter)) and not path.is_relative_to(prepared)]
    files = stage_named(stage).record_files(cfg)  # only their images: a root with just the split it reads will do
    why = (f"{outside[0]} is not a file of data.prepared_dir, whose record of images it compared" if outside
           else moved_here(prepared, root, only=images_named(files)))
    if why:
        return [f"{c} ({why})" if c is entry else c for c in changed]
    log.info("%s: data.root moved (%s), and the images prepare recorded are there with the same bytes: the same "
             "data", stage, entry[len(ROOT_CHANGED):])
    return [c for c in changed if c is not entry]


def config_settings(stage: str, run_dir: Path) -> dict:
    """The deciding settings of the config.yaml a run dir recorded (a run without its fingerprint)."""
    return settings_of(stage, OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG)), launch_dir_of(run_dir))


def config_edits(run_dir: Path) -> list[str]:
    """Where a run dir's config.yaml (what reports and listings read) says otherwise than the fingerprint the run
    recorded as it started: a hand edit after the run. The stage first ('stage.name: recorded -> config.yaml'),
    else each deciding setting ('key: recorded -> config.yaml'). Empty where either file is missing or
    unreadable (a pipeline records no fingerprint of its own)."""
    try:
        recorded = recorded_fingerprint(run_dir)
        config = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG))
    except Exception:  # noqa: BLE001  (missing, cut or hand-broken: nothing to compare)
        return []
    stage = recorded.get("stage")
    if not isinstance(stage, str) or not isinstance(recorded.get("settings"), dict) or not isinstance(config, dict):
        return []
    named = config.get("stage", {}).get("name") if isinstance(config.get("stage"), dict) else None
    if named != stage:
        return [f"stage.name: {stage} -> {named}"]
    try:
        return settings_differences(recorded["settings"],
                                    {"settings": settings_of(stage, config, launch_dir_of(run_dir))})
    except Exception:  # noqa: BLE001  (a value the edit made unresolvable: said as such)
        return ["config.yaml: its settings no longer resolve"]


def settings_differences(old: dict, new: dict) -> list[str]:
    """What differs between recorded deciding settings and this run's fingerprint's."""
    return differences({"settings": old}, {"settings": new["settings"]})
