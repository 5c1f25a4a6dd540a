"""The run dir's guarantees at their edges: its name, attempts, journals, checkpoints, strict JSON."""
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf.errors import InterpolationResolutionError

from conftest import CONF, REPO, compose_cfg
from flare_exp.checks import setting_problems


@pytest.mark.parametrize("name, why", [("../../x", "path separator"), ("a/b", "path separator"), ("..", "'..'"),
                                       ("x..y", "'..'"), ("", "empty")])
def test_a_run_name_stays_inside_the_output_root(name, why, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"run_name='{name}'", f"paths.output_root={tmp_path}"],
                      return_hydra_config=True)
    for dir_key in ("run", "sweep"):  # Hydra places its dirs through the check: nothing is made for a bad name
        with pytest.raises(InterpolationResolutionError, match=why):
            str(cfg.hydra[dir_key].dir)
    problems = setting_problems(compose_cfg([f"run_name='{name}'"]))
    assert any(f"run_name={name!r}" in str(p) and why in str(p) for p in problems)


def test_a_plain_run_name_places_the_run_dir(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["run_name=sft-v1.2_a", f"paths.output_root={tmp_path}"],
                      return_hydra_config=True)
    assert cfg.hydra.run.dir == f"{tmp_path}/runs/sft-v1.2_a"


def test_a_journal_cut_inside_a_multibyte_character_drops_its_torn_last_line(tmp_path, caplog):
    from flare_exp.io import read_journal, read_jsonl

    journal = tmp_path / "predictions.jsonl"
    whole = '{"id": "a", "prediction": "épanchement"}\n'.encode()
    cut = '{"id": "b", "prediction": "épanchement"}'.encode()
    journal.write_bytes(whole + cut[:cut.index("é".encode()) + 1])  # the first byte of the two of "é"
    assert list(read_journal(journal, "id")) == ["a"]
    assert "dropping a torn last line" in caplog.text
    assert journal.read_bytes() == whole  # rewritten: the next append starts on a line of its own
    journal.write_bytes(b'{"id": "x\xff"}\n' + whole)
    with pytest.raises(ValueError, match=r"predictions\.jsonl:1: not UTF-8 \(byte 0xff at column 10\)"):
        read_journal(journal, "id")
    with pytest.raises(ValueError, match=r"predictions\.jsonl:1: not UTF-8"):
        read_jsonl(journal)


def _strict_loads(text: str):
    """JSON as jq or JavaScript's JSON.parse reads it: bare NaN / Infinity tokens are errors."""
    import json

    def refuse(token):
        raise ValueError(f"bare {token} token")
    return json.loads(text, parse_constant=refuse)


def test_a_nan_score_ranks_last_and_every_json_we_write_is_strict(tmp_path):
    import math

    from flare_exp.io import write_json, write_jsonl
    from flare_exp.reports.sweep import table
    from flare_exp.reports.sweep_jobs import collect

    key = "official/regression/mean_absolute_error"
    for n, mae in enumerate([2.0, math.nan, 1.0, math.inf]):
        job = tmp_path / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- rl.beta={n}\n")
        (job / "DONE").write_text("{}")
        write_json(job / "eval" / "metrics.json", {"rl": {"official": {"regression": {"mean_absolute_error": mae}}}})
    parsed = _strict_loads((tmp_path / "1" / "eval" / "metrics.json").read_text())
    assert parsed["rl"]["official"]["regression"]["mean_absolute_error"] == "NaN"
    assert _strict_loads((tmp_path / "3" / "eval" / "metrics.json").read_text())["rl"]["official"]["regression"][
        "mean_absolute_error"] == "Infinity"
    header, rows = table(collect(tmp_path), key)
    by = {h: i for i, h in enumerate(header)}
    assert [(r[by["rank"]], r[by["job"]]) for r in rows] == [(1, "2"), (2, "0"), ("", "1"), ("", "3")]
    assert math.isnan(rows[2][by[key]]) and rows[3][by[key]] == math.inf  # shown as they are
    write_jsonl(tmp_path / "rows.jsonl", [{"score": -math.inf}])
    assert _strict_loads((tmp_path / "rows.jsonl").read_text()) == {"score": "-Infinity"}


