"""A resume continues the same run or refuses; overwrite=true starts afresh and keeps the earlier attempt."""
import json
import shutil

import pytest

from conftest import compose_cfg
from flare_exp.io import read_jsonl
from flare_exp.main import run
from flare_exp.run.fingerprint import RunSettingsChangedError, differences, settings_of


def _infer(base_overrides, run_dir, *extra):
    return run(compose_cfg(["stage=infer", *base_overrides, "infer.max_new_tokens=4", "infer.batch_size=3",
                            *extra]), run_dir=run_dir)


def _interrupted(run_dir):
    """What a kill -9 leaves: outputs so far, no DONE (and no FAILED: the process had no time to write it)."""
    (run_dir / "DONE").unlink()


def test_infer_resumed_with_another_checkpoint_refuses_then_overwrite_starts_afresh(base_overrides, sft_adapter,
                                                                                   tmp_path):
    run_dir = tmp_path / "inf"
    _infer(base_overrides, run_dir, "infer.num_samples=6")
    _interrupted(run_dir)
    with pytest.raises(RunSettingsChangedError, match=rf"infer\.checkpoint: None -> {sft_adapter}") as e:
        _infer(base_overrides, run_dir, "infer.num_samples=6", f"infer.checkpoint={sft_adapter}")
    assert "infer.label" not in str(e.value)  # label was left to default on both: not a difference
    assert len(read_jsonl(run_dir / "predictions.jsonl")) == 6  # nothing was appended
    summary = _infer(base_overrides, run_dir, "infer.num_samples=6", f"infer.checkpoint={sft_adapter}",
                     "overwrite=true")
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert summary["generated_now"] == 6 and len(rows) == 6 and {r["model"] for r in rows} == {summary["label"]}
    earlier = run_dir / "attempts" / "01"
    assert {r["model"] for r in read_jsonl(earlier / "predictions.jsonl")} == {"base"}
    assert (earlier / "run_info.json").exists() and (earlier / "fingerprint.json").exists()


def test_a_speed_setting_may_change_on_resume_and_a_smaller_num_samples_agrees_with_the_file(base_overrides,
                                                                                            tmp_path, demo_prepared):
    run_dir = tmp_path / "inf"
    _infer(base_overrides, run_dir, "infer.num_samples=6")
    _interrupted(run_dir)
    summary = _infer(base_overrides, run_dir, "infer.num_samples=4", "infer.batch_size=2")
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert summary["samples"] == 4 == len(rows) and summary["generated_now"] == 0
    assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(demo_prepared / "val.jsonl")[:4]]
    # the killed attempt's run info is kept, not overwritten
    assert json.loads((run_dir / "attempts" / "01" / "run_info.json").read_text())["started"]


def test_sft_resumed_with_another_learning_rate_or_train_file_refuses(base_overrides, tmp_path, demo_prepared):
    run_dir = tmp_path / "sft"
    args = ["stage=sft", *base_overrides, "sft.max_steps=1", "sft.save_steps=1", "sft.eval_steps=0",
            "sft.learning_rate=1e-3"]
    run(compose_cfg(args), run_dir=run_dir)
    _interrupted(run_dir)
    shutil.rmtree(run_dir / "final")
    with pytest.raises(RunSettingsChangedError, match=r"sft\.learning_rate: 0\.001 -> 0\.005"):
        run(compose_cfg([*args, "sft.learning_rate=5e-3"]), run_dir=run_dir)
    changed = tmp_path / "train.jsonl"
    changed.write_text("".join(l + "\n" for l in (demo_prepared / "train.jsonl").read_text().splitlines()[:-1]))
    with pytest.raises(RunSettingsChangedError, match=r"sft\.train_file: .* -> .*; sft\.train_file sha256"):
        run(compose_cfg([*args, f"sft.train_file={changed}"]), run_dir=run_dir)
    assert run(compose_cfg([*args, "sft.max_steps=2"]), run_dir=run_dir)["global_step"] == 2  # a longer run is fine


def test_settings_that_do_not_decide_outputs_are_left_out():
    cfg = {"seed": 1, "data": {"root": "/r", "name": "x"}, "model": {"path": "/m", "gradient_checkpointing": True},
           "sft": {"learning_rate": 1.0, "logging_steps": 5, "max_steps": 10}}
    assert settings_of("sft", cfg) == {"seed": 1, "data.root": "/r", "model.path": "/m", "sft.learning_rate": 1.0}
    old, new = {"settings": {"a": 1}, "files": {"f": "0" * 64}}, {"settings": {"a": 2}, "files": {"f": "1" * 64}}
    assert differences(old, new) == ["a: 1 -> 2", "f sha256: 000000000000 -> 111111111111"]


