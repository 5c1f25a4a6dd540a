"""The config dirs a launch composes from beside the repo's conf/ (``--config-dir``, ``hydra.searchpath``), read as
Hydra reads them, for launch.py's checks before Hydra starts: the overrides as Hydra runs them, the dirs they add
(their groups are known keys), and a user's group file that conf/ hides."""
from __future__ import annotations

import os
import re
from pathlib import Path

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
        for picking, named, value in _picks_below(file, dirs, set()):  # the files it includes too
            hydra_own = any(picking.is_relative_to(d / "hydra") for d in dirs)  # slurm.yaml's base launcher
            if named.startswith("hydra/") and not hydra_own and choices.get(named) != value:
                out.append(_not_taken(picking, (named, value), choices.get(named), overrides, dirs))
    return list(dict.fromkeys(out))  # one file included by two choices: said once


def misplaced_hydra_pick(error: str, overrides: list[str], dirs: list[Path]) -> str | None:
    """Hydra's "In experiment/mine: Override 'data : demo' is defined before 'hydra/launcher: slurm'" for a user's
    ``- /hydra/launcher: slurm`` (no ``override``) after the file's override entries: said as ignored_hydra_picks
    says a pick this launch does not take, which it is wherever it stands (the primary config, ``dirs[0]``'s
    config.yaml, picks that group itself). None for any other error, or a group the primary config leaves."""
    found = re.search(r"In '?([^':]+)'?: Override '[^']*' is defined before '(hydra/[^:']+): ([^']+)'", error)
    if not found:
        return None
    named, group, value = found.groups()
    file = next((d / f"{named}.yaml" for d in dirs if (d / f"{named}.yaml").is_file()), None)
    taken = {defaults_group(key): v for key, v in _defaults_entries(dirs[0] / "config.yaml")}.get(group)
    if file is None or taken is None:
        return None
    return _not_taken(file, (group, value), taken, overrides, dirs)


def _not_taken(file: Path, pick: tuple[str, str], taken: str, overrides: list[str], dirs: list[Path]) -> str:
    """A Hydra group ``file`` picks (``pick``: group, option) that the launch does not take: why (the command
    line's choice, else ``taken``, conf/config.yaml's) and the way that works, the command line's choice."""
    group, value = pick
    given = next((o for o in overrides if o.partition("=")[0].lstrip("+~") == group), None)
    why = f"the command line's {given} wins" if given else f"the repo's conf/config.yaml chooses {group}={taken}"
    options = _group_options(group, dirs)
    fix = (f"choose it on the command line: -m {group}={value}" if value in options else
           f"nor is {value} a {group} option: {', '.join(options)}")
    return (f"{file}: its defaults list picks {group}={value}, which this launch does not take ({why}); {fix}; "
            "drop it from the file")


def choice_problem(error: str, overrides: list[str], dirs: list[Path]) -> str | None:
    """What to say of Hydra's composition error about a group choice (launch.config_file_problem): an option
    that does not exist (missing_choice), a null one (null_choice), a Hydra group picked in a user's file after
    its overrides (misplaced_hydra_pick); None for any other error."""
    if "Config group override must be a string" in error:
        return null_choice(overrides, dirs)
    missing = re.search(r"Could not find '([^']+)'", error)
    return (missing and missing_choice(missing.group(1), overrides, dirs)) or misplaced_hydra_pick(
        error, overrides, dirs)


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


def missing_choice(missing: str, overrides: list[str], dirs: list[Path]) -> str | None:
    """What to say of Hydra's "Could not find 'group/option'" (``missing``): the group file of the user's whose
    defaults list picks it (Hydra names only 'config'), found from the command line's choices through the files
    their defaults lists include, or the command line's own choice; with every other option those files and
    the command line pick that no config dir has (Hydra stops at the first), each with the group's options
    (Hydra's own and its plugins' too, and those in ``dirs``) and the nearest one. None when ``missing`` names
    no group file."""
    group, _, option = missing.rpartition("/")
    if not group:
        return None
    on_line, roots, chosen = _command_line_misses(overrides, dirs), [], False
    for override in overrides:  # the group files the command line chooses, in its order
        key, _, value = override.partition("=")
        key = key.lstrip("+~").split("@")[0]  # +cluster@sft=x picks cluster/x.yaml
        values = sweep_values(value, key, dirs) if value else [""]
        chosen = chosen or (key == group and option in values)
        if "/" not in key and value:
            roots += [f for each in values for d in dirs
                      if (f := d / key / f"{each}.yaml").is_file() and f not in roots]
    picks = {r: _picks_below(r, dirs, set()) for r in roots}  # each chosen file and what it includes, read once
    picking = next((r for r in roots if any((g, v) == (group, option) for _, g, v in picks[r])), None)
    if picking is None and not chosen:
        return None
    in_files = {r: misses for r in roots
                if (misses := _file_misses(picks[r], (group, option) if r == picking else None, dirs))}
    said = [line for misses in in_files.values() for line in misses] + on_line
    if len(said) == 1:
        return said[0]
    files = " and ".join(f"the defaults lists of {r} and its includes" for r in in_files)
    head = (f"options {files} pick" if not on_line else "choices on the command line" if not in_files else
            f"options picked on the command line and in {files}")
    return f"{len(said)} {head} do not exist:\n" + "\n".join(f"    - {line}" for line in said)


