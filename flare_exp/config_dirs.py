"""The config dirs a launch composes from beside the repo's conf/ (``--config-dir``, ``hydra.searchpath``), read as
Hydra reads them, for launch.py's checks before Hydra starts: the overrides as Hydra runs them, the dirs they add
(their groups are known keys), and a user's group file that conf/ hides."""
from __future__ import annotations

import os
import re
from pathlib import Path

from flare_exp.defaults_lists import (entry_problems, group_options, no_option, not_a_list, not_taken,
                                      picks_below)

SEARCHPATH = "hydra.searchpath"


def with_config_dir(overrides: list[str], config_dir: str | None) -> list[str]:
    """The overrides composed as Hydra runs them: ``--config-dir D`` adds D to the config search path after
    conf/ (a file both hold is conf/'s: ``shadowed_files`` refuses that) and before any hydra.searchpath entry,
    as ``hydra.searchpath=[file://D, ...]`` does. D as Hydra reads it: no ``~`` expanded; one that is no
    directory is a ValueError (Hydra's own error is a traceback-like report)."""
    if not config_dir:
        return list(overrides)
    where = os.path.abspath(config_dir)  # Hydra's own reading of the flag
    if not os.path.isdir(where):
        tilde = (" The shell expands ~ only at a word's start: write --config-dir ~/... (a space, not '=') or "
                 "$HOME/..." if "~" in config_dir else "")
        raise ValueError(f"--config-dir {config_dir}: no such directory ({where}).{tilde}")
    given = [o for o in overrides if _sets_searchpath(o)]
    others = [o for o in overrides if o not in given]
    listed = ",".join([f"file://{where}"] + [p for o in given for p in _searchpath_entries(o)])
    return [*others, f"{SEARCHPATH}=[{listed}]"]


