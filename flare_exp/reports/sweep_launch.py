"""Which launch made a sweep's jobs: a sweep dir relaunched with overwrite=true and a smaller grid, or other fixed
settings, keeps the earlier launch's other jobs beside the new ones; the report tells them apart by the latest
launch's overrides (its multirun.yaml: the fixed ones and each swept key's values)."""
from __future__ import annotations

from pathlib import Path

import yaml

from flare_exp.run.layout import CONFIG, HYDRA

# how a job was launched (a rerun's overwrite=true, a search's own trial keys), not what it ran: no column
LAUNCH_KEYS = ("overwrite", "resume", "rl.optuna_trial", "rl.optuna_study")


def latest_launch(sweep_dir: Path) -> tuple[dict, dict] | None:
    """(key -> value, swept key -> its values) of the sweep dir's latest launch, both as Hydra writes a job's
    overrides; None where multirun.yaml is not there or not readable, or a search made the jobs (an Optuna
    study's ranges are no list of values: its study tells its trials apart)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra = yaml.safe_load((sweep_dir / "multirun.yaml").read_text(encoding="utf-8"))["hydra"]
        given = list(hydra["overrides"]["task"])
        params = hydra.get("sweeper", {}).get("params") or {}  # a grid in a config file (BasicSweeper's params)
        overrides = OverridesParser.create().parse_overrides(given + [f"{k}={v}" for k, v in params.items()])
    except Exception:  # noqa: BLE001  (cut, hand-edited, or an override Hydra's parser no longer reads)
        return None
    fixed, swept = {}, {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
        elif override.is_discrete_sweep():
            swept[key] = list(override.sweep_string_iterator())
        else:
            return None
    return fixed, swept


def earlier_launch(job_overrides: dict, launch: tuple[dict, dict]) -> str | None:
    """Why a job's overrides (key -> value as its overrides.yaml says) are not one of the latest launch's jobs:
    the first key that differs; None where it is one of them."""
    fixed, swept = launch
    launched = lambda key: key.lstrip("+~") in LAUNCH_KEYS  # noqa: E731
    mine = {k: v for k, v in normalised(job_overrides).items() if not launched(k)}
    for key, value in fixed.items():
        if not launched(key) and mine.get(key) != value:
            return f"{key}={mine.get(key, '(not set)')}, the latest launch's {value}"
    for key, values in swept.items():
        if mine.get(key) not in values:
            return f"{key}={mine.get(key, '(not set)')}, none of the latest launch's {', '.join(values)}"
    extra = sorted(set(mine) - set(fixed) - set(swept))
    return f"{extra[0]}={mine[extra[0]]}, which the latest launch does not set" if extra else None


def normalised(overrides: dict) -> dict:
    """key -> value as Hydra's parser writes it ("true" and "True" alike, "1e-3" as "0.001"), as the launch's
    are read; a value it does not read stays as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), {}
    for key, value in overrides.items():
        try:
            out[key] = parser.parse_override(f"{key}={value}").get_value_element_as_str()
        except Exception:  # noqa: BLE001
            out[key] = value
    return out


def config_value(job_dir: Path, key: str) -> str | None:
    """``key``'s value in the config a job ran with (its .hydra/config.yaml, else its config.yaml), as text; None
    where neither is readable or the key is not there."""
    from omegaconf import OmegaConf

    for path in (job_dir / HYDRA / "config.yaml", job_dir / CONFIG):
        try:
            value = OmegaConf.select(OmegaConf.load(path), key, throw_on_missing=False)
        except Exception:  # noqa: BLE001  (not there, cut, or an interpolation that does not resolve alone)
            continue
        if value is not None:
            return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return None