def test_a_resume_takes_the_newest_complete_checkpoint_and_keeps_its_optimizer(base_overrides, tmp_path, caplog):
    import shutil

    from flare_exp.main import run
    from flare_exp.models.checkpoints import COMPLETE, list_checkpoints, mark_complete, numbered_checkpoints
    from flare_exp.resume import resume_checkpoint

    run_dir = tmp_path / "sft"
    args = ["stage=sft", *base_overrides, "sft.max_steps=2", "sft.save_steps=1", "sft.eval_steps=0"]
    run(compose_cfg(args), run_dir=run_dir)
    first, second = run_dir / "checkpoint-1", run_dir / "checkpoint-2"
    assert list_checkpoints(run_dir) == [first, second]
    (run_dir / "DONE").unlink()  # killed while saving checkpoint-2: its files written, not yet marked whole
    shutil.rmtree(run_dir / "final")
    (second / COMPLETE).unlink()
    assert resume_checkpoint("auto", run_dir) == str(first)
    filed = run_dir / "attempts" / "01"  # out of the way of this run's own step 2, said where
    assert f"skipping {second}: no {COMPLETE} (cut short while saving); moved to {filed / second.name}" in caplog.text
    (first / "trainer_state.json").write_text('{"global_st')  # torn after the fact: named, never read
    assert resume_checkpoint("auto", run_dir) is None
    assert f"skipping {first}: trainer_state.json has 11 bytes" in caplog.text
    assert (f"no complete checkpoint left in {run_dir} (1 skipped, each moved aside as said above): training starts "
            "again from step 0") in caplog.text
    assert not numbered_checkpoints(run_dir) and numbered_checkpoints(filed) == [filed / first.name, filed / second.name]
    with pytest.raises(FileNotFoundError, match=r"checkpoint-1 is not a complete Trainer checkpoint: "
                                                r"trainer_state.json has 11 bytes"):
        resume_checkpoint(str(filed / first.name), run_dir)
    (filed / second.name).rename(second)
    (second / "optimizer.pt").unlink()  # a checkpoint saved whole but without the optimizer's state
    mark_complete(second)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2/optimizer.pt is missing: resuming from checkpoint-2 "
                                                r"would go on with a fresh optimizer"):
        resume_checkpoint("auto", run_dir)
    assert second.is_dir()  # refused before anything moved