def test_attempts_are_numbered_after_the_highest_one_left(tmp_path):
    from flare_exp.run.record import next_attempt_dir

    for n in ("01", "02", "03"):
        (tmp_path / "attempts" / n).mkdir(parents=True)
    shutil.rmtree(tmp_path / "attempts" / "02")  # a user cleaned up an old attempt
    assert next_attempt_dir(tmp_path).name == "04"
    assert next_attempt_dir(tmp_path / "fresh").name == "01"


def test_a_path_spelled_another_way_is_the_same_setting(base_overrides, sft_adapter, tmp_path, monkeypatch):
    """infer.checkpoint given absolute, then relative with a trailing slash, then through a link (one label on
    every row), then as its final/ adapter: one run, resumed;
    the same relative spelling from another directory names another folder: refused."""
    run_dir = tmp_path / "inf"
    _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={sft_adapter}")
    _interrupted(run_dir)
    link = tmp_path / "adapter-link"
    link.symlink_to(sft_adapter, target_is_directory=True)
    monkeypatch.chdir(sft_adapter.parent)
    _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={sft_adapter.name}/")
    _interrupted(run_dir)
    predictions = run_dir / "predictions.jsonl"
    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:2]))  # 2 left to predict
    _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={link}")
    rows = read_jsonl(predictions)
    assert len(rows) == 4 and len({r["model"] for r in rows}) == 1 and len({r["adapter"]["path"] for r in rows}) == 1
    _interrupted(run_dir)
    _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={sft_adapter / 'final'}")  # its adapter
    _interrupted(run_dir)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sft_adapter, tmp_path / sft_adapter.name)
    with pytest.raises(RunSettingsChangedError, match="infer.checkpoint: "):
        _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={sft_adapter.name}")


def test_a_record_with_a_relative_path_compares_from_the_directory_it_was_launched_in(tmp_path, monkeypatch):
    """Fingerprints recorded before paths were made absolute hold them as typed: compared from the directory
    that run started in (run_info.json), or this launch's where none was recorded; a key the record lacks reads
    (unset), not as a path."""
    from flare_exp.run.fingerprint import config_settings, recorded_fingerprint

    run_dir, project = tmp_path / "run", tmp_path / "project"
    run_dir.mkdir()
    (run_dir / "fingerprint.json").write_text(json.dumps({"settings": {"data.root": "data/raw", "data.name": "f"}}))
    new = {"settings": {"data.root": str(project / "data" / "raw"), "data.name": "f", "data.prepared_dir": "/p"}}
    monkeypatch.chdir(tmp_path)  # no launch_dir recorded: this launch's directory
    assert differences(recorded_fingerprint(run_dir), new) == [
        f"data.prepared_dir: (unset) -> /p", f"data.root: {tmp_path / 'data' / 'raw'} -> {project / 'data' / 'raw'}"]
    (run_dir / "run_info.json").write_text(json.dumps({"launch_dir": str(project)}))
    assert differences(recorded_fingerprint(run_dir), new) == ["data.prepared_dir: (unset) -> /p"]
    (run_dir / "config.yaml").write_text("data:\n  root: data/raw\n  name: f\n")  # the fallback without it
    assert config_settings("prepare", run_dir)["data.root"] == str(project / "data" / "raw")
    assert settings_of("prepare", {"data": {"root": "data/raw/", "name": "x"}})["data.root"] == str(
        tmp_path / "data" / "raw")


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_dataloader_workers_may_change_on_a_resume(stage):
    """Workers only decode images beside the GPU: a resume or a reuse may change their number."""
    cfg = {"seed": 1, stage: {"dataloader_num_workers": 2, "learning_rate": 1.0}}
    assert f"{stage}.dataloader_num_workers" not in settings_of(stage, cfg)
    assert settings_of(stage, cfg)[f"{stage}.learning_rate"] == 1.0


def test_more_dataloader_workers_than_cores_are_cut_to_the_cores(caplog):
    import os

    from transformers import TrainingArguments

    from flare_exp.training import trainer_arguments

    cores = len(os.sched_getaffinity(0))
    with caplog.at_level("WARNING", logger="flare_exp.training"):
        args = trainer_arguments({"dataloader_num_workers": 100000, "learning_rate": 1.0}, TrainingArguments)
    assert args == {"dataloader_num_workers": cores, "learning_rate": 1.0}
    assert f"this job has {cores} CPU cores" in caplog.text
    assert trainer_arguments({"dataloader_num_workers": 0}, TrainingArguments) == {"dataloader_num_workers": 0}


