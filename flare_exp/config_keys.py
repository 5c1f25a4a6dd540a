"""Unknown config keys, each with the key the user most likely meant, and values of the wrong type, found from the
schema (flare_exp/config.py) alone: the command line's overrides are checked before Hydra composes (Hydra's own advice for a misspelt key,
"To append to your config use +key=value", adds a key no stage reads), and a composed config's keys after.
Dict-typed fields (reward weights, term parameters, instructions) and untyped ones take any key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from functools import lru_cache
from pathlib import Path

from flare_exp.setting_checks import unknown_reward_term


def _dataclass_of(kind):
    """The dataclass a field holds (``Optional[X]`` -> X), else None."""
    if dataclasses.is_dataclass(kind):
        return kind
    return next((a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)), None)


@lru_cache(maxsize=None)
def _fields(schema: type) -> dict:
    return typing.get_type_hints(schema)


def _all_paths(schema: type, prefix: str = "") -> list[str]:
    paths = []
    for key, kind in _fields(schema).items():
        inner = _dataclass_of(kind)
        paths += _all_paths(inner, f"{prefix}{key}.") if inner else [f"{prefix}{key}"]
    return paths


def suggestion(schema: type, prefix: str, key: str, root: type | None = None) -> str:
    """' (did you mean <prefix><close>?)' from the same section, else the same name in another section
    (``sft.num_generations`` -> rl.num_generations), else ''."""
    close = difflib.get_close_matches(key, list(_fields(schema)), n=1)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    if root is None:
        return ""
    leaves = {p: p.rsplit(".", 1)[-1] for p in _all_paths(root)}
    elsewhere = [p for p, leaf in leaves.items() if leaf == key]
    if not elsewhere:
        near = set(difflib.get_close_matches(key, list(leaves.values()), n=1, cutoff=0.8))
        elsewhere = [p for p, leaf in leaves.items() if leaf in near]
    return f" (did you mean {' or '.join(elsewhere[:3])}?)" if elsewhere else ""


def _unknown_at(parts: list[str], schema: type) -> tuple[int, type] | None:
    """(index of the first part the schema lacks, the section it is missing from), or None when the schema has
    the key (or a dict-typed or untyped field on the way takes any key below it)."""
    node = schema
    for depth, key in enumerate(parts):
        if key not in _fields(node):
            return depth, node
        node = _dataclass_of(_fields(node)[key])
        if node is None:
            return None  # a leaf, a dict or Any: Hydra checks the value's type
    return None


def _sections(schema: type, prefix: str = "") -> list[str]:
    """'' and every section's prefix ('model.', 'model.lora.', 'eval.green.', ...)."""
    found = [prefix]
    for key, kind in _fields(schema).items():
        inner = _dataclass_of(kind)
        found += _sections(inner, f"{prefix}{key}.") if inner else []
    return found


def _moved(parts: list[str], depth: int, schema: type) -> list[str]:
    """The keys that end with the typed key's tail from its unknown part on (or a longer tail), under another
    section: lora.r -> model.lora.r, eval.lora.r -> model.lora.r; the longest tail that is found. Only keys the
    schema names count: a dict or untyped field (hydra.overrides) would take any tail."""
    known = set(_all_paths(schema)) | {s[:-1] for s in _sections(schema)}
    for start in range(depth + 1):
        tail = ".".join(parts[start:])
        found = [f"{s}{tail}" for s in _sections(schema) if f"{s}{tail}" in known]
        if found:
            return found
    return []


def unknown_path(dotted: str, schema: type) -> str | None:
    """None when the schema has ``dotted`` (or a dict-typed or untyped field on the way takes any key below
    it); else the unknown part of it with the closest key. A key whose tail is a key of another section
    (lora.r, green.batch_size) is named whole, with the key(s) it is under."""
    parts = dotted.split(".")
    unknown = _unknown_at(parts, schema)
    if unknown is None:
        return None
    depth, node = unknown
    moved = _moved(parts, depth, schema) if depth < len(parts) - 1 else []
    if moved:
        return f"{dotted} (did you mean {' or '.join(moved[:3])}?)"
    prefix = ".".join(parts[:depth]) + "." if depth else ""
    said = suggestion(node, prefix, parts[depth], root=schema)
    if not said and depth == len(parts) - 1:  # a section typed without its parent (a file's top-level lora:)
        sections = _moved(parts, depth, schema)
        said = f" (did you mean {' or '.join(sections[:3])}?)" if sections else ""
    return f"{prefix}{parts[depth]}" + said