def _training_run(path, finished=True, checkpoints=()):
    (path / "final" if finished else path).mkdir(parents=True)
    (path / "run_info.json").write_text("{}")
    if finished:
        (path / "final" / "adapter_config.json").write_text("{}")
        (path / "DONE").write_text("{}")
    for step in checkpoints:
        (path / f"checkpoint-{step}").mkdir()
        (path / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    return path


def test_the_adapter_used_is_the_adapter_meant(tmp_path, capsys):
    from flare_exp.models.checkpoints import chosen_adapter, mark_complete, resolve_adapter

    pipeline = tmp_path / "pipe"
    _training_run(pipeline / "sft")
    _training_run(pipeline / "rl")
    assert resolve_adapter(pipeline) == pipeline / "rl" / "final"  # its last training step, not sft
    killed = _training_run(tmp_path / "killed", finished=False, checkpoints=(3,))  # stopped at step 3 of 6
    for path in (killed, tmp_path / "pipe2"):
        if path.name == "pipe2":
            _training_run(path / "sft")
            shutil.copytree(killed, path / "rl")  # a pipeline whose rl step did not finish: not its sft instead
        with pytest.raises(FileNotFoundError, match=r"unfinished run \(no DONE marker, no final/ adapter; "
                                                    r"checkpoints: checkpoint-3 \.\. checkpoint-3\).*"
                                                    r"allow_intermediate_checkpoint=true"):
            resolve_adapter(path)
    infer_run = tmp_path / "infer-a"  # a finished run of ours that trained nothing
    infer_run.mkdir()
    (infer_run / "run_info.json").write_text("{}")
    (infer_run / "DONE").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"infer-a is a finished run that trained nothing .* an sft or rl run"):
        resolve_adapter(infer_run)
    with pytest.raises(ValueError, match=r"infer.checkpoint=\S+checkpoint-3 is an intermediate checkpoint .* pass "
                                         r"allow_intermediate_checkpoint=true to use it on purpose"):
        chosen_adapter("infer.checkpoint", killed / "checkpoint-3", allow_intermediate=False)
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint: no flare_exp_complete.json"):
        chosen_adapter("infer.checkpoint", killed / "checkpoint-3", allow_intermediate=True)
    mark_complete(killed / "checkpoint-3")
    assert chosen_adapter("infer.checkpoint", killed / "checkpoint-3", True) == killed / "checkpoint-3"
    stopped = _training_run(tmp_path / "stopped")  # killed after final/ was saved, before DONE
    (stopped / "DONE").unlink()
    with pytest.raises(ValueError, match=r"infer.checkpoint=\S+stopped/final is the final/ adapter of an unfinished "
                                         r"run \(\S+stopped: no DONE marker; the resume may still change it\): "
                                         r"finish it"):
        chosen_adapter("infer.checkpoint", stopped / "final", allow_intermediate=False)
    shutil.copytree(stopped / "final", stopped / "best")  # sft.eval_per_task's best/ of the stopped run too
    with pytest.raises(ValueError, match=r"is the best/ adapter of an unfinished run"):
        chosen_adapter("rl.init_from", stopped / "best", allow_intermediate=False)
    assert chosen_adapter("infer.checkpoint", stopped / "final", True) == stopped / "final"
    (tmp_path / "my-adapter").symlink_to(killed / "checkpoint-3")  # a link is the checkpoint it points at
    with pytest.raises(ValueError, match=r"is an intermediate checkpoint \(checkpoint-3\)"):
        chosen_adapter("infer.checkpoint", tmp_path / "my-adapter", allow_intermediate=False)
    # named before Hydra makes the run dir (a refused rl.init_from left one with .hydra/ and launch.log only)
    sys.path.insert(0, str(REPO))
    import launch

    for key, value in (("rl.init_from", infer_run), ("infer.checkpoint", killed / "checkpoint-1"),
                       ("sft.init_from", killed)):
        (killed / "checkpoint-1").mkdir(exist_ok=True)
        stage = key.split(".")[0]
        with pytest.raises(SystemExit):
            launch.check_command_line([f"stage={stage}", f"{key}={value}", f"paths.output_root={tmp_path / 'o'}"])
        err = capsys.readouterr().err
        assert f"{key}" in err and "nothing was run or written" in err, err
    assert not (tmp_path / "o").exists()


def test_jobs_equal_on_the_ranking_metric_are_ordered_by_the_other_official_metrics(tmp_path):
    """The demo weight sweep: both jobs at balanced accuracy 0.5; the one with the better F1 (and MAE) ranks first."""
    from flare_exp.io import write_json
    from flare_exp.reports.sweep import table
    from flare_exp.reports.sweep_jobs import collect, rank_key, tie_breakers

    for n, (f1, mae) in enumerate([(0.4815, 5.0), (0.7213, 0.0)]):
        job = tmp_path / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- reward.regression.weights.numeric={n}\n")
        (job / "DONE").write_text("{}")
        write_json(job / "eval" / "metrics.json", {"rl": {"official": {
            "classification": {"balanced_accuracy": 0.5}, "multi_label": {"f1_score": f1},
            "regression": {"mean_absolute_error": mae}}}})
    jobs = collect(tmp_path)
    key = rank_key(jobs, None)
    assert key == "official/classification/balanced_accuracy"
    assert tie_breakers(jobs, key) == ["official/multi_label/f1_score", "official/regression/mean_absolute_error"]
    header, rows = table(jobs, key)
    by = {h: i for i, h in enumerate(header)}
    assert [(r[by["rank"]], r[by["job"]]) for r in rows] == [(1, "1"), (2, "0")]


