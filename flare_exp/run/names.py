"""A run's name is a name: it places the run dir under ``paths.output_root`` and never outside it."""
from __future__ import annotations

from omegaconf import OmegaConf


def check_run_name(name) -> str:
    """``name`` itself, or a ValueError saying why it is not one directory name (a path separator, ``..``)."""
    text = str(name)
    why = ("is empty" if not text.strip() else
           "holds a path separator" if "/" in text or "\\" in text else
           "is '.' or '..'" if text in (".", "..") else
           "holds '..'" if ".." in text else
           "holds a control character" if any(not c.isprintable() for c in text if c != " ") else
           "starts with '-' (read as an option by the shell's tools)" if text.startswith("-") else
           "starts with '.' (a hidden directory: stage=runs would not list it)" if text.startswith(".") else
           "starts with '~' (a shell reads ~name as a user's home)" if text.startswith("~") else
           f"is {len(text.encode())} bytes long (a directory name holds at most 255)" if len(text.encode()) > 255
           else None)
    if why:
        raise ValueError(f"run_name={text!r} {why}: a run name names one directory under paths.output_root "
                         "(runs/<run_name>, sweeps/<run_name>); use letters, digits, '-', '_' and single dots")
    return text


def hydra_dir_setting(hydra, sweep: bool) -> str:
    """The setting whose other value gives another Hydra run dir (``sweep``: sweep dir), from the launch's hydra
    node: run_name, which conf/config.yaml's hydra.run.dir and hydra.sweep.dir name; hydra.run.dir (or
    hydra.sweep.dir) itself where the launch gave one that does not name run_name (hydra.run.dir=/scratch/x):
    another run_name would not move it."""
    key = "sweep" if sweep else "run"
    try:
        raw = OmegaConf.to_container(hydra[key], resolve=False).get("dir")
    except Exception:  # noqa: BLE001  (no such node: conf/config.yaml's own placing)
        return "run_name"
    return "run_name" if "run_name" in str(raw) else f"hydra.{key}.dir"


def placed_by(folder) -> str:
    """The setting that placed ``folder``, when it is this Hydra run's output dir, its sweep dir or a dir in
    them (a lock refusal's way round: choose another ...=): hydra_dir_setting; run_name otherwise (no Hydra
    config: a run started from Python)."""
    import os
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra = HydraConfig.get()
        sweep = hydra.mode == RunMode.MULTIRUN
        base = Path(os.path.abspath(str(hydra.sweep.dir if sweep else hydra.run.dir)))
    except Exception:  # noqa: BLE001  (HydraConfig not set, or a dir that does not resolve here)
        return "run_name"
    here = Path(os.path.abspath(str(folder)))
    return hydra_dir_setting(hydra, sweep) if here == base or base in here.parents else "run_name"


# conf/config.yaml places Hydra's run and sweep dirs through this resolver, so a bad name stops before Hydra
# makes any directory for it.
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", check_run_name)
