"""infer on a GPU that a batch does not fit: batches are split, nothing is lost, a report too large says why."""
import pytest

from conftest import compose_cfg


def test_a_batch_out_of_gpu_memory_is_decoded_in_halves(base_overrides, sft_adapter, tmp_path, monkeypatch, caplog):
    """A batch of large images that does not fit is split (said once) and every report is still written, with
    the predictions an unsplit run gives; a single report that does not fit stops with what to lower."""
    import torch

    from flare_exp.io import read_jsonl
    from flare_exp.main import run
    from flare_exp.models import batch_decoding

    common = ["stage=infer", *base_overrides, f"infer.checkpoint={sft_adapter}", "infer.batch_size=4",
              "infer.num_samples=6", "infer.max_new_tokens=4"]
    run(compose_cfg([*common, "run_name=whole"]), run_dir=tmp_path / "whole")
    original, sizes = batch_decoding.Decoder.__call__, []

    def small_gpu(decoder, records, images, limit=1):
        sizes.append(len(records))
        if len(records) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(decoder, records, images)

    monkeypatch.setattr(batch_decoding.Decoder, "__call__", small_gpu)
    caplog.set_level("WARNING", logger="flare_exp.models.batch_decoding")
    run(compose_cfg([*common, "run_name=halves"]), run_dir=tmp_path / "halves")
    assert sizes == [4, 2, 1, 1, 2, 1, 1, 2, 1, 1]  # batches of 4 and 2, halved down to single reports
    assert caplog.text.count("ran out of GPU memory") == 1 and "infer.batch_size" in caplog.text
    rows = lambda name: {r["id"]: r["prediction"] for r in read_jsonl(tmp_path / name / "predictions.jsonl")}  # noqa: E731
    assert rows("halves") == rows("whole") and len(rows("whole")) == 6

    monkeypatch.setattr(batch_decoding.Decoder, "__call__", lambda d, r, i: small_gpu(d, r, i, limit=0))
    with pytest.raises(RuntimeError, match=r"prompt tokens \+ infer.max_new_tokens=4\) does not fit in GPU memory: "
                                           r"lower model.max_pixels"):
        run(compose_cfg([*common, "run_name=too-big"]), run_dir=tmp_path / "too-big")


def test_the_graph_loop_goes_on_after_a_batch_ran_out_of_memory(base_overrides, sft_adapter, tmp_path,
                                                                  monkeypatch):
    """The loop's first batch runs out of memory: its cache is dropped, the halves decode with generate, and the
    next full batch comes back to the loop with a new cache; same predictions as an undisturbed run."""
    import torch

    from flare_exp.io import read_jsonl
    from flare_exp.main import run
    from flare_exp.models.graph_decoding import GraphDecoder

    common = ["stage=infer", *base_overrides, f"infer.checkpoint={sft_adapter}", "infer.batch_size=2",
              "infer.num_samples=4", "infer.max_new_tokens=4", "infer.decode_loop=graph",
              "infer.cache_implementation=static"]
    summary = run(compose_cfg([*common, "run_name=whole"]), run_dir=tmp_path / "whole")
    assert summary["decode_loop"] == "graph" and summary["decode_attention"] == "split_kv (grouped SDPA: no GPU)"
    original, calls = GraphDecoder.__call__, []

    def first_fails(loop, *args, **kwargs):
        calls.append(loop.cache)
        if len(calls) == 1:
            loop._static_cache(2, 8)  # allocated, then the GPU runs out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(loop, *args, **kwargs)

    monkeypatch.setattr(GraphDecoder, "__call__", first_fails)
    run(compose_cfg([*common, "run_name=halves"]), run_dir=tmp_path / "halves")
    assert len(calls) == 2 and calls[1] is None  # the second full batch: back in the loop, the cache dropped
    rows = lambda name: {r["id"]: r["prediction"] for r in read_jsonl(tmp_path / name / "predictions.jsonl")}  # noqa: E731
    assert rows("halves") == rows("whole") and len(rows("whole")) == 4


def test_batches_bucketed_by_task_keep_the_order_and_the_predictions(base_overrides, demo_prepared, tmp_path,
                                                                       monkeypatch):
    """infer.bucket_by_task: batches hold one task type each (longest answers first), the graph loop gives the
    same prediction per record and predictions.jsonl keeps the input's order."""
    from itertools import chain, zip_longest

    from flare_exp.io import read_jsonl, write_jsonl
    from flare_exp.main import run
    from flare_exp.models import batch_decoding

    by_task = {}
    for r in read_jsonl(demo_prepared / "val.jsonl"):
        by_task.setdefault(r["task_type"], []).append(r)
    assert len(by_task) >= 3
    mixed = [r for r in chain(*zip_longest(*(rows[:3] for rows in by_task.values()))) if r]  # task types taking turns
    write_jsonl(tmp_path / "mixed.jsonl", mixed)

    batches = []
    original = batch_decoding.model_batch
    monkeypatch.setattr(batch_decoding, "model_batch", lambda model, chat, records, images: (
        batches.append([r["task_type"] for r in records]), original(model, chat, records, images))[1])
    common = ["stage=infer", *base_overrides, "infer.batch_size=3", f"infer.input_file={tmp_path / 'mixed.jsonl'}",
              "infer.max_new_tokens=4", "infer.decode_loop=graph", "infer.cache_implementation=static"]
    rows = {}
    for bucketed in ("false", "true"):
        batches.clear()
        run(compose_cfg([*common, f"infer.bucket_by_task={bucketed}", f"run_name=b{bucketed}"]),
            run_dir=tmp_path / bucketed)
        rows[bucketed] = [(r["id"], r["prediction"]) for r in read_jsonl(tmp_path / bucketed / "predictions.jsonl")]
        several = sum(len(set(tasks)) > 1 for tasks in batches)
        assert (several == 0) if bucketed == "true" else several > 0, batches
    assert batches[0] == ["report_generation"] * 3  # the longest answers first
    assert rows["true"] == rows["false"] and len({p for _, p in rows["true"]}) > 1
    assert [i for i, _ in rows["true"]] == [r["id"] for r in mixed]  # the input's order