def test_a_run_stopped_after_its_last_checkpoint_trains_no_step_past_max_steps(base_overrides, tmp_path):
    """Killed after checkpoint-N = max_steps was saved but before final/ and DONE: the rerun takes that
    checkpoint's weights as the end (the Trainer would train step N+1)."""
    import torch
    from safetensors.torch import load_file

    from flare_exp.main import run

    cfg = compose_cfg(["stage=sft", *base_overrides, "sft.max_steps=4", "sft.save_steps=2", "sft.eval_steps=0",
                       "sft.per_device_train_batch_size=2"])
    out = tmp_path / "sft"
    assert run(cfg, run_dir=out)["global_step"] == 4
    (out / "DONE").unlink()
    (out / "final" / "adapter_model.safetensors").unlink()  # final/ not yet written
    again = run(cfg, run_dir=out)
    assert again["global_step"] == 4 and not (out / "checkpoint-5").exists()
    final, kept = (load_file(str(d / "adapter_model.safetensors")) for d in (out / "final", out / "checkpoint-4"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)


def test_a_resume_without_its_fingerprint_is_held_to_the_settings_its_config_recorded(base_overrides, tmp_path):
    """fingerprint.json deleted from an unfinished run: the settings in its config.yaml decide (another learning
    rate is refused, naming it); with config.yaml unreadable too, the resume is refused, saying what to do."""
    from flare_exp.main import run
    from flare_exp.run.fingerprint import RunSettingsChangedError

    args = ["stage=sft", *base_overrides, "sft.max_steps=2", "sft.save_steps=1", "sft.eval_steps=0"]
    out = tmp_path / "sft"
    run(compose_cfg([*args, "sft.max_steps=1"]), run_dir=out)
    (out / "DONE").unlink()  # stopped before its end: checkpoint-1 to continue from
    (out / "fingerprint.json").unlink()
    with pytest.raises(RunSettingsChangedError, match=r"sft.learning_rate: 0.01 -> 0.5"):
        run(compose_cfg([*args, "sft.learning_rate=0.5"]), run_dir=out)
    same = tmp_path / "same"
    shutil.copytree(out, same)
    assert run(compose_cfg(args), run_dir=same)["global_step"] == 2  # the same settings continue it
    recorded = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text("garbage: [")
    with pytest.raises(RunSettingsChangedError, match=r"neither a readable fingerprint.json nor config.yaml"):
        run(compose_cfg(args), run_dir=out)
    (out / "config.yaml").write_text(recorded[:len(recorded) // 3].rsplit("\n", 1)[0] + "\n")  # cut at a line
    with pytest.raises(RunSettingsChangedError, match=r"nor config.yaml says which settings made it \(config.yaml "
                                                      r"lacks \d+ of them, e.g. .*: cut short or edited\)"):
        run(compose_cfg(args), run_dir=out)



def test_a_resume_without_its_fingerprint_refuses_a_training_file_rewritten_in_place(base_overrides, tmp_path):
    """config.yaml names the training file, not its bytes: with fingerprint.json gone, a file rewritten in place
    was trained on after a checkpoint made from the other one, and final/ recorded only the second. The newest
    checkpoint's own record of the data (flare_exp_checkpoint.json) decides."""
    from flare_exp.main import run
    from flare_exp.run.fingerprint import RunSettingsChangedError

    data = tmp_path / "train.jsonl"
    shutil.copy(Path(compose_cfg(base_overrides).data.prepared_dir).resolve() / "train.jsonl", data)
    args = ["stage=sft", *base_overrides, "sft.max_steps=2", "sft.save_steps=1", "sft.eval_steps=0",
            f"sft.train_file={data}"]
    out = tmp_path / "sft"
    run(compose_cfg([*args, "sft.max_steps=1"]), run_dir=out)
    (out / "DONE").unlink()
    (out / "fingerprint.json").unlink()
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:len(lines) // 2]))  # the same path, other rows
    with pytest.raises(RunSettingsChangedError, match=r"sft.train_file sha256: \w{12} -> \w{12} \(as checkpoint-1 "
                                                      r"recorded it\)"):
        run(compose_cfg(args), run_dir=out)


def test_a_run_dir_used_again_keeps_the_earlier_attempts_whole_record(tmp_path):
    """A pipeline's own record (its steps archive themselves) rerun with other settings: attempts/NN/ gets the
    earlier config, run info, how it ended (DONE), its fingerprint and Hydra's record of its launch."""
    from flare_exp.run.record import keep_previous_attempt

    run_dir = tmp_path / "pipe"
    (run_dir / ".hydra" / "accepted").mkdir(parents=True)
    (run_dir / ".hydra" / "accepted" / "overrides.yaml").write_text("- overwrite=false\n")
    for name, text in (("config.yaml", "a: 1\n"), ("run_info.json", "{}"), ("DONE", "{}"), ("fingerprint.json", "{}")):
        (run_dir / name).write_text(text)
    dest = keep_previous_attempt(run_dir, "a: 2\n")
    assert dest == run_dir / "attempts" / "01"
    assert {p.name for p in dest.iterdir()} == {"config.yaml", "run_info.json", "DONE", "fingerprint.json", ".hydra"}
    assert (dest / ".hydra" / "overrides.yaml").read_text() == "- overwrite=false\n"
    assert not (run_dir / "config.yaml").exists() and (run_dir / "DONE").exists()  # DONE: the new attempt's to clear


def test_weights_written_private_are_shared_as_the_umask_says(tmp_path):
    """safetensors writes 0600 and mkdtemp 0700: a finished adapter, a checkpoint and a built model get the modes a
    plain write gives under the umask (0644 / 0755 under 022), so a teammate can start from them."""
    import os

    import torch
    from safetensors.torch import save_file

    from omegaconf import OmegaConf

    from flare_exp.io import atomic_dir
    from flare_exp.training import CheckpointMeta

    old = os.umask(0o022)
    try:
        checkpoint = tmp_path / "checkpoint-2"
        checkpoint.mkdir()
        save_file({"a": torch.zeros(2)}, str(checkpoint / "adapter_model.safetensors"))
        CheckpointMeta(tmp_path / "base", OmegaConf.create({}), []).write(checkpoint, step=2)  # every adapter dir
        assert oct((checkpoint / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o644"
        with atomic_dir(tmp_path / "model") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "model.safetensors"))
        assert oct((tmp_path / "model").stat().st_mode & 0o777) == "0o755"
        assert oct((tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    finally:
        os.umask(old)


def test_resume_from_a_final_adapter_says_it_is_no_checkpoint(tmp_path):
    """final/ holds the adapter only (no optimizer, no schedule): resume= is told to take init_from instead, not
    that a checkpoint was cut short while saving."""
    from flare_exp.resume import resume_checkpoint

    final = tmp_path / "sft" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"is an adapter, not a Trainer checkpoint .* rl.init_from="):
        resume_checkpoint(str(final), tmp_path / "rl", "rl")


def test_a_run_dir_placed_outside_the_output_root_is_said(tmp_path, caplog):
    from flare_exp.main import outside_the_output_root

    outside_the_output_root(tmp_path / "out" / "runs" / "x", tmp_path / "out")
    outside_the_output_root(tmp_path / "out" / "sweeps" / "s" / "0", tmp_path / "out")
    assert not caplog.text
    outside_the_output_root(tmp_path / "elsewhere" / "runs" / "x", tmp_path / "out")
    assert "is not where stage=runs looks" in caplog.text and f"(paths.output_root={tmp_path / 'elsewhere'} " \
        "lists it)" in caplog.text
    caplog.clear()
    outside_the_output_root(tmp_path / "out" / "other" / "x", tmp_path / "out")  # under the root, not listed
    assert "is not where stage=runs looks" in caplog.text and "lists it" not in caplog.text


def test_a_journal_edited_to_hold_one_key_twice_says_which_row_is_kept(tmp_path, caplog):
    """A resume never appends a key twice: two rows for one id that differ are a hand edit, said (the later one
    is kept); a row copied as it is, is not worth a word."""
    from flare_exp.io import read_journal

    journal = tmp_path / "predictions.jsonl"
    journal.write_text('{"id": "a", "prediction": "A"}\n{"id": "b", "prediction": "B"}\n{"id": "b", "prediction": "B"}\n')
    caplog.set_level("WARNING", logger="flare_exp.io")
    assert read_journal(journal, "id")["b"]["prediction"] == "B" and not caplog.text
    with open(journal, "a") as f:
        f.write('{"id": "a", "prediction": "ZZZ"}\n')
    assert read_journal(journal, "id")["a"]["prediction"] == "ZZZ"
    assert "two rows for id 'a' that differ: the later one is kept" in caplog.text


def test_a_rerun_removes_the_temporary_files_of_writes_a_kill_cut_short(base_overrides, tmp_path):
    """A kill mid-write left .predictions.xlsx.<random>.tmp (a half-written workbook) and others in the run dir
    after the resumed run ended DONE; an earlier attempt's record and files of other names are left alone."""
    from conftest import compose_cfg
    from flare_exp.io import write_jsonl
    from flare_exp.main import run

    write_jsonl(tmp_path / "p.jsonl", [{"id": "d/0", "dataset": "dental", "task_type": "classification",
                                        "answer": "A", "prediction": "A", "model": "m", "split": "val"}])
    out = tmp_path / "eval"
    left = [out / ".metrics.png.7vz6ce6b.tmp", out / "heldout" / ".predictions.xlsx.32tg2b3y.tmp"]
    kept = [out / "attempts" / "01" / ".metrics.json.abcd_123.tmp", out / "notes.tmp", out / ".x.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("cut short")
    # atomic_dir's trees: a best/ being written (its temporary tree), and one a kill caught between moving the
    # earlier best/ aside and putting the new one in (the earlier one goes back)
    left.append(out / ".tmp-ab12cd34")
    (out / ".tmp-ab12cd34").mkdir()
    (out / ".tmp-ab12cd34" / "adapter_model.safetensors").write_text("half")
    (out / "heldout" / ".best.replaced-0a1b2c3d").mkdir()
    (out / "heldout" / ".best.replaced-0a1b2c3d" / "adapter_config.json").write_text("{}")
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'p.jsonl'}]",
                     f"data.prepared_dir={tmp_path / 'hand_made'}", "eval.radgraph=false"]), run_dir=out)
    assert (out / "DONE").exists() and not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert (out / "heldout" / "best" / "adapter_config.json").exists()  # put back
    assert not list((out / "heldout").glob(".best.replaced-*"))