def _command_line_misses(overrides: list[str], dirs: list[Path]) -> list[str]:
    """Every group choice on the command line that no config dir has, each with its group's options."""
    said = []
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~").split("@")[0]
        options = [] if "." in group else _group_options(group, dirs)
        if not options:  # a key's value, not a group's choice
            continue
        said += [f"{override} on the command line: {_no_option(group, each, dirs, key)}"
                 for each in (sweep_values(value, group, dirs) if value else [""]) if each not in options]
    return said


def _no_option(group: str, option: str, dirs: list[Path], spelled: str | None = None) -> str:
    """'no group/option.yaml in the config dirs; group has a, b (did you mean group=a?)'; ``spelled``: the key as
    the command line wrote it (+cluster@sft), for the suggestion."""
    import difflib

    options = _group_options(group, dirs)
    near = difflib.get_close_matches(option, options, n=1)
    return (("no option given; " if not option else f"no {group}/{option}.yaml in the config dirs; ") + (
        f"{group} has {', '.join(options)}" if options else f"there is no config group {group}")
        + (f" (did you mean {spelled or group}={near[0]}?)" if near else ""))


def _file_misses(picks: list[tuple[Path, str, str]], missing: tuple[str, str] | None, dirs: list[Path]) -> list[str]:
    """Of ``picks`` (_picks_below of a command-line choice's file), the option Hydra found missing (``missing``:
    group, option) and every other one no config dir has, each named with its file and the group's options."""
    return [f"{file}: its defaults list picks {group}={value}, and there is {_no_option(group, value, dirs)}"
            for file, group, value in picks if (group, value) == missing or value not in _group_options(group, dirs)]


def _picks_below(file: Path, dirs: list[Path], seen: set) -> list[tuple[Path, str, str]]:
    """(file, group, option) of every group choice in ``file``'s defaults list and in the files it includes."""
    if file in seen or not file.is_file():
        return []
    seen.add(file)
    picks = []
    for key, value in _defaults_entries(file):
        named = _entry_group(file, key, dirs)
        if value is not None:
            picks.append((file, named, value))
        included = f"{named}/{value}" if value is not None else named
        target = next((d / f"{included}.yaml" for d in dirs if (d / f"{included}.yaml").is_file()), None)
        picks += _picks_below(target, dirs, seen) if target else []
    return picks


def sweep_values(value: str, group: str, dirs: list[Path]) -> list[str]:
    """The options a command-line choice names: one, a comma list, choice(a,b) or glob(pattern) of the group's."""
    import fnmatch

    inner = value[value.index("(") + 1:value.rindex(")")] if value.endswith(")") and "(" in value else value
    names = [v.strip().strip("'\"") for v in inner.split(",") if v.strip()]
    if value.startswith("glob("):
        options = _group_options(group, dirs)
        return [o for o in options if any(fnmatch.fnmatch(o, pattern) for pattern in names)]
    return names


def null_choice(overrides: list[str], dirs: list[Path]) -> str | None:
    """A config group given null on the command line (Hydra's answer is a traceback): what it takes instead."""
    for override in overrides:
        key, _, value = override.partition("=")
        options = _group_options(key.lstrip("+~"), dirs) if value.strip().lower() in ("null", "none", "~") else []
        if options:
            return f"{override}: a config group takes one of its options, not null: {', '.join(options)}"
    return None


def _group_options(group: str, dirs: list[Path]) -> list[str]:
    """A group's options as Hydra finds them (conf/, its own hydra/ groups, its plugins') and in ``dirs``."""
    options = {f.stem for d in dirs if (d / group).is_dir() for f in (d / group).glob("*.yaml")}
    try:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        with initialize_config_dir(config_dir=str(dirs[0]), version_base="1.3"):
            options.update(GlobalHydra.instance().config_loader().get_group_options(group))
    except Exception:  # noqa: BLE001  (the list only: the message stands without Hydra's)
        pass
    return sorted(options)


def defaults_group(key: str) -> str:
    """The group a defaults-list entry's key names: ``override /hydra/launcher`` -> hydra/launcher,
    ``/model@foo`` -> model."""
    return key.removeprefix("override ").strip().lstrip("/").split("@")[0]


def _entry_group(file: Path, key: str, dirs: list[Path]) -> str:
    """The group (or file, for an include) a defaults entry of ``file`` names: without a leading / it is
    relative to the group ``file`` is in, as Hydra reads it (``- incl`` in experiment/mine.yaml is
    experiment/incl)."""
    named = defaults_group(key)
    if key.removeprefix("override ").strip().startswith("/"):
        return named
    home = next((file.parent.relative_to(d).as_posix() for d in dirs if file.is_relative_to(d)), ".")
    return named if home == "." else f"{home}/{named}"


def _defaults_entries(file: Path) -> list[tuple[str, str | None]]:
    """A group file's defaults list as (key, choice) pairs: ``- group: x`` gives (group, x), ``- /path`` gives
    (/path, None)."""
    import yaml

    try:
        defaults = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("defaults") or []
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return []
    out = []
    for entry in defaults if isinstance(defaults, list) else []:
        if isinstance(entry, dict):
            out += [(str(k), str(v)) for k, v in entry.items() if v is not None]
        elif isinstance(entry, str) and entry != "_self_":
            out.append((entry, None))
    return out
