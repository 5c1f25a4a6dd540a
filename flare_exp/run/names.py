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
           "starts with '~' (a shell reads ~name as a user's home)" if text.startswith("~") else None)
    if why:
        raise ValueError(f"run_name={text!r} {why}: a run name names one directory under paths.output_root "
                         "(runs/<run_name>, sweeps/<run_name>); use letters, digits, '-', '_' and single dots")
    return text


# conf/config.yaml places Hydra's run and sweep dirs through this resolver, so a bad name stops before Hydra
# makes any directory for it.
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", check_run_name)