def test_a_tree_replaced_whole_is_moved_aside_until_the_new_one_is_in(tmp_path, monkeypatch):
    """atomic_dir removed the earlier tree, then renamed the new one in: a kill between lost both (best/ of a
    run: the best adapter so far)."""
    from flare_exp import io

    target = tmp_path / "best"
    target.mkdir()
    (target / "w").write_text("old")
    renames = []
    real = Path.rename

    def killed_before_the_new_one(self, dest):
        renames.append(self.name)
        if len(renames) == 2:
            raise KeyboardInterrupt  # the earlier one moved aside, the new one not yet in
        return real(self, dest)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "rename", killed_before_the_new_one)
        with pytest.raises(KeyboardInterrupt):
            with io.atomic_dir(target) as tmp:
                (tmp / "w").write_text("new")
    assert not target.exists() and len(list(tmp_path.glob(".best.replaced-*"))) == 1
    io.remove_leftover_temporaries(tmp_path)  # the next run's start
    assert (target / "w").read_text() == "old"
    with io.atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_kill_during_overwrites_move_is_finished_by_the_next_launch(base_overrides, tmp_path, monkeypatch, caplog):
    """overwrite=true moves the finished run into attempts/NN/ file by file: a kill after the first left DONE
    there and the rest in place, and the next launch without overwrite "resumed" that rest as its own run. The
    plan written first lets the next launch finish the move: the old run whole in attempts/01/, a fresh run."""
    import shutil as shutil_module

    from conftest import compose_cfg
    from flare_exp.io import write_jsonl
    from flare_exp.main import run
    from flare_exp.run import record

    write_jsonl(tmp_path / "p.jsonl", [{"id": "d/0", "dataset": "dental", "task_type": "classification",
                                        "answer": "A", "prediction": "A", "model": "m", "split": "val"}])
    out = tmp_path / "eval"
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'p.jsonl'}]",
                       f"data.prepared_dir={tmp_path / 'hand_made'}", "eval.radgraph=false"])
    run(cfg, run_dir=out)
    before = sorted(p.name for p in record.attempt_files(out))
    moved = []

    def killed_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt  # SIGKILL part-way
        moved.append(src)
        return shutil_module.move(src, dst)

    with monkeypatch.context() as patched:
        patched.setattr(record.shutil, "move", killed_after_one)
        with pytest.raises(KeyboardInterrupt):
            record.archive_attempt(out)
    assert len(moved) == 1 and (out / "attempts" / "01" / record.MOVING).exists()
    caplog.set_level("WARNING")
    run(cfg, run_dir=out)  # without overwrite: the move is finished first, then a fresh run
    assert "move of an attempt into" in caplog.text
    assert sorted(p.name for p in (out / "attempts" / "01").iterdir() if p.name != ".hydra") == before
    assert (out / "DONE").exists() and (out / "metrics.json").exists()