def test_what_a_resume_continues_from_is_listed_by_step(tmp_path):
    from flare_exp.run.fingerprint import _resumable

    for step in (12, 8, 16, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert [p.name for p in _resumable("sft", tmp_path)] == [
        "checkpoint-2", "checkpoint-8", "checkpoint-12", "checkpoint-16"]


def test_dataloader_workers_leave_sigterm_to_the_main_process(tmp_path):
    """A scheduler's SIGTERM reaches every process of the job: the Trainer's workers ignore it (the main process
    stops the run, then them), so no worker death is printed as a traceback after the stop message."""
    import signal

    import torch
    from transformers import Trainer, TrainingArguments

    from flare_exp.training import workers_ignore_sigterm

    class Disposition(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": torch.tensor([float(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)])}

    args = TrainingArguments(output_dir=str(tmp_path), dataloader_num_workers=1, per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=Disposition(),
                      data_collator=lambda rows: {"x": torch.stack([r["x"] for r in rows])})
    workers_ignore_sigterm(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["x"].eq(1).all()
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process keeps its own handling


def test_the_starting_adapters_config_is_part_of_the_inputs(base_overrides, sft_adapter, tmp_path):
    """A LoRA's rank, alpha and targets live in adapter_config.json beside its weights: an edited config is a
    changed input; a record made before configs were hashed has none to compare."""
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_adapter / "final", adapter)
    run_dir = tmp_path / "inf"
    _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={adapter}")
    _interrupted(run_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(RunSettingsChangedError, match=r"infer\.checkpoint \(adapter config\) sha256"):
        _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={adapter}")
    recorded = json.loads((run_dir / "fingerprint.json").read_text())
    recorded["files"] = {k: v for k, v in recorded["files"].items() if "adapter config" not in k}
    (run_dir / "fingerprint.json").write_text(json.dumps(recorded))
    _infer(base_overrides, run_dir, "infer.num_samples=4", f"infer.checkpoint={adapter}")


def test_resume_from_another_runs_checkpoint_is_held_to_that_runs_settings(base_overrides, tmp_path, caplog):
    """resume=<path> into another run dir continues that run under this name: made with another learning rate
    (or LoRA rank) it is refused, naming the key, before any training; with the same settings it continues and
    says from where; a run dir that records no settings cannot vouch for its checkpoint."""
    import logging

    from flare_exp.models.checkpoints import TRAINING_STATE, mark_complete
    from flare_exp.run.fingerprint import fingerprint
    from flare_exp.resume import resume_checkpoint

    def cfg(*extra):
        return compose_cfg(["stage=sft", *base_overrides, "sft.learning_rate=0.02", *extra])

    source = tmp_path / "other-sft"
    checkpoint = source / "checkpoint-30"
    checkpoint.mkdir(parents=True)
    for name in (*TRAINING_STATE, "adapter_model.safetensors"):
        (checkpoint / name).write_text("x")
    mark_complete(checkpoint)
    (source / "fingerprint.json").write_text(json.dumps(fingerprint("sft", cfg())))
    mine = tmp_path / "mine"
    for changed, key in ((("sft.learning_rate=0.01",), "sft.learning_rate: 0.02 -> 0.01"),
                         (("model.lora.r=4",), "model.lora.r: ")):
        with pytest.raises(RunSettingsChangedError, match=rf"resume={checkpoint}: .* belongs to the run in {source}, "
                                                          rf"made with other settings .*{key}"):
            resume_checkpoint(str(checkpoint), mine, "sft", cfg(*changed))
    with caplog.at_level(logging.INFO):
        assert resume_checkpoint(str(checkpoint), mine, "sft", cfg()) == str(checkpoint)
    assert f"continuing from {checkpoint}" in caplog.text
    # its train file copied elsewhere with the same bytes is the same input, as for a resume in place
    import shutil

    copy = tmp_path / "copy" / "train.jsonl"
    copy.parent.mkdir()
    shutil.copy(cfg().sft.train_file, copy)
    assert resume_checkpoint(str(checkpoint), mine, "sft", cfg(f"sft.train_file={copy}")) == str(checkpoint)
    (source / "fingerprint.json").unlink()
    with pytest.raises(RunSettingsChangedError, match="records neither fingerprint.json nor config.yaml"):
        resume_checkpoint(str(checkpoint), mine, "sft", cfg())


def test_a_moved_or_copied_adapter_or_prepared_dir_with_the_same_bytes_is_the_same_input(base_overrides, sft_adapter,
                                                                                         tmp_path):
    """A pipeline's tree copied elsewhere (its rl step starts from its own sft, now at another path), an
    archived adapter with the same bytes, a prepared dir moved: the same sha256 is the same input, so the
    training run resumes; other bytes are still refused."""
    from flare_exp.run.fingerprint import check_resume, fingerprint

    prepared = compose_cfg(base_overrides).data.prepared_dir
    copy, moved = tmp_path / "elsewhere" / "sft", tmp_path / "prepared"
    shutil.copytree(sft_adapter, copy)
    shutil.copytree(prepared, moved)
    run_dir = tmp_path / "rl"
    (run_dir / "checkpoint-1").mkdir(parents=True)
    old = compose_cfg(["stage=rl", *base_overrides, f"rl.init_from={sft_adapter}"])
    (run_dir / "fingerprint.json").write_text(json.dumps(fingerprint("rl", old)))
    new = compose_cfg(["stage=rl", *base_overrides, f"rl.init_from={copy}", f"data.prepared_dir={moved}"])
    check_resume("rl", run_dir, fingerprint("rl", new), new)
    weights = copy / "final" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights, still a readable file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rl.init_from=.*elsewhere/sft: .* is not as its training saved it"):
        check_resume("rl", run_dir, fingerprint("rl", new), new)  # final/'s own digests say so first
    (copy / "final" / "flare_exp_complete.json").unlink()  # an adapter saved without them: the fingerprint says it
    with pytest.raises(RunSettingsChangedError, match=r"rl.init_from: .* -> .*elsewhere/sft/final"):
        check_resume("rl", run_dir, fingerprint("rl", new), new)


def test_a_copied_pipelines_infer_step_is_reused_where_its_label_is_the_same(base_overrides, sft_adapter, tmp_path):
    """infer labels its rows by the adapter's path (<run>/<step>): a pipeline tree copied elsewhere keeps those
    names and bytes, so its finished infer step is reused; the same bytes under another run's name are not."""
    from flare_exp.run.fingerprint import finished_differences, fingerprint

    for where in ("a/runs/demo", "b/runs/demo", "c/runs/other"):
        shutil.copytree(sft_adapter, tmp_path / where / "sft")
    run_dir = tmp_path / "a" / "runs" / "demo" / "infer"
    run_dir.mkdir()
    old = compose_cfg(["stage=infer", *base_overrides, f"infer.checkpoint={tmp_path / 'a/runs/demo/sft'}"])
    (run_dir / "fingerprint.json").write_text(json.dumps(fingerprint("infer", old)))
    copied = compose_cfg(["stage=infer", *base_overrides, f"infer.checkpoint={tmp_path / 'b/runs/demo/sft'}"])
    assert finished_differences("infer", run_dir, copied) == []
    other = compose_cfg(["stage=infer", *base_overrides, f"infer.checkpoint={tmp_path / 'c/runs/other/sft'}"])
    assert [c.split(":")[0] for c in finished_differences("infer", run_dir, other)] == ["infer.checkpoint"]


def test_resume_from_a_checkpoint_of_another_stage_says_so(base_overrides, tmp_path):
    """An sft run's checkpoint given to rl as resume=: named as the sft run's, with the way to start from it."""
    from flare_exp.models.checkpoints import TRAINING_STATE, mark_complete
    from flare_exp.run.fingerprint import fingerprint
    from flare_exp.resume import resume_checkpoint

    source = tmp_path / "an-sft"
    checkpoint = source / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    for name in TRAINING_STATE:
        (checkpoint / name).write_text("x")
    mark_complete(checkpoint)
    (source / "fingerprint.json").write_text(json.dumps(fingerprint("sft", compose_cfg(["stage=sft", *base_overrides]))))
    with pytest.raises(RunSettingsChangedError, match=r"is a checkpoint of the sft run in .*, not of a rl run: .* "
                                                      r"rl.init_from="):
        resume_checkpoint(str(checkpoint), tmp_path / "rl", "rl", compose_cfg(["stage=rl", *base_overrides]))


def test_a_finished_step_without_its_fingerprint_is_not_reused_blind(base_overrides, tmp_path):
    """fingerprint.json deleted by hand: config.yaml still names the input files, but not what they held, so an
    edit of one since could not be seen: the step is not reused, and the refusal names the missing file."""
    from flare_exp.io import write_jsonl
    from flare_exp.run.fingerprint import finished_differences

    preds = tmp_path / "p.jsonl"
    write_jsonl(preds, [{"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                         "prediction": "A", "model": "m"}])
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false"])
    run(cfg, run_dir=tmp_path / "eval")
    assert finished_differences("eval", tmp_path / "eval", cfg) == []
    (tmp_path / "eval" / "fingerprint.json").unlink()
    assert finished_differences("eval", tmp_path / "eval", cfg) == [
        "fingerprint.json: missing (deleted?), so the contents of eval.predictions[0] it was made from cannot be "
        "compared"]


def test_an_eval_resumed_with_another_judge_in_the_same_folder_refuses(base_overrides, tmp_path):
    """A GREEN judge re-downloaded or fine-tuned into its folder between a killed eval and its rerun: the path
    was the same, so the journal's judgments of the first judge were reused beside the second's (one number
    from two judges). The folder's contents are part of the inputs: the rerun refuses, naming the key."""
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm
    from flare_exp.io import model_dir_digest, write_jsonl

    judge = build_tiny_causal_lm(tmp_path / "judge")
    before = model_dir_digest(judge)
    preds = tmp_path / "p.jsonl"
    write_jsonl(preds, [{"id": "IU_XRay/1", "dataset": "IU_XRay", "task_type": "report_generation",
                         "answer": "No effusion.", "prediction": "Normal.", "model": "m", "split": "val"}])
    args = ["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false",
            f"eval.green.model_path={judge}", "eval.green.dtype=float32", "eval.green.max_new_tokens=4",
            f"data.prepared_dir={tmp_path / 'hand_made'}"]  # rows of no prepared split
    run(compose_cfg(args), run_dir=tmp_path / "eval")
    _interrupted(tmp_path / "eval")
    shutil.rmtree(judge)
    build_tiny_causal_lm(judge, seed=1)  # another judge, the same shapes, names and sizes
    assert model_dir_digest(judge) != before
    with pytest.raises(RunSettingsChangedError, match=r"eval.green.model_path \(contents\) sha256"):
        run(compose_cfg(args), run_dir=tmp_path / "eval")


def test_an_adapters_config_has_one_order_of_its_target_modules(sft_adapter, tmp_path):
    """PEFT writes target_modules in a Python set's order (the hash seed's): the same adapter trained twice had two
    config sha256s, and a stage starting from it was refused as started from another adapter. Saved sorted."""
    from flare_exp.io import file_fingerprint
    from flare_exp.models.checkpoints import sort_adapter_config

    saved = json.loads((sft_adapter / "final" / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(saved["target_modules"]) and len(saved["target_modules"]) > 1
    digests = []
    for order in (["v_proj", "q_proj", "o_proj"], ["o_proj", "v_proj", "q_proj"]):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**saved, "target_modules": order}))
        sort_adapter_config(tmp_path / "a")
        digests.append(file_fingerprint(tmp_path / "a" / "adapter_config.json")["sha256"])
    assert digests[0] == digests[1]


def test_a_requeued_slurm_job_with_overwrite_continues_its_own_attempt(base_overrides, tmp_path, monkeypatch):
    """overwrite=true in a SLURM job's command: a preempted and requeued job must not move its own unfinished work
    to attempts/ (nor redo a pipeline step it finished) at every requeue; another job's attempt still moves."""
    from flare_exp.io import write_jsonl
    from flare_exp.run.layout import DONE
    from flare_exp.run.lifecycle import reusable, start_attempt

    preds = tmp_path / "p.jsonl"
    write_jsonl(preds, [{"id": "d/1", "dataset": "dental", "task_type": "classification", "answer": "A",
                         "prediction": "A", "model": "m"}])
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false",
                       "overwrite=true"])
    run_dir = tmp_path / "eval"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    start_attempt("eval", cfg, run_dir)  # the job's first start
    assert json.loads((run_dir / "run_info.json").read_text())["slurm_job_id"] == "77"
    (run_dir / "work.jsonl").write_text("done so far\n")
    start_attempt("eval", cfg, run_dir)  # requeued: its own unfinished attempt goes on where it is
    assert (run_dir / "work.jsonl").exists()
    (run_dir / DONE).write_text("{}")
    assert reusable("eval", cfg, run_dir)  # finished by this job before the requeue: kept
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job with overwrite=true: redoes it
    assert not reusable("eval", cfg, run_dir)
    start_attempt("eval", cfg, run_dir)
    assert not (run_dir / "work.jsonl").exists()
    assert [p.name for p in (run_dir / "attempts").glob("*/work.jsonl")]
