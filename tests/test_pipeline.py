"""The main job, `python launch.py` (the demo pipeline: prepare -> sft -> rl -> infer -> eval), end to end with
the real stage code on the tiny model; a rerun reuses every finished step and files no attempt; a rerun with
other settings keeps the first attempt's record."""
import json
import re

from conftest import compose_cfg


def test_the_demo_pipeline_end_to_end_and_again(base_overrides, tmp_path, caplog):
    from flare_exp.main import run

    run_dir = tmp_path / "demo-pipeline"
    result = run(compose_cfg(base_overrides), run_dir=run_dir)
    steps = ["prepare", "sft", "rl", "infer", "eval"]
    assert list(result["steps"]) == steps
    for step in steps[1:]:
        assert (run_dir / step / "DONE").exists(), step
    assert (run_dir / "infer" / "predictions.xlsx").exists()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {"report_generation", "classification", "multi_label", "regression"} <= {
        task for entry in metrics.values() for task in entry["by_task"]}
    assert (run_dir / "DONE").exists() and not (run_dir / "attempts").exists()

    caplog.set_level("INFO", logger="flare_exp.stages.pipeline")
    again = run(compose_cfg(base_overrides), run_dir=run_dir)
    assert all(again["results"][step] == {"reused": str(run_dir / step)} for step in steps[1:])
    assert not (run_dir / "attempts").exists()  # same settings, nothing failed: nothing new to keep

    assert "other settings" not in caplog.text
    first_config = (run_dir / "config.yaml").read_text()
    run(compose_cfg([*base_overrides, "infer.max_new_tokens=5"]), run_dir=run_dir)  # steps reused all the same
    # the reused infer step did not decode with the new setting: said, naming it; the other steps are unaffected
    assert re.search(r"\[infer\] already finished in \S+ with other settings \(infer.max_new_tokens: \d+ -> 5\): "
                     r"reusing it as it is; overwrite=true redoes it", caplog.text)
    assert caplog.text.count("other settings") == 1
    assert (run_dir / "attempts" / "01" / "config.yaml").read_text() == first_config
    assert "max_new_tokens: 5" in (run_dir / "config.yaml").read_text()
