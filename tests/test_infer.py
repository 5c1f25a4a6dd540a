"""infer on a GPU that a batch does not fit: batches are split, nothing is lost, a report too large says why."""
import pytest

from conftest import compose_cfg


def test_a_batch_out_of_gpu_memory_is_decoded_in_halves(base_overrides, sft_adapter, tmp_path, monkeypatch, caplog):
    """A batch of large images that does not fit is split (said once) and every report is still written, with
    the predictions an unsplit run gives; a single report that does not fit stops with what to lower."""
    import torch

    from flare_exp.io import read_jsonl
    from flare_exp.main import run
    from flare_exp.stages import infer

    common = ["stage=infer", *base_overrides, f"infer.checkpoint={sft_adapter}", "infer.batch_size=4",
              "infer.num_samples=6", "infer.max_new_tokens=4"]
    run(compose_cfg([*common, "run_name=whole"]), run_dir=tmp_path / "whole")
    original, sizes = infer.Decoder.__call__, []

    def small_gpu(decoder, records, images, limit=1):
        sizes.append(len(records))
        if len(records) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(decoder, records, images)

    monkeypatch.setattr(infer.Decoder, "__call__", small_gpu)
    caplog.set_level("WARNING", logger="flare_exp.stages.infer")
    run(compose_cfg([*common, "run_name=halves"]), run_dir=tmp_path / "halves")
    assert sizes == [4, 2, 1, 1, 2, 1, 1, 2, 1, 1]  # batches of 4 and 2, halved down to single reports
    assert caplog.text.count("ran out of GPU memory") == 1 and "infer.batch_size" in caplog.text
    rows = lambda name: {r["id"]: r["prediction"] for r in read_jsonl(tmp_path / name / "predictions.jsonl")}  # noqa: E731
    assert rows("halves") == rows("whole") and len(rows("whole")) == 6

    monkeypatch.setattr(infer.Decoder, "__call__", lambda d, r, i: small_gpu(d, r, i, limit=0))
    with pytest.raises(RuntimeError, match=r"prompt tokens \+ infer.max_new_tokens=4\) does not fit in GPU memory: "
                                           r"lower model.max_pixels"):
        run(compose_cfg([*common, "run_name=too-big"]), run_dir=tmp_path / "too-big")
