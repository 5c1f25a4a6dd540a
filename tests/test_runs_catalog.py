"""stage=runs: the runs under the output root listed from their own records, and compared side by side."""
import json
import os

from conftest import compose_cfg

from flare_exp.catalog import listing, run_summary
from flare_exp.runs_compare import comparison
from flare_exp.run.lifecycle import run_with_markers
from flare_exp.run.record import write_failed, write_run_metadata


def _predictions(path, hits, reports=()):
    """Eight multi-label rows; the first ``hits`` predicted right; a report row per id in ``reports``."""
    rows = [{"id": f"q{i}", "task_type": "multi_label", "dataset": "chestdr", "split": "val",
             "answer": "effusion", "prediction": "effusion" if i < hits else "nodule"} for i in range(8)]
    rows += [{"id": r, "task_type": "report_generation", "dataset": "iu_xray", "split": "val",
              "answer": "No acute findings.", "prediction": "Normal chest."} for r in reports]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval_run(run_dir, cfg, hits, reports=()):
    write_run_metadata(run_dir, cfg)
    (run_dir / "scored").mkdir()  # predictions outside the run's own config: their answers are their own
    block = {"file": str(_predictions(run_dir / "scored" / "predictions.jsonl", hits, reports)), "n": 8 + len(reports),
             "split": "val",
             "official": {"multi_label": {"f1_score": hits / 8}}, "official_by_dataset": {}}
    (run_dir / "metrics.json").write_text(json.dumps({run_dir.name: block}))
    run_with_markers(run_dir, lambda: {"metrics": str(run_dir / "metrics.json")})


def test_the_listing_tells_each_run_state_and_the_comparison_tests_the_difference(tmp_path):
    cfg = compose_cfg(["stage=eval"])
    root = tmp_path / "out"
    _eval_run(root / "runs" / "good", cfg, hits=8)
    _eval_run(root / "sweeps" / "grid" / "0", cfg, hits=1)
    write_run_metadata(root / "runs" / "crashed", cfg)  # started, no marker, no lock holder
    write_run_metadata(root / "runs" / "broke", cfg)
    write_failed(root / "runs" / "broke", RuntimeError("CUDA out of memory"))
    (root / "runs" / "refused").mkdir()
    write_failed(root / "runs" / "refused", ValueError("sft.max_steps=0: must be an integer >= 1"))
    (root / "runs" / "not-a-run").mkdir()  # a dir Hydra made, nothing recorded

    header, rows = listing(root)
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert set(by_name) == {"good", "sweeps/grid/0", "crashed", "broke", "refused"}
    assert by_name["good"]["status"] == "DONE" and by_name["good"]["stage"] == "eval"
    assert by_name["good"]["headline metric"] == "multi_label.f1_score=1.0000"
    assert by_name["crashed"]["status"] == "unfinished"
    assert by_name["broke"]["status"] == "FAILED: RuntimeError: CUDA out of memory"
    assert by_name["refused"]["status"].startswith("stopped by settings: ValueError: sft.max_steps=0")
    assert run_summary(root / "runs" / "not-a-run") is None
    # a training run without an eval: its own number, named (it was blank)
    for stage, summary in (("rl", {"reward_last": 0.41237, "global_step": 9}), ("sft", {"last_loss": 1.5})):
        run_dir = root / "runs" / f"my-{stage}"
        write_run_metadata(run_dir, compose_cfg([f"stage={stage}"]))
        (run_dir / f"{stage}_summary.json").write_text(json.dumps(summary))
        run_with_markers(run_dir, lambda: {})
    assert run_summary(root / "runs" / "my-sft")["headline"] == "sft.last_loss=1.5000 (last logged training loss)"
    (root / "runs" / "my-sft" / "sft_summary.json").write_text('{"last_loss": "NaN"}')  # hand-edited: nothing
    header, rows = listing(root)
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_name["my-rl"]["headline metric"] == "rl.reward_last=0.4124 (mean reward, last quarter of the steps)"
    assert by_name["my-sft"]["headline metric"] == ""

    text = "\n".join(comparison(root, ["good", "sweeps/grid/0"], resamples=200, ar_trials=200))
    assert "| multi-label classification: f1_score | 1.0000 | 0.1250 |" in text
    assert "sweeps/grid/0 vs good" in text and "multi_label" in text
    row = next(line for line in text.splitlines() if line.startswith("| sweeps/grid/0 vs good"))
    assert row.split("|")[-4].strip() != "n/a", row  # p (AR): approximate randomization ran too
    assert "Adjusted p (Holm's step-down)" in text  # eval.significance.correction is read (it was always Holm)
    bh = "\n".join(comparison(root, ["good", "sweeps/grid/0"], resamples=200, correction="bh"))
    assert "Adjusted p (Benjamini-Hochberg)" in bh


