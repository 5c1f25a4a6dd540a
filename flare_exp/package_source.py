"""Values read from an installed package's source instead of importing it. The settings checks run before any
work, in a sweep's launcher once for every job: importing transformers' model registry or TRL's config would
import torch and transformers' trainer stack (seconds each on a login node) for a list of names. Each reader
returns None where the source does not say the value in the form expected, and its caller imports then."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def parsed(package: str, relative: str) -> ast.Module | None:
    """The installed ``package``'s file ``relative`` (e.g. "trainer/grpo_config.py"), parsed; None if absent."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level package: found, not imported
        return ast.parse((Path(spec.origin).parent / relative).read_text(encoding="utf-8"))
    except (AttributeError, TypeError, OSError, SyntaxError, ValueError):
        return None


def assigned_literal(tree: ast.Module | None, name: str):
    """The literal a module assigns to ``name`` at its top level; ``OrderedDict([...])`` / ``dict([...])`` read as
    a dict."""
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            value = node.value
            try:
                if isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("OrderedDict", "dict") \
                        and len(value.args) == 1 and not value.keywords:
                    return dict(ast.literal_eval(value.args[0]))
                return ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError):
                return None
    return None


def field_help(tree: ast.Module | None, class_name: str, field_name: str) -> str | None:
    """The ``metadata={"help": ...}`` text of a dataclass field ``field_name: ... = field(...)`` of ``class_name``."""
    for node in ast.walk(tree) if tree is not None else ():
        if not (isinstance(node, ast.ClassDef) and node.name == class_name):
            continue
        for item in node.body:
            if (isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) == field_name
                    and isinstance(item.value, ast.Call)):
                for keyword in item.value.keywords:
                    if keyword.arg == "metadata":
                        try:
                            help_text = ast.literal_eval(keyword.value).get("help")
                        except (ValueError, AttributeError, TypeError, SyntaxError):
                            return None
                        return help_text if isinstance(help_text, str) else None
    return None


def enum_values(tree: ast.Module | None, class_name: str) -> tuple[str, ...] | None:
    """The string values an enum class ``class_name`` assigns in its body (``LINEAR = "linear"``); None where
    the class is not found or assigns none."""
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            values = tuple(item.value.value for item in node.body if isinstance(item, ast.Assign)
                           and isinstance(item.value, ast.Constant) and isinstance(item.value.value, str))
            return values or None
    return None


def trainer_choices() -> dict[str, tuple[str, ...]]:
    """transformers' TrainingArguments' named choices (the Trainer refuses another only once the model is loaded,
    or at its first step): ``lr_scheduler_type`` and ``optim``, read from its source, else imported."""
    found = {"lr_scheduler_type": enum_values(parsed("transformers", "trainer_utils.py"), "SchedulerType"),
             "optim": enum_values(parsed("transformers", "training_args.py"), "OptimizerNames")}
    if None in found.values():
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        found = {"lr_scheduler_type": tuple(e.value for e in SchedulerType),
                 "optim": tuple(e.value for e in OptimizerNames)}
    return found

