"""A group file's defaults list as Hydra reads it (the entries, the files it includes, the groups it picks) and
what is wrong with one a user wrote, said before Hydra's own report: Hydra names one problem per launch, often
not the file ("In 'config'"), and for some only its own reading ("Could not override 'experiment/hydra/sweeper'",
"data appears more than once in the final defaults list")."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

# where the repo writes a Hydra group's pick in an experiment: the line to show a user (conf/experiment/*.yaml)
CONVENTION = "before `- _self_`, as conf/experiment/reward_search.yaml does"


class Pick(NamedTuple):
    """One defaults entry of ``file``: ``group`` as Hydra reads it (relative keys joined to the file's group),
    ``value`` the option (None for an include, whose file is ``group``.yaml), ``key`` as the file writes it."""
    file: Path
    group: str
    value: str | None
    key: str


def picks_below(file: Path, dirs: list[Path], seen: set) -> list[Pick]:
    """Every entry of ``file``'s defaults list and of the files it includes (an include that is not there
    too: a Pick whose value is None and whose file no dir has)."""
    if file in seen or not file.is_file():
        return []
    seen.add(file)
    picks = []
    for key, value in defaults_entries(file):
        named = entry_group(file, key, dirs)
        picks.append(Pick(file, named, value, key))
        included = f"{named}/{value}" if value is not None else named
        target = next((d / f"{included}.yaml" for d in dirs if (d / f"{included}.yaml").is_file()), None)
        picks += picks_below(target, dirs, seen) if target else []
    return picks


def defaults_group(key: str) -> str:
    """The group a defaults-list entry's key names: ``override /hydra/launcher`` -> hydra/launcher,
    ``/model@foo`` -> model."""
    return key.removeprefix("override ").strip().lstrip("/").split("@")[0]


def is_override(key: str) -> bool:
    return key.startswith("override ")


def entry_group(file: Path, key: str, dirs: list[Path]) -> str:
    """The group (or file, for an include) a defaults entry of ``file`` names: without a leading / it is
    relative to the group ``file`` is in, as Hydra reads it (``- incl`` in experiment/mine.yaml is
    experiment/incl)."""
    named = defaults_group(key)
    if key.removeprefix("override ").strip().startswith("/"):
        return named
    home = next((file.parent.relative_to(d).as_posix() for d in dirs if file.is_relative_to(d)), ".")
    return named if home == "." else f"{home}/{named}"


def _defaults_list(file: Path) -> list:
    import yaml

    try:
        defaults = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("defaults") or []
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return []
    return defaults if isinstance(defaults, list) else []


def where_picks_go(file: Path) -> str:
    """Where to write a pick in ``file``: before its ``- _self_`` (the repo's convention), or, in a list without
    one, anywhere in it (Hydra reads the file's own keys after the list)."""
    return CONVENTION if "_self_" in _defaults_list(file) else "in its defaults list"


def defaults_entries(file: Path) -> list[tuple[str, str | None]]:
    """A group file's defaults list as (key, choice) pairs: ``- group: x`` gives (group, x), ``- /path`` gives
    (/path, None)."""
    out = []
    for entry in _defaults_list(file):
        if isinstance(entry, dict):
            out += [(str(k), str(v)) for k, v in entry.items() if v is not None]
        elif isinstance(entry, str) and entry != "_self_":
            out.append((entry, None))
    return out


def group_options(group: str, dirs: list[Path]) -> list[str]:
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


def no_option(group: str, option: str, dirs: list[Path], spelled=None) -> str:
    """'no group/option.yaml in the config dirs; group has a, b (did you mean group=a?)'; ``spelled``: how to
    write the suggestion, from the option (the command line's +cluster@sft=a; a file's include, - a)."""
    import difflib

    options = group_options(group, dirs)
    near = difflib.get_close_matches(option, options, n=1)
    spell = spelled or (lambda o: f"{group}={o}")
    return (("no option given; " if not option else f"no {group}/{option}.yaml in the config dirs; ") + (
        f"{group} has {', '.join(options)}" if options else f"there is no config group {group}")
        + (f" (did you mean {spell(near[0])}?)" if near else ""))


def not_taken(file: Path, pick: tuple[str, str], taken: str, overrides: list[str], dirs: list[Path]) -> str:
    """A Hydra group ``file`` picks (``pick``: group, option) that the launch does not take: why (the command
    line's choice, else ``taken``, conf/config.yaml's) and the way that works, the command line's choice."""
    group, value = pick
    given = next((o for o in overrides if o.partition("=")[0].lstrip("+~") == group), None)
    why = f"the command line's {given} wins" if given else f"the repo's conf/config.yaml chooses {group}={taken}"
    options = group_options(group, dirs)
    fix = (f"choose it on the command line: -m {group}={value}" if value in options else
           f"nor is {value} a {group} option: {', '.join(options)}")
    return (f"{file}: its defaults list picks {group}={value}, which this launch does not take ({why}); {fix}; "
            "drop it from the file")


def entry_problems(picks: list[Pick], dirs: list[Path], overrides: list[str] = ()) -> list[tuple[bool, str]]:
    """What is wrong with each of ``picks`` (picks_below of a chosen file) as Hydra will compose it, each as
    (a missing file?, the line naming the file, the entry, what is wrong and what to write). ``dirs[0]``'s
    config.yaml is the primary config: the groups it chooses take ``override`` in a file, the others do not."""
    primary = {defaults_group(k): v for k, v in defaults_entries(dirs[0] / "config.yaml") if v is not None}
    chosen = {p.group for p in picks if p.value is not None and not is_override(p.key)}
    out, after_override = [], {}
    for pick in picks:
        said = _entry_problem(pick, dirs, overrides, primary, chosen)
        if said is None and after_override.get(pick.file) and not is_override(pick.key):
            said = (False, f"{pick.file}: `{_entry(pick)}` comes after the file's override entries "
                           f"(`{_entry(after_override[pick.file])}`), which Hydra wants last: move it above them")
        if is_override(pick.key):
            after_override.setdefault(pick.file, pick)
        out += [said] if said else []
    return out


def _entry(pick: Pick) -> str:
    return f"- {pick.key}" + (f": {pick.value}" if pick.value is not None else "")


def _entry_problem(pick: Pick, dirs: list[Path], overrides: list[str], primary: dict, chosen: set):
    file, group, value, key = pick
    hydras_own = any(file.is_relative_to(d / "hydra") for d in dirs)  # slurm.yaml's base launcher
    absolute = defaults_group(key)
    if group != absolute and not _exists(group, value, dirs) and _exists(absolute, value, dirs):
        fixed = Pick(file, absolute, value, f"override /{absolute}" if absolute in primary or
                     absolute.startswith("hydra/") else f"/{absolute}")
        rest = _entry_problem(fixed, dirs, overrides, primary, chosen)
        return (False, f"{file}: `{_entry(pick)}` names {group}, which is not there (an entry without a leading / "
                       f"is read inside the file's own group): {absolute} is written /{absolute}"
                       + (f"; as such, {rest[1].removeprefix(f'{file}: ')}" if rest else
                          f"; write `{_entry(fixed)}` {where_picks_go(file)}"))
    if value is None:
        parent, _, name = group.rpartition("/")
        if hydras_own or _exists(group, None, dirs):
            return None
        if ":" in key:  # `- override /model:tiny`: YAML reads one name, which Hydra looks for as a file
            option_key, _, option = key.rpartition(":")
            return (False, f"{file}: `{_entry(pick)}` is one name to YAML (it needs a space after the colon), which "
                           f"Hydra looks for as a file: write `- {option_key}: {option.strip()}`")
        before = key.rpartition("/")[0]
        return (True, f"{file}: its defaults list includes {group} (`{_entry(pick)}`), and there is "
                      + no_option(parent, name, dirs, lambda o: f"`- {before + '/' if before else ''}{o}`"))
    taken = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") == group),
                 primary.get(group))
    if group.startswith("hydra/") and group in primary and not hydras_own and value != taken:
        return False, not_taken(file, (group, value), primary[group], overrides, dirs)
    if not is_override(key) and (group in primary or group.startswith("hydra/")) and not hydras_own:
        who = "conf/config.yaml" if group in primary else "Hydra's own config"
        return (False, f"{file}: `{_entry(pick)}` picks {group} without `override`, but {who} chooses {group} "
                       f"already: write `- override /{group}: {value}` "
                       f"{where_picks_go(file)}{_missing(group, value, dirs)}")
    if is_override(key) and group not in primary and group not in chosen and not group.startswith("hydra/"):
        return (False, f"{file}: `{_entry(pick)}` overrides {group}, which nothing before it chooses: "
                       f"write `- /{group}: {value}`{_missing(group, value, dirs)}")
    if not _exists(group, value, dirs) and not hydras_own:
        return True, f"{file}: its defaults list picks {group}={value}, and there is {no_option(group, value, dirs)}"
    return None


def _exists(group: str, value: str | None, dirs: list[Path]) -> bool:
    """Whether Hydra finds ``group``'s option ``value``, or (value None) the file ``group``.yaml."""
    parent, _, name = group.rpartition("/")
    return name in group_options(parent, dirs) if value is None else value in group_options(group, dirs)


def _missing(group: str, value: str, dirs: list[Path]) -> str:
    return "" if _exists(group, value, dirs) else f"; and there is {no_option(group, value, dirs)}"


def not_a_list(error: str, dirs: list[Path]) -> str | None:
    """Hydra's "Invalid defaults list in 'experiment/mine', defaults must be a list (got mapping)" (a traceback):
    the file, and its entries as the list items to write."""
    import re

    import yaml

    found = re.search(r"Invalid defaults list in '([^']+)', defaults must be a list \(got (\w+)\)", error)
    file = found and next((f for d in dirs if (f := d / f"{found.group(1)}.yaml").is_file()), None)
    if not file:
        return None
    try:
        given = yaml.safe_load(file.read_text(encoding="utf-8"))["defaults"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        given = None
    items = [f"- {k}: {v}" for k, v in given.items()] if isinstance(given, dict) else ["- override /group: option"]
    return (f"{file}: its defaults is a {found.group(2)}, and Hydra takes a list, one entry per line starting with "
            f"'- ': write `defaults:` then {', '.join(f'`  {item}`' for item in items)}, each on its own line")