def test_the_headline_is_the_runs_own_model_not_the_base_it_is_compared_with(tmp_path):
    """A pipeline's metrics.json holds base, sft, then the run's own model: the listing shows the last."""
    from flare_exp.catalog import headline

    blocks = {name: {"n": 8, "file": str(tmp_path / step / "predictions.jsonl"),
                     "official": {"multi_label": {"f1_score": f1}}}
              for name, step, f1 in (("base", "infer-base", 0.0), ("pipe/sft", "infer-sft", 0.5),
                                     ("pipe/rl", "infer", 0.75))}
    (tmp_path / "metrics.json").write_text(json.dumps(blocks))
    (tmp_path / "DONE").write_text("{}")  # a finished eval's (a killed one's number is said unfinished)
    assert headline(tmp_path) == "multi_label.f1_score=0.7500"
    blocks["pipe/rl"]["coverage"] = "53 of the 64 questions ... have no prediction"
    (tmp_path / "metrics.json").write_text(json.dumps(blocks))
    assert headline(tmp_path) == "multi_label.f1_score=0.7500 (partial)"  # not read as the whole split's
    (tmp_path / "metrics.json").write_text(json.dumps({"n": 3, "runs": [1, 2], "x": {"official": 5}}))
    assert headline(tmp_path) is None  # a metrics.json of another shape: no headline, no crash


