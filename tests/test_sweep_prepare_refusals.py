"""stage=prepare sweeps refused before any job where their jobs would be refused one by one after the launch: a
prepared dir shared with a pipeline's prepare step, one an earlier run finished."""
import os
import subprocess
import sys

from conftest import REPO, compose_cfg

from flare_exp import sweep_checks


def _target(*overrides):
    return sweep_checks.prepare_target(compose_cfg(["data.prepared_dir=/tmp/one", *overrides]))


def test_a_prepare_job_sharing_its_dir_with_a_pipelines_prepare_step_is_named_once():
    """stage=prepare,pipeline into one data.prepared_dir: the jobs raced for its lock, or the stage=prepare job was
    refused as finished once the pipeline's step finished it. Now one line names them all, which does what, and
    the way out; the pipelines among them are not named a second time by shared_prepare_conflicts."""
    prepare, pipeline = _target("stage=prepare"), _target("stage=pipeline", "stage.steps=[prepare,sft]")
    (line,) = sweep_checks.shared_prepare_runs([prepare, pipeline], ["stage=prepare", "stage=pipeline"], 0)
    assert line.startswith("  jobs #0 (stage=prepare) and #1 (stage=pipeline) would each prepare data into one "
                           "data.prepared_dir=/tmp/one (stage=prepare: #0; a pipeline's prepare step: #1)"), line
    assert "drop stage=prepare from the sweep" in line and "give each job its own data.prepared_dir" in line
    other = _target("stage=pipeline", "stage.steps=[prepare,sft]", "data.datasets=[IU_XRay]")
    (line,) = sweep_checks.shared_prepare_runs([prepare, pipeline, other], ["a", "b", "c"], 0)
    assert "different data (data.datasets: " in line and "drop stage=prepare" not in line
    assert sweep_checks.shared_prepare_conflicts([prepare, pipeline, other], first_idx=0) == []  # said once
    assert sweep_checks.shared_prepare_runs([pipeline, other], ["b", "c"], 0) == []  # pipelines: conflicts'
    assert sweep_checks.shared_prepare_runs([_target("stage=prepare", "data.prepared_dir=/tmp/two"), pipeline],
                                            ["a", "b"], 0) == []


def test_a_prepare_job_into_a_dir_an_earlier_run_finished_is_refused_before_the_launch(demo_prepared, tmp_path):
    """A prepare sweep under a new run_name into the dir an earlier prepare finished with the same deciding
    settings: every job launched and was refused at its start (RunFinishedError) one by one. Now dir_refusal
    says it, with what to pass; a job whose own dir is finished too (the same sweep launched again) keeps it."""
    from flare_exp.run.layout import DONE

    cfg = compose_cfg(["stage=prepare", f"paths.cache_dir={demo_prepared.parent.parent}",
                       f"paths.output_root={tmp_path / 'out'}", f"data.prepared_dir={demo_prepared}", "seed=7"])
    where, why = sweep_checks.dir_refusal(cfg, tmp_path / "0")
    assert where == str(demo_prepared)
    assert why.startswith(f"{demo_prepared} already holds a finished prepare run made with these settings"), why
    assert "pass overwrite=true" in why.lower() and "another data.prepared_dir=" in why
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / DONE).write_text("{}")
    assert sweep_checks.dir_refusal(cfg, tmp_path / "0") is None
    assert sweep_checks.kept_run(cfg, tmp_path / "0")
    other = compose_cfg(["stage=prepare", f"paths.cache_dir={demo_prepared.parent.parent}",
                         f"data.prepared_dir={demo_prepared}", "data.datasets=[IU_XRay]"])
    _, why = sweep_checks.dir_refusal(other, tmp_path / "1")
    assert "made with other settings" in why and "Choose another data.prepared_dir= to keep both" in why, why
    assert "run_name" not in why  # prepare writes there whatever the run_name


def test_a_prepare_and_pipeline_sweep_into_one_dir_launches_no_job(session_dir, tmp_path):
    """The whole launch: refused before any job (exit 2), the shared dir said once."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "launch.py", "-m", f"paths.output_root={out}",
                           f"paths.cache_dir={session_dir / 'cache'}", "run_name=mix", "stage=prepare,pipeline",
                           "stage.steps=[prepare]", f"data.prepared_dir={tmp_path / 'prepared'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "would write over each other's prepared data; no job was launched" in proc.stderr
    assert proc.stderr.count(f"data.prepared_dir={tmp_path / 'prepared'}") == 1, proc.stderr[-3000:]
    assert not out.exists() and not (tmp_path / "prepared").exists()
