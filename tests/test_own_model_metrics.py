"""A pipeline's eval scores stage.compare's models (base, the sft it starts from) beside its own, in one
metrics.json, the compared ones first: every reader of "the job's number" takes its own model's block. An Optuna
trial with stage.compare=[base] recorded base's number as the trial's objective, and the sweep table ranked the
jobs by it."""
import json

from hydra.core.utils import JobReturn, JobStatus

from flare_exp.catalog import headline, own_block
from flare_exp.optuna_search import job_metrics
from flare_exp.reports.sweep_jobs import official_metrics
from flare_exp.sweep_watch import Progress


def _block(job, step, f1):
    return {"file": str(job / step / "predictions.jsonl"), "official": {"multi_label": {"f1_score": f1}},
            "by_task": {"multi_label": {"f1_score": f1}}}


def _trial(tmp_path, order):
    job = tmp_path / "sweep" / "0"
    (job / "eval").mkdir(parents=True, exist_ok=True)
    blocks = {"base": _block(job, "infer-base", 0.1), "0/rl": _block(job, "infer", 0.7)}
    (job / "eval" / "metrics.json").write_text(json.dumps({k: blocks[k] for k in order}))
    (job / "eval" / "DONE").write_text("")
    (job / "DONE").write_text("")
    return job


def test_every_reader_takes_the_jobs_own_model_not_a_compared_one(tmp_path):
    for order in (["base", "0/rl"], ["0/rl", "base"]):  # compared first (as a pipeline writes), and the reverse
        job = _trial(tmp_path, order)
        ret = JobReturn(status=JobStatus.COMPLETED, _return_value={"steps": {"eval": str(job / "eval")}})
        metrics, why = job_metrics(ret)
        assert why is None and metrics["official"]["multi_label"]["f1_score"] == 0.7
        kept = JobReturn(status=JobStatus.COMPLETED, _return_value={"kept": str(job),
                                                                     "metrics": str(job / "eval" / "metrics.json")})
        assert job_metrics(kept)[0]["official"]["multi_label"]["f1_score"] == 0.7
        assert official_metrics(job) == {"official/multi_label/f1_score": 0.7}
        assert headline(job) == "multi_label.f1_score=0.7000"
        progress = Progress([job], ["job"], objectives=["multi_label.f1_score", "classification.balanced_accuracy"])
        assert progress.objective_values(0) == "multi_label.f1_score=0.7000, classification.balanced_accuracy=n/a"
    # an eval run of inputs given by hand: the last given
    assert own_block({"a": {"file": "/x/a.jsonl"}, "b": {"file": "/x/b.jsonl"}}, tmp_path / "an-eval")["file"] == \
        "/x/b.jsonl"
    assert own_block({}) == {}


def test_a_killed_evals_number_is_said_unfinished_in_the_runs_table(tmp_path):
    job = _trial(tmp_path, ["base", "0/rl"])
    (job / "eval" / "DONE").unlink()  # killed after metrics.json was written
    assert headline(job) == "multi_label.f1_score=0.7000 (its eval unfinished)"


def test_an_eval_of_several_models_names_the_one_its_headline_shows(tmp_path):
    run = tmp_path / "an-eval"
    run.mkdir()
    blocks = {"base": _block(tmp_path / "b", "infer", 0.1), "sft": _block(tmp_path / "s", "infer", 0.7)}
    (run / "metrics.json").write_text(json.dumps(blocks))
    (run / "DONE").write_text("")
    assert headline(run) == "multi_label.f1_score=0.7000 (of sft, the last of 2 models scored)"
    (run / "metrics.json").write_text(json.dumps({"sft": blocks["sft"]}))
    assert headline(run) == "multi_label.f1_score=0.7000"  # one model: nothing to name