def test_listing_an_empty_output_root_leaves_nothing_behind(tmp_path):
    """stage=runs is a view: on a root with no runs it says so and leaves no runs/ (nor Hydra's dir) behind."""
    import subprocess
    import sys

    from conftest import REPO

    for made_by_user in (False, True):
        if made_by_user:
            (tmp_path / "root").mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "launch.py", "stage=runs", f"paths.output_root={tmp_path / 'root'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "no runs under" in (done.stdout + done.stderr).lower()
        assert not (tmp_path / "root" / "runs").exists()
        assert (tmp_path / "root").exists() == made_by_user  # not even the root is made
    # a read-only output root (an archive mounted read-only) is listed, a failing comparison leaves nothing
    (tmp_path / "root" / "runs" / "a").mkdir(parents=True)
    (tmp_path / "root" / "runs" / "a" / "DONE").write_text('{"seconds": 3}')
    (tmp_path / "root" / "runs" / "a" / "run_info.json").write_text('{"started": "2026-12-01T10:00:00"}')
    os.chmod(tmp_path / "root" / "runs", 0o555)
    try:
        for extra, code in (([], 0), (["runs.compare=[a,nope]"], 1)):
            done = subprocess.run([sys.executable, "launch.py", "stage=runs", f"paths.output_root={tmp_path / 'root'}",
                                   *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
            assert done.returncode == code, done.stderr[-2000:]
            assert sorted(p.name for p in (tmp_path / "root" / "runs").iterdir()) == ["a"]
            assert not (tmp_path / "tmp" / "flare-exp-views").exists() or not any(
                (tmp_path / "tmp" / "flare-exp-views").iterdir())
    finally:
        os.chmod(tmp_path / "root" / "runs", 0o755)


def test_runs_scored_on_different_reports_are_said_to_differ(tmp_path):
    """Report generation has no paired test here, but its rows are inputs: two runs that differ only there are
    not said to share everything."""
    cfg = compose_cfg(["stage=eval"])
    root = tmp_path / "out"
    _eval_run(root / "runs" / "a", cfg, hits=8, reports=("r1", "r2"))
    _eval_run(root / "runs" / "b", cfg, hits=4, reports=("r1", "r3", "r4"))
    text = "\n".join(comparison(root, ["a", "b"], resamples=50))
    assert "warning: a and b were scored on different inputs: 1 sample(s) only in a, 2 only in b" in text
    assert "use the 9 they share" in text


def test_runs_joined_to_differently_prepared_data_are_said_to_differ(tmp_path):
    """Same ids and answers, but one run's split was prepared with data.image_window (other pixels) and predicted
    under another model.max_pixels: the comparison says so, and the runs table shows both."""
    from flare_exp.metrics.significance import compare
    from flare_exp.reports.eval_report import runs_table

    base = {"split": "val", "n": 8, "official": {}, "run": {"max_pixels": None}}
    results = {"win": {**base, "answers_from": str(tmp_path / "p_win" / "val.jsonl"), "image_window": "[0, 4095]"},
               "own": {**base, "answers_from": str(tmp_path / "p" / "val.jsonl"), "image_window": "own range",
                       "run": {"max_pixels": 401408}}}
    _, warnings = compare(results, {"win": {}, "own": {}}, resamples=0, seed=0)
    assert any("win and own were joined to different prepared files" in w for w in warnings)
    assert "win and own decoded their images with different windows: [0, 4095] and own range" in warnings
    assert "win and own were predicted with different model.max_pixels: None and 401408" in warnings
    header, rows = runs_table(results, tmp_path)
    table = {row[0]: row[1:] for row in rows}
    assert table["image window"] == ["[0, 4095]", "own range"] and table["prepared split"] == [
        "p_win/val.jsonl", "p/val.jsonl"]
    same = {k: {**v, "answers_from": results["own"]["answers_from"], "image_window": "own range",
                "run": {"max_pixels": 401408}} for k, v in results.items()}
    assert compare(same, {"win": {}, "own": {}}, resamples=0, seed=0)[1] == []


def test_the_listing_names_a_done_eval_whose_metrics_file_is_torn(tmp_path):
    """A metrics.json cut or edited since its eval wrote it is not a plain DONE with an empty metric: the status
    says it is unreadable and the headline column says why (runs.compare refuses it the same way)."""
    cfg = compose_cfg(["stage=eval"])
    root = tmp_path / "out"
    _eval_run(root / "runs" / "good", cfg, hits=8)
    _eval_run(root / "runs" / "torn", cfg, hits=8)
    (root / "runs" / "torn" / "metrics.json").write_text('{"torn": {"n": 8, "offi')
    header, rows = listing(root)
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_name["torn"]["status"] == "DONE (metrics.json unreadable)"
    assert by_name["torn"]["headline metric"].startswith("metrics.json unreadable (Unterminated string")
    assert "rerun that eval" in by_name["torn"]["headline metric"]
    assert by_name["good"]["status"] == "DONE" and by_name["good"]["headline metric"] == "multi_label.f1_score=1.0000"


def test_an_rl_run_the_alarm_stopped_early_is_not_a_plain_done(tmp_path):
    """A run rl.stop_on_alarm ended at step 12 of 30 was listed as DONE like one that trained all 30 steps."""
    root = tmp_path / "out"
    early = {"step": 12, "max_steps": 30, "why": "the reward-hacking alarm (length collapse)", "findings": ["..."]}
    for name, stage, summary in (("stopped", "rl", {"stopped_early": early}), ("whole", "rl", {}),
                                 ("pipe", "pipeline", {"stopped_early": early})):
        run_dir = root / "runs" / name
        write_run_metadata(run_dir, compose_cfg([f"stage={stage}"]))
        (run_dir / ("rl" if stage == "pipeline" else "")).mkdir(exist_ok=True)
        (run_dir / ("rl" if stage == "pipeline" else "") / "rl_summary.json").write_text(json.dumps(summary))
        run_with_markers(run_dir, lambda: {})
    header, rows = listing(root)
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    said = "DONE (stopped early at step 12 of 30 by the reward-hacking alarm (length collapse))"
    assert by_name["stopped"]["status"] == said and by_name["pipe"]["status"] == said
    assert by_name["whole"]["status"] == "DONE"


def test_a_run_whose_process_is_stopped_is_listed_as_stopped_not_running(tmp_path):
    """A holder stopped with SIGSTOP (Ctrl-Z, a suspended job) holds the lock but makes no progress: listed as
    stopped, with what makes it go on; continued, it is running again."""
    import signal
    import subprocess
    import sys
    import time

    from test_runlock import _fake_holder

    run_dir = tmp_path / "runs" / "paused"
    run_dir.mkdir(parents=True)
    (run_dir / "run_info.json").write_text(json.dumps({"started": "2026-12-01T10:00:00"}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        _fake_holder(run_dir, sleeper.pid)
        assert run_summary(run_dir)["status"] == "running"
        sleeper.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        assert run_summary(run_dir)["status"] == f"stopped (pid {sleeper.pid}: kill -CONT to go on)"
        sleeper.send_signal(signal.SIGCONT)
        time.sleep(0.1)
        assert run_summary(run_dir)["status"] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_summary(run_dir)["status"] == "unfinished"


def test_a_resumed_runs_duration_counts_the_attempts_it_continued(tmp_path):
    """stage=runs showed a resumed run's last attempt only (12 s for a run that trained 22 s over two)."""
    import os

    from flare_exp.catalog import listing

    run_dir = tmp_path / "runs" / "sft-k"

    def attempt(number, seconds, failed=True, outputs=False):
        path = run_dir / "attempts" / f"{number:02d}"
        path.mkdir(parents=True)
        (path / "run_info.json").write_text(json.dumps({"started": "2026-12-06T10:00:00"}))
        (path / "config.yaml").write_text("stage:\n  name: sft\n")
        if failed:
            (path / "FAILED").write_text("stopped from outside (KeyboardInterrupt: SIGTERM)\n")
            end = __import__("datetime").datetime.fromisoformat("2026-12-06T10:00:00").timestamp() + seconds
            os.utime(path / "FAILED", (end, end))
        if outputs:  # overwrite=true filed a whole earlier run away: not one this run continued
            (path / "checkpoint-40").mkdir()

    attempt(1, 100, outputs=True)
    attempt(2, 10)
    run_dir.mkdir(exist_ok=True)
    (run_dir / "run_info.json").write_text(json.dumps({"started": "2026-12-06T11:00:00"}))
    (run_dir / "config.yaml").write_text("stage:\n  name: sft\n")
    (run_dir / "DONE").write_text(json.dumps({"seconds": 12}))
    row = next(r for r in listing(tmp_path)[1] if r[0] == "sft-k")
    assert row[4] == "22s (2 attempts)", row
    attempt(3, 0, failed=False)  # killed -9: no FAILED, no end time
    row = next(r for r in listing(tmp_path)[1] if r[0] == "sft-k")
    assert row[4] == "12s (the last of 3 attempts: an earlier one was killed, its time unknown)", row


def test_one_hand_edited_run_info_does_not_hide_the_listing(tmp_path):
    from flare_exp.catalog import listing

    for name, text in (("a-list", "[1, 2]"), ("a-number", json.dumps({"started": 12345})),
                       ("a-word", json.dumps({"started": "yesterday"}))):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "run_info.json").write_text(text)
        (run_dir / "DONE").write_text("{}")
    rows = {r[0]: r for r in listing(tmp_path)[1]}
    assert set(rows) >= {"a-number", "a-word"} and rows["a-number"][3] == "" and rows["a-word"][3] == ""


def test_a_rank_that_lost_its_peer_says_so_and_how_to_go_on(tmp_path, monkeypatch):
    """One rank of a torchrun job SIGKILLed: the survivor's FAILED named only gloo's "Connection reset by peer"
    (with its "GLHF!"), nothing of what happened or what to do; outside several ranks the error is as it is."""
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:29586: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging. GLHF!")
    write_failed(tmp_path / "one", gloo)
    assert (tmp_path / "one" / "FAILED").read_text().startswith("RuntimeError: [../third_party/gloo")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    write_failed(tmp_path / "two", gloo)
    text = (tmp_path / "two" / "FAILED").read_text()
    assert text.startswith("rank 0: lost another rank of this job (RuntimeError: [../third_party/gloo") and \
        "killed or crashed without a word (out of memory, SIGKILL, a node lost); a rerun with the same run_name " \
        "runs it again" in text.splitlines()[0]
    write_failed(tmp_path / "other", RuntimeError("CUDA out of memory"))  # its own failure: as it is
    assert (tmp_path / "other" / "FAILED").read_text().startswith("rank 0: RuntimeError: CUDA out of memory")


def test_ranks_other_than_0_log_only_their_warnings(monkeypatch):
    """Under torchrun every log line was printed once per rank."""
    import logging

    from flare_exp.logs import quiet_other_ranks

    logger = logging.getLogger("flare_exp")
    level = logger.level
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        quiet_other_ranks()
        assert logger.level == level
        monkeypatch.setenv("RANK", "1")
        quiet_other_ranks()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(level)


def test_checkpoints_a_resume_filed_away_do_not_end_the_count_of_attempts(tmp_path):
    """A resume files damaged checkpoints into attempts/NN/ (beside the earlier attempt's record, or into a new
    NN of their own on a name clash): the listing took them for an earlier run's outputs and stopped counting
    there ("the last of 2 attempts" for 5, the time short)."""
    from flare_exp.catalog import continued_attempts

    run_dir = tmp_path / "sft"
    for number, files in (("01", {"config.yaml": "a: 1\n", "run_info.json": '{"started": "2026-12-07T10:00:00"}',
                                  "FAILED": "killed"}),
                          ("02", {"config.yaml": "a: 1\n", "run_info.json": '{"started": "2026-12-07T11:00:00"}',
                                  "filed_checkpoints.json": '{"checkpoint-4": "trainer_state.json is missing"}'}),
                          ("03", {"filed_checkpoints.json": '{"checkpoint-4": "its sha256 changed"}'})):
        attempt = run_dir / "attempts" / number
        attempt.mkdir(parents=True)
        for name, text in files.items():
            (attempt / name).write_text(text)
        if "filed_checkpoints.json" in files:
            (attempt / "checkpoint-4").mkdir()
            (attempt / "checkpoint-4" / "adapter_model.safetensors").write_text("x")
    assert len(continued_attempts(run_dir)) == 2  # 02 (killed, no end known) and 01; 03 holds checkpoints only
    (run_dir / "attempts" / "02" / "final").mkdir()  # an output no resume files: a whole earlier run
    assert continued_attempts(run_dir) == []


def test_the_listing_holds_each_run_to_its_own_record(tmp_path):
    """Hand-damaged records are said, not taken at their word: config.yaml edited to name another stage (the
    stage the run recorded is listed), run_info.json cut in half (an unfinished run is still listed; a failed one
    is FAILED, not refused by its settings), a FAILED marker beside DONE, a DONE edited by hand."""
    from omegaconf import OmegaConf

    from flare_exp.run.fingerprint import fingerprint

    cfg = compose_cfg(["stage=eval"])
    root = tmp_path / "out"
    edited = root / "runs" / "edited"
    _eval_run(edited, cfg, hits=8)
    (edited / "fingerprint.json").write_text(json.dumps(fingerprint("eval", cfg)))
    saved = OmegaConf.load(edited / "config.yaml")
    saved.stage.name = "sft"
    OmegaConf.save(saved, edited / "config.yaml")
    torn = root / "runs" / "torn"
    write_run_metadata(torn, cfg)
    info = (torn / "run_info.json").read_text()
    (torn / "run_info.json").write_text(info[:len(info) // 2])
    torn_failed = root / "runs" / "torn-failed"
    write_run_metadata(torn_failed, cfg)
    write_failed(torn_failed, RuntimeError("CUDA out of memory"))
    (torn_failed / "run_info.json").write_text("{\"started\": ")
    both = root / "runs" / "both"
    _eval_run(both, cfg, hits=4)
    write_failed(both, RuntimeError("CUDA out of memory"))
    os.symlink(tmp_path / "purged-scratch", root / "runs" / "gone")
    os.symlink(root / "runs" / "loop-b", root / "runs" / "loop-a")  # two links that lead to each other
    os.symlink(root / "runs" / "loop-a", root / "runs" / "loop-b")
    garbled, hand_timed, touched = root / "runs" / "garbled", root / "runs" / "hand-timed", root / "runs" / "touched"
    for run_dir, done in ((garbled, "finished!"), (hand_timed, '{"seconds": "3 min"}'), (touched, "")):
        _eval_run(run_dir, cfg, hits=8)
        (run_dir / "DONE").write_text(done)  # typed over; a string where the seconds were (it crashed); `touch`

    header, rows = listing(root)
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_name["edited"]["stage"] == "eval"
    assert by_name["edited"]["status"] == "DONE (config.yaml edited since: stage.name: eval -> sft)"
    assert by_name["torn"]["status"] == "unfinished (run_info.json unreadable)"
    assert by_name["torn-failed"]["status"].startswith("FAILED: RuntimeError: CUDA out of memory")
    assert by_name["both"]["status"] == "DONE (a FAILED marker lies beside DONE)"
    assert by_name["gone"]["status"] == "a link to nothing (its target purged or unmounted)"
    assert by_name["loop-a"]["status"] == "a link that leads back to itself (a loop of links)"
    for name in ("garbled", "hand-timed"):
        assert by_name[name]["status"] == "DONE (DONE not as a run writes it (edited): how long it ran is not known)"
    assert by_name["touched"]["status"] == "DONE"  # a marker touched by hand only lacks its time
    assert by_name["gone"]["headline metric"] == f"{tmp_path / 'purged-scratch'} does not exist"
