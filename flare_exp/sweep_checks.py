"""A sweep's jobs checked before any is launched (flare_exp/sweep_watch.py runs the rest of the watch):

- each job's settings, with the same checks a single run makes (flare_exp.checks.setting_problems /
  input_problems);
- each job's dir: one that holds a run (finished, or unfinished to resume) made with other deciding settings
  would refuse the job at its start;
- jobs that would prepare different data into one data.prepared_dir, and stage=prepare jobs sharing one.

All problems reported together, nothing launched, the sweep dir's multirun.yaml put back as it was
(``sweep_dir.SweepRecord``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from flare_exp.sweep_launch import job_names, override_pairs
from flare_exp.sweep_watch import say


class SweepSettingsError(ValueError):
    """Some job of a sweep has settings a run would refuse; no job was launched."""


def job_config(hydra_context, master_config, overrides) -> tuple:
    """(the config one job's task function gets: the sweep's config with the job's overrides, without the hydra
    node, composed the way the job will compose it; the keys its user's group files set -> the file)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = hydra_context.config_loader.load_sweep_config(master_config, list(overrides))
    HydraConfig.instance().set_config(cfg)  # what ${hydra:...} interpolations read while the checks resolve keys
    files = job_files(hydra_context, cfg, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, files


def job_files(hydra_context, cfg, overrides) -> dict:
    """The keys the user's own group files set in this job's composition -> the file (config_dirs.users_files),
    found as a single run's check finds them, in the dirs Hydra composed the job from (conf/, --config-dir,
    hydra.searchpath)."""
    from flare_exp.config_dirs import composed_dirs, entry_dir, users_files
    from flare_exp.config_keys import group_file_values

    entries = hydra_context.config_loader.get_search_path().get_path()
    conf_dir = next((entry_dir(e.path) for e in entries if e.provider == "main"), None)
    if conf_dir is None:
        return {}
    dirs = composed_dirs([d for e in entries if (d := entry_dir(e.path))], cfg)
    values = group_file_values(dirs, dict(cfg.hydra.runtime.choices))
    return users_files(values, list(overrides), conf_dir)


@contextmanager
def composed(hydra_context, master_config, overrides):
    """One job's config and its user's files (``job_config``), Hydra's own config put back afterwards."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    try:
        yield job_config(hydra_context, master_config, overrides)
    finally:
        HydraConfig.instance().cfg = saved


def job_problems(hydra_context, master_config, overrides) -> list[str]:
    """The problems a run with these overrides would stop on (settings and input paths), as text."""
    return checked_job(hydra_context, master_config, overrides)[0]


def checked_job(hydra_context, master_config, overrides, job_dir: Path | None = None) -> tuple:
    """One job's config composed once, and from it: (its problems as text, where it prepares data and with what
    settings (``prepare_target``; None when it does not compose), and, given its ``job_dir`` and no problems,
    ``dir_refusal`` and whether the dir's finished run is kept (``kept_run``))."""
    from flare_exp.checks import input_problems, named_with_files, setting_problems

    target = refusal = None
    kept = False
    try:
        with composed(hydra_context, master_config, overrides) as (cfg, files):
            target = prepare_target(cfg)
            # a value the job's own group file set is named with that file, as a single run names it
            problems = [str(p) for p in named_with_files(setting_problems(cfg) + input_problems(cfg), files)]
            if job_dir is not None and not problems:
                refusal = dir_refusal(cfg, job_dir)
                kept = refusal is None and kept_run(cfg, job_dir)
    except Exception as e:  # an override Hydra cannot compose (a wrong key or value)
        problems = [f"{type(e).__name__}: {e}"]
    return problems, target, refusal, kept


def kept_run(cfg, job_dir: Path) -> bool:
    """The job's dir holds a run finished with these settings (other ones are a ``dir_refusal``), which the job
    keeps: it stops at its start as finished, and the sweep counts it done (sweep_watch.record_results)."""
    from flare_exp.run.layout import DONE
    from flare_exp.run.stage import stage

    return not cfg.overwrite and stage(cfg.stage.name).record != "none" and (job_dir / DONE).exists()


def kept_name(job_dir: Path, overrides, name: str) -> str:
    """A kept job's name, with the overrides its run was made with where they differ from this launch's (a
    setting that decides nothing, which the checks let pass): its line tells what the kept run is."""
    import yaml
    from hydra.core.utils import filter_overrides

    from flare_exp.run.layout import HYDRA, OVERRIDES
    from flare_exp.run.record import ACCEPTED_HYDRA

    record = next((p for p in (job_dir / HYDRA / ACCEPTED_HYDRA / OVERRIDES, job_dir / HYDRA / OVERRIDES)
                   if p.is_file()), None)
    try:
        made = override_pairs(filter_overrides(yaml.safe_load(record.read_text()) or [])) if record else None
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        made = None
    if made is None:
        return name
    asked = override_pairs(filter_overrides(list(overrides)))
    differ = [k for k in dict.fromkeys([*made, *asked]) if made.get(k) != asked.get(k)]
    said = ", ".join(f"{k}={made[k]}" if k in made else f"{k} at its default" for k in differ)
    return f"{name}; the kept run was made with {said}" if differ else name


def dir_refusal(cfg, job_dir: Path) -> tuple[str, str] | None:
    """(the run dir, why) this job would be refused at its start in ``job_dir``, the way the run itself refuses
    (a finished or unfinished run there made with other deciding settings or inputs): the job's own dir, or one
    several jobs share (a pipeline's data.prepared_dir); None when it would not."""
    from flare_exp.run.fingerprint import RunSettingsChangedError
    from flare_exp.run.record import RunFinishedError

    try:
        for stage, stage_cfg, run_dir in runs_started(cfg, job_dir):
            try:
                refuse_other_settings(stage, stage_cfg, run_dir)
                refuse_finished_elsewhere(stage, run_dir, job_dir)
            except (RunSettingsChangedError, RunFinishedError) as e:
                e.run_dir = run_dir
                raise
    except (RunSettingsChangedError, RunFinishedError) as e:
        return str(getattr(e, "run_dir", job_dir)), " ".join(str(e).split())
    except Exception:  # noqa: BLE001  (anything else: the job itself says it, as it would have)
        return None
    return None


def runs_started(cfg, job_dir: Path) -> list[tuple]:
    """(stage, its config, its run dir) of the run this job starts in its dir: the stage's own, or a pipeline's
    first step that is not reused (a finished step these settings would have to redo raises, as the pipeline
    does before it starts, its dir in the error's ``run_dir``). Empty with overwrite=true (the earlier run moves
    to attempts/NN/)."""
    from flare_exp.run.fingerprint import RunSettingsChangedError
    from flare_exp.run.lifecycle import reusable
    from flare_exp.run.stage import stage as stage_named

    declared = stage_named(cfg.stage.name)
    if cfg.overwrite or declared.record == "none":
        return []
    out_dir = declared.output_dir(cfg, job_dir)
    if declared.record == "attempt":
        return [(declared.name, cfg, out_dir)]
    if declared.name != "pipeline":
        return []
    pipeline = declared.runner()  # the stage registry loads it: nothing outside the stages imports one

    pipeline.check_steps(cfg)
    for _, step, step_cfg, step_dir in pipeline.planned_steps(cfg, out_dir):
        try:
            if not reusable(step, step_cfg, step_dir):
                return [(step, step_cfg, step_dir)]
        except RunSettingsChangedError as e:
            e.run_dir = step_dir
            raise
    return []


def refuse_other_settings(stage: str, cfg, run_dir: Path) -> None:
    """RunSettingsChangedError when ``run_dir`` holds a finished run of ``stage`` made with other deciding
    settings or inputs, or an unfinished one a resume would mix with this one (fingerprint.check_resume) or that
    resume=never would refuse (its checkpoints: said before the job loads a model, not after)."""
    from flare_exp.run.fingerprint import (RunSettingsChangedError, check_resume, finished_differences,
                                           fingerprint, listed)
    from flare_exp.run.layout import DONE
    from flare_exp.run.lifecycle import dir_setting
    from flare_exp.run.record import attempt_files
    from flare_exp.run.stage import stage as stage_named

    if not (run_dir / DONE).exists():
        if attempt_files(run_dir):  # an empty or new dir: nothing to compare (nor input files to hash)
            check_resume(stage, run_dir, fingerprint(stage, cfg), cfg)
            stage_named(stage).refuse_resume_never(cfg, run_dir)
        return
    changed = finished_differences(stage, run_dir, cfg)
    if changed:
        raise RunSettingsChangedError(
            f"{run_dir} holds a finished {stage} run made with other settings or inputs: {listed(changed)}. "
            f"Choose another {dir_setting(stage)}= to keep both, or pass overwrite=true to redo it there (the "
            "finished run moves to attempts/NN/).")


def refuse_finished_elsewhere(stage: str, run_dir: Path, job_dir: Path) -> None:
    """RunFinishedError when the job's outputs go outside its own dir (stage=prepare: data.prepared_dir) and a
    run finished there with these very settings: the job's start refuses it as finished (lifecycle.start_attempt),
    one job after another once the sweep launched. A job whose own dir is finished too is kept instead (a sweep
    launched again: kept_run)."""
    from flare_exp.run.layout import DONE
    from flare_exp.run.lifecycle import dir_setting
    from flare_exp.run.record import RunFinishedError

    if run_dir != job_dir and (run_dir / DONE).exists() and not (job_dir / DONE).exists():
        raise RunFinishedError(
            f"{run_dir} already holds a finished {stage} run made with these settings ({DONE} marker present). Pass "
            f"overwrite=true to redo it there (the finished run moves to attempts/NN/), or choose another "
            f"{dir_setting(stage)}= ({stage} writes there, whatever the run_name); the later stages read it as it is.")


def prepare_target(cfg) -> tuple | None:
    """(the data.prepared_dir a job's prepare step writes, its deciding settings, whether it is a stage=prepare
    run: a pipeline's step reuses a finished prepare instead), None when it prepares none."""
    from omegaconf import OmegaConf

    from flare_exp.checks import steps_of
    from flare_exp.run.fingerprint import settings_of
    from flare_exp.runtime import abspath

    if "prepare" not in steps_of(cfg):
        return None
    return (abspath(cfg.data.prepared_dir).resolve(), settings_of("prepare", OmegaConf.to_container(cfg, resolve=True)),
            cfg.stage.name == "prepare")


# not "sweep data.prepared_dir alongside": a grid's product of it and the swept key shares each dir again
OWN_DIR = ("give each job its own data.prepared_dir (one that names a key the sweep varies: "
           "'data.prepared_dir=DIR/${KEY}')")


def shared_prepare_conflicts(targets: list, first_idx: int) -> list[str]:
    """Pipeline jobs that would prepare different data into one data.prepared_dir: the later one would stop at its
    start (the dir holds the first one's data, made with other settings), after the sweep launched."""
    from flare_exp.run.fingerprint import differences

    by_prepare = prepare_groups(targets)  # shared_prepare_runs names those dirs' jobs
    seen, out = {}, []
    for idx, target in enumerate(targets):
        if target is None or target[0] in by_prepare:
            continue
        where, settings, _ = target
        if where not in seen:
            seen[where] = (idx, settings)
            continue
        changed = differences({"settings": seen[where][1]}, {"settings": settings})
        if changed:
            out.append(f"  jobs #{first_idx + seen[where][0]} and #{first_idx + idx} would prepare different data "
                       f"into one data.prepared_dir={where} ({'; '.join(changed[:4])}): {OWN_DIR}")
    return out


def shared_prepare_runs(targets: list, names: list[str], first_idx: int, held: dict | None = None) -> list[str]:
    """A stage=prepare job that would write one data.prepared_dir with other jobs (stage=prepare ones, or a
    pipeline's prepare step): the first to finish leaves it DONE and the stage=prepare ones after it are refused at
    their start as finished runs, or two at once race for its lock, one by one after the sweep launched (pipelines
    alone reuse the dir instead: shared_prepare_conflicts). Said before any job, with the overrides that tell the
    jobs apart (``names``: job_names) and, where the dir already holds a run that refuses them (``held``: the
    dir -> [(job, why)], check_jobs' refusals), what is there."""
    out = []
    for where, jobs in prepare_groups(targets).items():
        runs = [i for i in jobs if targets[i][2]]
        named = joined([f"#{first_idx + i} ({names[i]})" for i in jobs])
        if runs == jobs:
            said = (f"  jobs {named} would each run stage=prepare into one data.prepared_dir={where}, where the first "
                    "to start refuses the others (its lock while it runs, its DONE once finished)")
        else:
            steps = joined([f"#{first_idx + i}" for i in jobs if i not in runs])
            said = (f"  jobs {named} would each prepare data into one data.prepared_dir={where} (stage=prepare: "
                    f"{joined([f'#{first_idx + i}' for i in runs])}; a pipeline's prepare step: {steps}), where "
                    "two at once race for its lock and a stage=prepare job refuses to start once another's "
                    "prepare finished there")
        there = next((jobs for held_dir, jobs in (held or {}).items() if Path(held_dir).resolve() == where), [])
        whys = list(dict.fromkeys(why for _, why in there))
        already = [f"\n    - {whys[0]}"] if len(whys) == 1 else [f"\n    - job {job}: {why}" for job, why in there]
        out.append(f"{said}; {shared_fix(targets, jobs, runs)}{''.join(already)}")
    return out


def prepare_groups(targets: list) -> dict:
    """data.prepared_dir -> the jobs that prepare into it, for each dir a stage=prepare job shares with another."""
    shared: dict = {}
    for idx, target in enumerate(targets):
        if target is not None:
            shared.setdefault(target[0], []).append(idx)
    return {where: jobs for where, jobs in shared.items() if len(jobs) > 1 and any(targets[i][2] for i in jobs)}


def shared_fix(targets: list, jobs: list[int], runs: list[int]) -> str:
    """What to change for jobs preparing into one dir: their own dirs, or one prepare where the data is the same."""
    from flare_exp.run.fingerprint import differences

    first = {"settings": targets[jobs[0]][1]}
    changed = list(dict.fromkeys(c for i in jobs[1:] for c in differences(first, {"settings": targets[i][1]})))
    if changed:
        return f"they would prepare different data ({'; '.join(changed[:4])}): {OWN_DIR}"
    if runs == jobs:
        return f"they would prepare the same data: drop the sweep (one prepare serves them all), or {OWN_DIR}"
    return ("they would prepare the same data: drop stage=prepare from the sweep (a pipeline's prepare step "
            f"prepares it, the pipelines after it reuse it), or {OWN_DIR}")


def joined(items: list[str]) -> str:
    """'a, b and c'."""
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)


def check_jobs(hydra_context, master_config, job_overrides, initial_job_idx: int,
               job_dirs: list[Path]) -> dict[int, str]:
    """Every job's problems, or a SweepSettingsError naming each job and its problems (a run dir several jobs
    share, refusing them all, said once with the jobs that share it); ``job_dirs``: each job's dir
    (sweep_dir.job_dirs). Returns the jobs whose dir holds a run they keep (their index in ``job_overrides`` ->
    their ``kept_name``), for the watch to say before the others run."""
    say(f"checking the settings of {len(job_overrides)} job(s) before launching any")
    bad, prepares, refused, kept = [], [], {}, {}
    names = job_names(job_overrides)
    for idx, overrides in enumerate(job_overrides):
        # absolute, as each job's own output dir is (Hydra's runtime): the paths derived from it (a pipeline's
        # steps feed on each other's dirs) are compared with those the jobs recorded
        job_dir = Path(os.path.abspath(job_dirs[idx]))
        problems, target, refusal, keeps = checked_job(hydra_context, master_config, overrides, job_dir)
        prepares.append(target)
        if keeps:
            kept[idx] = kept_name(job_dir, overrides, names[idx])
        if problems:
            bad.append(f"  job #{initial_job_idx + idx} ({names[idx]}):\n"
                       + "\n".join(f"    - {p}" for p in problems))
        elif refusal:
            where, why = refusal
            refused.setdefault(where, []).append((f"#{initial_job_idx + idx} ({names[idx]})", why))
    clashes = [*shared_prepare_conflicts(prepares, initial_job_idx),
               *shared_prepare_runs(prepares, names, initial_job_idx, held=refused)]
    for where in [w for w in refused if Path(w).resolve() in prepare_groups(prepares)]:
        del refused[where]  # said once, in shared_prepare_runs' line naming the jobs that share it
    if bad or clashes or refused:
        total = len(job_overrides)
        of = "of this batch" if initial_job_idx else "of the sweep"
        said = [f"{len(bad)} of {total} jobs {of} have settings a run would refuse"] if bad else []
        said += held_headline(refused, total)
        said += ["jobs of the sweep would write over each other's prepared data"] if clashes else []
        launched = ("no job was launched" if not initial_job_idx else  # hydra.sweeper.max_batch_size: by batch
                    f"no job of this batch (#{initial_job_idx}-#{initial_job_idx + total - 1}) was launched; the "
                    f"{initial_job_idx} job(s) of the batches before it ran (a sweep run in batches, "
                    "hydra.sweeper.max_batch_size or a search's, checks each batch as it comes)")
        raise SweepSettingsError(" and ".join(said) + f"; {launched}:\n"
                                 + "\n".join(bad + held_lines(refused) + clashes))
    return kept


def held_headline(refused: dict, total: int) -> list[str]:
    """The refused jobs counted: each in its own dir, and the dirs several jobs share (``refused``: run dir ->
    [(job, why)])."""
    own = sum(1 for jobs in refused.values() if len(jobs) == 1)
    shared = [len(jobs) for jobs in refused.values() if len(jobs) > 1]
    said = [f"the dirs of {own} of {total} jobs hold runs"] if own else []
    if len(shared) == 1:
        said.append(f"one dir shared by {shared[0]} of {total} jobs holds a run")
    elif shared:
        said.append(f"{len(shared)} dirs, each shared by several jobs ({sum(shared)} of {total}), hold runs")
    # other deciding settings, or checkpoints under resume=never: each job's line says which
    return [" and ".join(said) + " that would refuse them"] if said else []


def held_lines(refused: dict) -> list[str]:
    """A line per refused job in a dir of its own; one per shared dir, naming the jobs that share it and why it
    refuses them (said once when it is the same for all)."""
    out = []
    for where, jobs in refused.items():
        if len(jobs) == 1:
            out.append(f"  job {jobs[0][0]}: {jobs[0][1]}")
            continue
        named = joined([job for job, _ in jobs])
        whys = list(dict.fromkeys(why for _, why in jobs))
        if len(whys) == 1:
            out.append(f"  jobs {named} share {where}: {whys[0]}")
        else:
            out.append(f"  jobs {named} share {where}:\n" + "\n".join(f"    - job {job}: {why}" for job, why in jobs))
    return out
