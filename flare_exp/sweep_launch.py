"""A sweep's launch as its report needs it: which jobs the latest launch into a sweep dir made (a relaunch with
overwrite=true and a smaller grid, or other fixed settings, leaves the earlier launch's other jobs beside them),
recorded by the launcher once the jobs' checks pass (``.launch.json``: job number -> its overrides); and the
overrides as Hydra reads them, so two spellings of one setting are one."""
from __future__ import annotations

from pathlib import Path

LAUNCH_FILE = ".launch.json"


def record_launch(sweep_dir: Path, job_overrides, initial_job_idx: int, first: bool, kept=(),
                  job_dirs: list[Path] | None = None) -> None:
    """The jobs this launch makes (its first batch: the record started afresh; a later batch of the same sweep:
    added to it), by job number (hydra.job.num): each one's overrides, whether its dir's finished run is kept
    (``kept``: their indices in ``job_overrides``) and its dir (``job_dirs``), relative to the sweep dir."""
    import json

    from flare_exp.io import write_json

    jobs = {}
    if not first:
        try:
            jobs = json.loads((sweep_dir / LAUNCH_FILE).read_text())["jobs"]
        except (OSError, ValueError, KeyError, TypeError):
            jobs = {}
    where = [_relative(d, sweep_dir) for d in job_dirs] if job_dirs is not None else [None] * len(job_overrides)
    jobs.update({str(initial_job_idx + i): {"overrides": list(map(str, o)), "kept": i in kept,
                                            **({"dir": where[i]} if where[i] is not None else {})}
                 for i, o in enumerate(job_overrides)})
    write_json(sweep_dir / LAUNCH_FILE, {"jobs": jobs})


def _relative(job_dir: Path, sweep_dir: Path) -> str | None:
    import os

    relative = os.path.relpath(os.path.abspath(job_dir), os.path.abspath(sweep_dir))
    return Path(relative).as_posix() if not relative.startswith("..") else None


def launched_jobs(sweep_dir: Path) -> dict[str, dict] | None:
    """Job number -> {"overrides", "kept"} of the sweep dir's latest launch; None where it has no readable record
    (a sweep of an older flare-exp, an Optuna search: its study tells its trials apart)."""
    import json

    try:
        jobs = json.loads((sweep_dir / LAUNCH_FILE).read_text())["jobs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(jobs, dict) or not all(isinstance(job, dict) for job in jobs.values()):
        return None  # edited by hand: no job is marked by it
    return jobs


def not_of_latest_launch(number: str, overrides: list, launched: dict[str, dict], job_dir: str | None = None) -> \
        str | None:
    """Why a job dir's run (its job number, its overrides.yaml, its dir relative to the sweep dir) is no run of
    the latest launch: a number it did not make, a dir other than the one it made under that number (another
    hydra.sweep.subdir, a copy), or one it was to run that still holds another launch's run (a killed relaunch
    never reached it); None where it is (run by it, or a finished run it kept)."""
    job = launched.get(str(number))
    if job is None:
        return f"not one of the latest launch's {len(launched)} job(s)"
    if job_dir is not None and isinstance(job.get("dir"), str) and job["dir"] != job_dir:
        return f"the latest launch made its job #{number} in {job['dir']}/, not here (another subdir, or a copy)"
    if job.get("kept") or override_pairs(overrides) == override_pairs(job.get("overrides") or []):
        return None
    return "the latest launch was to run this job with other settings and did not (stopped before it?)"


def override_pairs(overrides) -> dict[str, str]:
    """key -> value of each override as Hydra reads it: ``++key`` and ``key``, ``"a b"`` and ``'a b'``, ``true``
    and ``True``, ``5e-4`` and ``0.0005`` alike (a kept run spelled otherwise is no other run); an override
    Hydra's parser does not read, as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, pairs = OverridesParser.create(), {}
    for override in map(str, overrides):
        try:
            parsed = parser.parse_override(override)
        except Exception:  # noqa: BLE001  (Hydra itself says what is wrong with it)
            if "=" in override:
                key, value = override.split("=", 1)
                pairs[key] = value
            continue
        value = parsed.value()
        key = f"~{parsed.key_or_group}" if parsed.is_delete() else parsed.key_or_group
        pairs[key] = value if isinstance(value, str) else parsed.get_value_element_as_str()
    return pairs


def job_names(job_overrides) -> list[str]:
    """Each job named by the overrides that tell it from the others (the swept keys), else by its last few."""
    from hydra.core.utils import filter_overrides

    pairs = [override_pairs(filter_overrides(list(job))) for job in job_overrides]
    keys = list(dict.fromkeys(k for p in pairs for k in p))
    varying = [k for k in keys if len({p.get(k) for p in pairs}) > 1] if len(pairs) > 1 else []
    return [" ".join(f"{k}={p[k]}" for k in (varying or [k for k in p if "/" not in p[k]][-4:]) if k in p)
            or "(no overrides)" for p in pairs]