def schema_setting(dotted: str, schema: type) -> bool:
    """Whether ``dotted`` is a field of a dataclass section (model.decode_attention), not a key under a dict."""
    node, parts = schema, dotted.split(".")
    for key in parts[:-1]:
        node = _dataclass_of(_fields(node).get(key))
        if node is None:
            return False
    return parts[-1] in _fields(node)


def unknown_keys(cfg, schema: type, prefix: str = "") -> list[str]:
    """Keys of a composed config that the schema does not have, each with the closest schema key. Hydra lets
    ``+key=value`` add a key to a structured config, which would then be ignored silently: ``+sft.learning_rat=1e-4``
    trains at the default rate."""
    from omegaconf import DictConfig

    problems = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in _fields(schema):
            problems.append(name + suggestion(schema, prefix, str(key)))
            continue
        inner, value = _dataclass_of(_fields(schema)[key]), cfg.get(key)
        if inner and isinstance(value, DictConfig):
            problems += unknown_keys(value, inner, f"{name}.")
    return problems


def override_key_problems(overrides: list[str], schema: type, groups: set[str]) -> dict[str, str]:
    """The command line's ``key=value`` / ``+key=value`` overrides whose key the schema lacks -> the problem,
    naming the closest key. Config group choices (``model=tiny``), ``hydra.*`` keys, deletions and overrides Hydra cannot
    parse are left to Hydra (its messages for those name the fix)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports its own syntax errors
        return {}
    problems = {}
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra.") and not override.is_delete():  # Hydra's own keys, against its schema
            found = unknown_path(key, _hydra_schema())
            if found:
                problems[override.input_line] = f"unknown Hydra key {found}" + (
                    "" if "did you mean" in found else " (python launch.py --cfg hydra lists Hydra's keys)")
            continue
        if override.is_delete() and "." in key and schema_setting(key, schema):
            problems[override.input_line] = (
                f"{override.input_line}: {key} is a setting of the schema, which a run always has (Hydra cannot "
                f"delete it): leave it out for its default, or set it: {key}=VALUE")
            continue
        if (override.is_delete() or override.is_hydra_override() or key == "hydra" or override.package
                or key.split("/")[0] in groups and "." not in key):  # `group@package=option` is a group choice too
            continue
        found = unknown_path(key, schema) or unknown_reward_term(key)
        group = difflib.get_close_matches(key, sorted(groups), n=1, cutoff=0.8) if found and "." not in key else []
        if group:  # a misspelt group (experimnt=flare, +clustr=a): the group is meant, not a top-level key
            plus = "+" if override.input_line.startswith("+") else ""
            found = f"{key} (did you mean the group {group[0]}: {plus}{group[0]}={_said(override.value())}?)"
        if found:
            problems[override.input_line] = f"unknown config key {found}" + (
                "" if "did you mean" in found else " (python launch.py --cfg job lists every key)")
        else:
            for value in _values(override):
                wrong = wrong_value(schema, key, value)
                if wrong:
                    problems[override.input_line] = f"{key}={_said(value)}: {wrong}"
                    break
    return problems


@lru_cache(maxsize=None)
def _hydra_schema() -> type:
    """Hydra's config as a schema under ``hydra``: its untyped parts (the launcher's and sweeper's settings, the
    logging configs) take any key, as they depend on the chosen plugin."""
    from hydra.conf import HydraConf

    return dataclasses.make_dataclass("HydraRoot", [("hydra", HydraConf)])


def _values(override) -> list:
    """The override's value, or each value of a sweep over a list or range (`a=1,2`); none for an interval
    (Optuna's search space: its values are drawn later)."""
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return list(override.sweep_iterator())
    except Exception:  # noqa: BLE001  (an interval or a sweep Hydra expands itself)
        return []


def _said(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def wrong_value(schema: type, key: str, value) -> str | None:
    """Why OmegaConf would refuse ``value`` for the schema's ``key`` (a string where a number goes, 1.5 for an
    integer, null for a key that needs a value), said the way the settings list says it; None when it takes it.
    Hydra would otherwise stop at the first such value with its own conversion error, one key at a time."""
    from omegaconf import AnyNode, ListConfig, ValueNode
    from omegaconf.errors import OmegaConfBaseException

    node = _schema_node(schema, key)
    if isinstance(value, str) and value.startswith("${"):
        return None  # an interpolation: checked when composed
    if isinstance(node, ListConfig) and value is not None and not isinstance(value, list):
        if key in LIST_SHAPES:
            return LIST_SHAPES[key]
        bare = re.fullmatch(r"[\w./:@+-]*", str(value))  # what Hydra's grammar reads without quotes
        written = f"{key}=[{value}]" if bare else f"""'{key}=["{value}"]'"""
        return f"a list: write {written} (or [a,b] for several)"
    if not isinstance(node, ValueNode):
        return None  # a section or a dict entry: checked when composed
    if value is None:
        return None if node._is_optional() else "needs a value (null is not allowed here)"
    if isinstance(value, (list, dict)) and not isinstance(node, AnyNode):
        return "must be a single value, not a " + ("list" if isinstance(value, list) else "dict")
    if type(node).__name__ not in SAID:
        return None  # strings and untyped keys: their values are checked where they are read
    if type(node).__name__ == "BooleanNode" and not _boolean(value):
        return SAID["BooleanNode"]
    try:
        node.validate_and_convert(value)
    except OmegaConfBaseException:
        return SAID[type(node).__name__]
    return None


def _boolean(value) -> bool:
    """A value a true/false key takes: OmegaConf reads any integer (2, -1) and any integer string as true, so a
    typo'd number would switch a setting on unnoticed; 0 and 1 and its words are meant."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return value in (0, 1)
    return isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "0", "1")


# lists of a fixed shape, where the usual advice (the value in brackets) would be refused next
LIST_SHAPES = {"data.image_window": "a list [low, high] in the images' own units: write data.image_window=[0,4095] "
                                    "(or null: each image by its own range)"}


def _element_nodes() -> dict:
    from omegaconf import BooleanNode, FloatNode, IntegerNode

    return {int: IntegerNode, float: FloatNode, bool: BooleanNode}


ELEMENT_NODES = _element_nodes()
SAID = {"IntegerNode": "must be an integer", "FloatNode": "must be a number", "BooleanNode": "must be true or false"}


@lru_cache(maxsize=None)
def takes_list(schema: type, key: str) -> bool:
    """Whether the schema's ``key`` holds a list (eval.predictions, stage.steps, ...)."""
    from omegaconf import ListConfig

    return isinstance(_schema_node(schema, key), ListConfig)


def _schema_node(schema: type, key: str):
    """The schema's node at ``key``: None for a key under an optional section that is null in the schema
    (data.demo: checked when composed) or one it lacks; a value node for a new entry of a typed dict (reward
    weights)."""
    from omegaconf import DictConfig

    node = _structured(schema)
    for part in key.split("."):
        if isinstance(node, DictConfig) and node._is_none():
            return None
        known = hasattr(node, "_get_node") and (part in node if isinstance(node, DictConfig) else True)
        parent, node = node, node._get_node(part) if known else None
        if node is None and isinstance(parent, DictConfig) and parent._metadata.element_type in ELEMENT_NODES:
            return ELEMENT_NODES[parent._metadata.element_type]()
    return node


@lru_cache(maxsize=None)
def _structured(schema: type):
    """The schema as OmegaConf builds it (read only: values are checked against its nodes, never set); built once
    (~0.1 s each: a launch checks ~70 values, 7 s of it on 2 cores)."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(schema)


def file_value_problems(values: list[tuple[Path, str, object]], schema: type) -> list[str]:
    """'file: key=value: why' for each value a group file the run composes sets (``values``: group_file_values)
    that the schema's type refuses, or that OmegaConf would take but mean otherwise (2 or -1 for a true/false key:
    read as true). Hydra would stop at the first refused one with its own error, and take the others without a
    word."""
    out = []
    for path, key, value in values:
        wrong = wrong_value(schema, key, value) if not key.startswith("hydra.") else None
        if wrong:
            out.append(f"{path}: {key}={_said(value)}: {wrong}")
    return out


def refused_file_values(error: BaseException, conf_dirs: list[Path], schema: type) -> list[str]:
    """Hydra stopped composing at a value a group file sets that the schema's type refuses ("In 'experiment/mine':
    ValidationError ..."): every such value of that file and those it builds on, said at once (Hydra names the
    first, the next comes one launch later). [] for another error."""
    named = re.match(r"In '([^']+)': ValidationError", str(error))
    return file_value_problems(_file_values(conf_dirs, named.group(1)), schema) if named else []


def _file_values(conf_dirs: list[Path], group_file: str) -> list[tuple[Path, str, object]]:
    """group_file_values of one group file (``experiment/mine``) and the files it builds on."""
    group, _, choice = group_file.partition("/")
    return list(group_file_values(conf_dirs, {group: choice}))


def file_unknown_keys(conf_dirs: list[Path], group_file: str, schema: type) -> list[str]:
    """Every key that a group file (``experiment/mine``) and the files it builds on set and the schema lacks,
    each with its closest key: Hydra names the first alone."""
    keys = dict.fromkeys(k for _, k, _ in _file_values(conf_dirs, group_file) if not k.startswith("hydra."))
    return [said for key in keys if (said := unknown_path(key, schema))]


def group_file_values(conf_dirs: list[Path], choices: dict):
    """(file, dotted key, value) of every value the chosen group files set, and the files their defaults name
    (found in ``conf_dirs`` in Hydra's order: conf/ first); a file that is not valid YAML is skipped (said by
    the config-file check, with its line)."""
    import yaml

    def found(name: str) -> Path | None:  # the first config dir (in Hydra's order: conf/ first) that has it
        return next((d / name for d in conf_dirs if (d / name).is_file()), None)

    seen: set[Path] = set()

    def walk(path: Path | None, group: str, placed: str | None = None):
        # in Hydra's order: a file's own values where _self_ stands among its defaults (last when it is not listed:
        # they win); ``placed``: the package the choice gives it (+cluster@sft=c), which Hydra takes over its header
        if path is None or path in seen:
            return
        seen.add(path)
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError:
            return
        if not isinstance(raw, dict):
            return
        defaults = [e for e in raw.pop("defaults", None) or [] if isinstance(e, str)]
        header = re.search(r"^#\s*@package\s+(\S+)", text, re.M)  # _global_, or a section (sft) its keys go under
        package = placed or (group if header is None else header.group(1).replace("_group_", group))
        package = "" if package == "_global_" else package
        for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:
            if entry.lstrip("/") == "_self_":
                yield from ((path, key, value) for key, value in _leaves(raw, package))
            elif entry.startswith("/"):  # /experiment/flare: a file of another group this one is built on
                yield from walk(found(f"{entry[1:]}.yaml"), entry[1:].split("/")[0])
            else:  # flare: a file of its own group
                yield from walk(found(f"{group}/{entry}.yaml"), group)

    order = _primary_order(conf_dirs)
    for group, choice in sorted(choices.items(), key=lambda item: order.get(item[0], len(order))):
        if isinstance(choice, str) and not group.startswith("hydra"):
            name, _, placed = group.partition("@")  # +cluster@sft=c: the file is cluster/c.yaml
            yield from walk(found(f"{name}/{choice}.yaml"), name, placed or None)


def _primary_order(conf_dirs: list[Path]) -> dict[str, int]:
    """Where Hydra composes each group: its place in the primary config's defaults list (conf/config.yaml); a
    group appended on the command line (+cluster=a) is not there and comes after them all, so its values win."""
    import yaml

    from flare_exp.defaults_lists import defaults_group

    try:
        listed = yaml.safe_load((conf_dirs[0] / "config.yaml").read_text(encoding="utf-8")).get("defaults") or []
    except (OSError, AttributeError, IndexError, yaml.YAMLError):
        listed = []
    names = [defaults_group(str(next(iter(e)))) if isinstance(e, dict) else str(e) for e in listed]
    return {name: i for i, name in reversed(list(enumerate(names)))}  # the first place, as list.index gave


def _leaves(node, prefix: str):
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted)
        else:
            yield dotted, value