def _searchpath_entries(override: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001  (Hydra's own complaint comes when it composes)
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _sets_searchpath(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+") == SEARCHPATH


def entry_dir(entry: str) -> Path | None:
    """The folder a search-path entry names (file:// or a plain path); None for a package (pkg://) or Hydra's
    structured configs (structured://)."""
    scheme, sep, path = entry.partition("://")
    return (Path(path) if scheme == "file" else None) if sep else Path(entry)


def searched_dirs(overrides: list[str]) -> list[Path]:
    """The config dirs a ``hydra.searchpath`` override adds."""
    return [d for o in overrides if _sets_searchpath(o) for e in _searchpath_entries(o) if (d := entry_dir(e))]


def shadowed_files(dirs: list[Path], choices: dict, conf_dir: Path) -> list[str]:
    """A chosen group file of the user's config dir that one of ``conf_dir`` (the repo's conf/, searched first)
    hides: the run would compose the repo's without a word (a copy of experiment/flare.yaml edited under the same
    name)."""
    out = []
    for group, choice in choices.items():
        if not isinstance(choice, str) or group.startswith("hydra"):
            continue
        name = f"{group}/{choice}.yaml"
        found = [d / name for d in dirs if (d / name).is_file()]
        if len(found) > 1 and found[0].is_relative_to(conf_dir):
            out.append(f"{found[1]}: {group}={choice} composes {found[0]} instead (Hydra searches the repo's conf/ "
                       f"first); give yours another name")
    return out


def ignored_hydra_picks(dirs: list[Path], choices: dict, overrides: list[str] = ()) -> list[str]:
    """A user's chosen group file whose defaults list (or that of a file it includes) picks a Hydra group
    (``override /hydra/launcher: slurm``) that the composition did not take: conf/config.yaml's own override of
    that group wins (hydra/launcher: watched), and Hydra says nothing, so a sweep meant for SLURM would run its
    jobs one by one where it was launched."""
    out = []
    for group, choice in choices.items():
        if not isinstance(choice, str) or group.startswith("hydra"):
            continue
        # conf/'s files too: the docs tell users to copy an experiment there (the repo's own picks are taken)
        file = next((d / group / f"{choice}.yaml" for d in dirs if (d / group / f"{choice}.yaml").is_file()), None)
        if file is None:
            continue
        for picking, named, value, _ in picks_below(file, dirs, set()):  # the files it includes too
            hydra_own = any(picking.is_relative_to(d / "hydra") for d in dirs)  # slurm.yaml's base launcher
            if named.startswith("hydra/") and value is not None and not hydra_own and choices.get(named) != value:
                out.append(not_taken(picking, (named, value), choices.get(named), overrides, dirs))
    return list(dict.fromkeys(out))  # one file included by two choices: said once


# Hydra's errors about a defaults list (a missing option or include, an entry it reads otherwise than meant):
# each stops at the first problem and most name no file ("In 'config'"), so the chosen files are read for them all
DEFAULTS_ERRORS = re.compile(r"Could not (find|load|override) '|appears more than once in the final defaults list|"
                             r"Multiple values for |Overrides must be at the end of the defaults list")


def choice_problem(error: str, overrides: list[str], dirs: list[Path]) -> str | None:
    """What to say of Hydra's composition error about a group choice (command_line.config_file_problem): a null one
    (null_choice), a defaults list that is no list (not_a_list), or what is wrong in the defaults lists of the
    chosen files and on the command line (defaults_problem); None for any other error."""
    if "Config group override must be a string" in error:
        return null_choice(overrides, dirs)
    if "Invalid defaults list in" in error:
        return not_a_list(error, dirs)
    return defaults_problem(overrides, dirs) if DEFAULTS_ERRORS.search(error) else None


def composed_dirs(searched: list[Path], cfg) -> list[Path]:
    """The config dirs a composed config (its hydra node kept) read its group files from, in Hydra's order:
    ``searched`` (Hydra's own search path: conf/, then --config-dir's), then hydra.searchpath's entries."""
    dirs = [*searched, *(d for entry in cfg.hydra.searchpath if (d := entry_dir(str(entry))))]
    return list(dict.fromkeys(dirs))


def users_files(values, overrides: list[str], conf_dir: Path) -> dict[str, Path]:
    """The keys the user's own group files set -> the file that sets each (``values``: config_keys.
    group_file_values's, in Hydra's order: the last file to set a key sets it). A key the command line gives
    (``overrides``) is the command line's; conf/'s files are the repo's (checked by its tests)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    from_files = {key: path for path, key, _ in values}
    return {key: path for key, path in from_files.items()
            if key not in given and not path.is_relative_to(conf_dir)}


def defaults_problem(overrides: list[str], dirs: list[Path]) -> str | None:
    """Every problem of the defaults lists of the group files the command line chooses (through the files they
    include: defaults_lists.entry_problems, each naming its file) and every command-line choice no config dir
    has, in one message (Hydra stops at the first, most often as "In 'config'"); None when there is none."""
    roots = []
    for override in overrides:  # the group files the command line chooses, in its order
        key, _, value = override.partition("=")
        key = key.lstrip("+~").split("@")[0]  # +cluster@sft=x picks cluster/x.yaml
        if "/" not in key and value:
            roots += [f for each in sweep_values(value, key, dirs) for d in dirs
                      if (f := d / key / f"{each}.yaml").is_file() and f not in roots]
    in_files = {r: found for r in roots if (found := entry_problems(picks_below(r, dirs, set()), dirs, overrides))}
    on_line = _command_line_misses(overrides, dirs)
    said = list(dict.fromkeys(line for found in in_files.values() for _, line in found)) + on_line
    if len(said) <= 1:
        return said[0] if said else None
    files = " and ".join(f"the defaults lists of {r} and its includes" for r in in_files)
    if any(not missing for found in in_files.values() for missing, _ in found):
        head = f"problems in {files}" + (" and on the command line" if on_line else "")
    else:
        head = (f"options {files} pick do not exist" if not on_line else "choices on the command line do not "
                "exist" if not in_files else f"options picked on the command line and in {files} do not exist")
    return f"{len(said)} {head}:\n" + "\n".join(f"    - {line}" for line in said)


def _command_line_misses(overrides: list[str], dirs: list[Path]) -> list[str]:
    """Every group choice on the command line that no config dir has, each with its group's options."""
    said = []
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~").split("@")[0]
        options = [] if "." in group else group_options(group, dirs)
        if not options:  # a key's value, not a group's choice
            continue
        spelled = (lambda o, key=key: f"{key}={o}")  # as the command line spells the key: +cluster@sft=a
        said += [f"{override if each == value else f'{key}={each} (in {override})'} on the command line: "
                 f"{no_option(group, each, dirs, spelled)}"
                 for each in (sweep_values(value, group, dirs) if value else [""]) if each not in options]
    return said


def sweep_values(value: str, group: str, dirs: list[Path]) -> list[str]:
    """The options a command-line choice names: one, a comma list, choice(a,b) or glob(pattern) of the group's."""
    import fnmatch

    inner = value[value.index("(") + 1:value.rindex(")")] if value.endswith(")") and "(" in value else value
    names = [v.strip().strip("'\"") for v in inner.split(",") if v.strip()]
    if value.startswith("glob("):
        options = group_options(group, dirs)
        return [o for o in options if any(fnmatch.fnmatch(o, pattern) for pattern in names)]
    return names


def null_choice(overrides: list[str], dirs: list[Path]) -> str | None:
    """A config group given null on the command line (Hydra's answer is a traceback): what it takes instead."""
    for override in overrides:
        key, _, value = override.partition("=")
        options = group_options(key.lstrip("+~"), dirs) if value.strip().lower() in ("null", "none", "~") else []
        if options:
            return f"{override}: a config group takes one of its options, not null: {', '.join(options)}"
    return None