def test_a_pipeline_steps_move_into_its_attempts_cut_short_is_finished_too(tmp_path):
    """A pipeline's overwrite=true moves each step's earlier attempt into the step's attempts/NN/: a kill part-way
    left the step's files split; the pipeline's next launch (finish_interrupted_move under its lock) finishes the
    step's move as it does its own."""
    from flare_exp.run import record

    pipeline = tmp_path / "pipe"
    step = pipeline / "sft"
    (step / "attempts" / "01").mkdir(parents=True)
    (step / "attempts" / "01" / "DONE").write_text("{}")  # moved before the kill
    (step / "adapter").mkdir()
    (step / "adapter" / "w").write_text("weights")
    (step / "metrics.json").write_text("{}")
    (step / "attempts" / "01" / record.MOVING).write_text('["DONE", "adapter", "metrics.json"]')
    (pipeline / "attempts" / "01").mkdir(parents=True)  # the pipeline's own, finished: left alone
    (pipeline / "attempts" / "01" / "DONE").write_text("{}")
    assert record.finish_interrupted_move(pipeline) == [step / "attempts" / "01"]
    moved = step / "attempts" / "01"
    assert sorted(p.name for p in moved.iterdir()) == ["DONE", "adapter", "metrics.json"]
    assert (moved / "adapter" / "w").read_text() == "weights" and sorted(p.name for p in step.iterdir()) == ["attempts"]
    assert record.finish_interrupted_move(pipeline) == []


def test_a_run_dir_that_is_a_dangling_link_is_named_before_anything_is_written(tmp_path):
    """A run dir on scratch storage that was purged (the link left behind): the settings check names the link and
    its missing target, where Hydra's own mkdir would stop with a FileExistsError traceback."""
    import os

    from flare_exp.checks import input_problems

    (tmp_path / "out" / "runs").mkdir(parents=True)
    os.symlink(tmp_path / "purged", tmp_path / "out" / "runs" / "gone")
    cfg = compose_cfg(["stage=eval", f"paths.output_root={tmp_path / 'out'}", "run_name=gone"])
    said = [str(p) for p in input_problems(cfg)]
    assert any(f"{tmp_path / 'out' / 'runs' / 'gone'} is a symbolic link to {tmp_path / 'purged'}, which does not "
               "exist" in p and "remove the link" in p for p in said), said
