"""model.decode_attention=split_kv: the Triton decode kernel gives SDPA's attention (any boolean mask, grouped
and plain heads, one slice or several) and the graph loop's tokens equal generate's with transformers' own
attention. The kernels run under Triton's CPU interpreter, which must be chosen before Triton is first imported:
``test_kernels_under_the_interpreter`` runs this file's interpreter tests (marked ``interpreter``: they exist
only there) in a child pytest with TRITON_INTERPRET=1. The GPU numbers are in docs/performance.md."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreter():
    from flare_exp.models import split_kv_attention

    return split_kv_attention


@pytest.mark.slow  # a pytest run of its own, every kernel interpreted on the CPU
@pytest.mark.skipif(INTERPRETED, reason="the child run itself")
def test_kernels_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            "-m", "interpreter", "--basetemp", str(tmp_path / "child"), __file__], env=env,
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert "passed" in summary and "failed" not in summary, summary


def _reference(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def test_without_the_interpreter_a_cpu_call_takes_sdpa(monkeypatch):
    from flare_exp.models import split_kv_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    assert not split_kv_attention.supported(torch.zeros(2, 8, 1, 32), torch.zeros(2, 2, 40, 32), mask)


def test_split_count():
    from flare_exp.models.split_kv_attention import split_count

    assert split_count(programs=1024, key_blocks=13, processors=132) == 1  # batch 128 x 8 heads: enough
    assert split_count(programs=64, key_blocks=13, processors=132) == 9  # batch 8: slices fill the card
    assert split_count(programs=8, key_blocks=3, processors=132) == 3  # never more slices than blocks


def test_unknown_setting_is_named():
    from flare_exp.stages.evaluate import check_settings

    cfg = compose_cfg(["stage=eval", "eval.green.decode_attention=flash"])
    with pytest.raises(ValueError, match="eval.green.decode_attention='flash'"):
        check_settings(cfg)


@pytest.mark.parametrize("setting, said", [("split_kv", "split_kv (grouped SDPA: no GPU)"), ("grouped", "grouped"),
                                           ("transformers", "transformers (sdpa)")])
def test_the_summary_says_which_attention_ran(setting, said, base_overrides):
    from flare_exp.models.grouped_attention import attention_used
    from flare_exp.models.loading import load_model

    cfg = compose_cfg(["stage=infer", *base_overrides, f"model.decode_attention={setting}"])
    assert attention_used(load_model(cfg.model, training=False).model) == said


def test_a_head_size_the_kernel_cannot_take_is_named():
    from flare_exp.models.split_kv_attention import self_check

    assert self_check("cpu", torch.float32, 80) == "head size 80 is not a power of two from 16 to 256"


def _left_padded(rows: list[list[int]], pad: int = 0) -> dict:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def test_common_beginning_of_left_padded_prompts():
    from flare_exp.models.graph_decoding import common_beginning

    beginning = list(range(1, 81))
    batch = _left_padded([beginning + [7, 8, 9], beginning + [5], beginning + [7, 8, 3, 4, 5, 6]])
    starts, span = common_beginning(batch)
    assert starts.tolist() == [3, 5, 0] and span.tolist() == [0, 80] and starts.dtype == torch.int32
    assert common_beginning(batch, minimum=81) is None  # too short to be worth reading apart
    same = _left_padded([beginning, beginning])  # whole prompts alike: all of them
    assert common_beginning(same)[1].tolist() == [0, 80]
    assert common_beginning(_left_padded([beginning])) is None  # one row: nothing to share
    other = _left_padded([beginning + [1], [99] + beginning])  # different from the first token
    assert common_beginning(other) is None
    right = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(-1)}
    assert common_beginning(right) is None  # not left padding: the columns are not where the rule puts them
    holes = {k: v.clone() for k, v in batch.items()}
    holes["attention_mask"][2, 10] = 0
    assert common_beginning(holes) is None
    images = {**batch, "pixel_values": torch.zeros(1)}  # equal image tokens need not be equal images
    assert common_beginning(images) is None


def test_shared_prefix_needs_the_split_kv_kernel():
    from flare_exp.stages.evaluate import check_settings

    with pytest.raises(ValueError, match="eval.predictions is empty"):  # past the judge's: split_kv, the default
        check_settings(compose_cfg(["stage=eval", "eval.green.shared_prefix=true"]))
    cfg = compose_cfg(["stage=eval", "eval.green.shared_prefix=true", "eval.green.decode_attention=grouped"])
    with pytest.raises(ValueError, match="eval.green.shared_prefix=true .* eval.green.decode_attention=split_kv "
                                         r"\(it is grouped\)"):
        check_settings(cfg)


if INTERPRETED:  # the child run's tests (test_kernels_under_the_interpreter)
    @pytest.mark.interpreter
    def test_the_self_check_agrees_and_catches_a_wrong_kernel(interpreter, monkeypatch):
        """Run at load time on a GPU: a kernel that compiles wrongly or not at all keeps SDPA, with the reason."""
        attend = interpreter.attend
        assert interpreter.self_check("cpu", torch.float32, 32) is None
        monkeypatch.setattr(interpreter, "attend", lambda q, k, v, m, shared=None: torch.zeros(2, 1, 8, 32))
        assert interpreter.self_check("cpu", torch.float32, 32).startswith("differs from SDPA by")
        monkeypatch.setattr(interpreter, "attend", lambda q, k, v, m, shared=None: attend(q, k, v, m)
                            if shared is None else torch.zeros(2, 1, 8, 32))  # the shared part alone wrong
        assert interpreter.self_check("cpu", torch.float32, 32).startswith("differs from SDPA by")
        monkeypatch.setattr(interpreter, "attend", lambda *a, **k: 1 / 0)
        assert interpreter.self_check("cpu", torch.float32, 32).startswith("ZeroDivisionError")

    @pytest.mark.interpreter
    @pytest.mark.parametrize("heads,kv_heads,keys,head_dim,splits,dtype", [
        (8, 2, 150, 32, None, torch.float32),  # grouped heads, slices chosen by the rule
        (4, 4, 70, 16, 3, torch.float32),  # plain multi-head (the GREEN judge), keys not a whole number of blocks
        (8, 2, 200, 64, 1, torch.float32),  # one slice
        (6, 2, 300, 32, 5, torch.float16),  # 3 heads per group (padded to the kernel's 16 rows), half precision
    ])
    def test_same_attention_as_sdpa(interpreter, heads, kv_heads, keys, head_dim, splits, dtype):
        generator = torch.Generator().manual_seed(keys)
        rows = 3
        # transformers hands the query as (B, H, 1, D) transposed from (B, 1, H, D): not contiguous
        query = torch.randn(rows, 1, heads, head_dim, generator=generator).transpose(1, 2).to(dtype)
        key = torch.randn(rows, kv_heads, keys, head_dim, generator=generator).to(dtype)
        value = torch.randn(rows, kv_heads, keys, head_dim, generator=generator).to(dtype)
        mask = torch.rand(rows, 1, 1, keys, generator=generator) > 0.3  # holes anywhere, not only left padding
        mask[0, ..., :130] = False  # whole blocks of padding: their loads masked off
        mask[:, ..., -1] = True
        got = interpreter.attend(query, key, value, mask, 0.2, splits=splits)
        want = _reference(query.float(), key.float(), value.float(), mask, 0.2)
        assert got.shape == (rows, 1, heads, head_dim) and got.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)
        wrong = mask.clone()
        wrong[1, ..., 5] = ~wrong[1, ..., 5]
        assert not torch.allclose(interpreter.attend(query, key, value, wrong, 0.2, splits=splits).float(), want,
                                  atol=tolerance)


    @pytest.mark.interpreter
    def test_what_the_kernel_leaves_to_sdpa(interpreter):
        query, key = torch.zeros(2, 8, 1, 32), torch.zeros(2, 2, 40, 32)
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        assert interpreter.supported(query, key, mask)
        assert not interpreter.supported(torch.zeros(2, 8, 3, 32), key, mask)  # prefill: several query tokens
        assert not interpreter.supported(query, key, None)  # no padding: SDPA shares heads itself
        assert not interpreter.supported(query, key, mask.float())  # an additive mask may carry biases
        assert not interpreter.supported(query, key, mask, softcap=30.0)
        assert not interpreter.supported(torch.zeros(2, 8, 1, 24), torch.zeros(2, 2, 40, 24), mask)  # head dim
        assert not interpreter.supported(query, key, mask, dropout=0.1)

    @pytest.mark.interpreter
    def test_graph_loop_tokens_equal_generate_with_transformers_attention(interpreter, monkeypatch, base_overrides,
                                                                          demo_prepared):
        """The tiny Qwen3-VL (float32, padded batches, a reused cache): every decode step's attention goes through
        the kernel, and the tokens are generate()'s with transformers' SDPA."""
        from flare_exp.data.vision import VisionChat
        from flare_exp.io import read_jsonl
        from flare_exp.models.graph_decoding import GraphDecoder
        from flare_exp.models.grouped_attention import SPLIT_KV_NAME
        from flare_exp.models.loading import load_model
        from flare_exp.runtime import abspath

        calls = []
        attend = interpreter.attend
        monkeypatch.setattr(interpreter, "attend", lambda *a, **k: calls.append(a[0].shape) or attend(*a, **k))
        cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32", "model.decode_attention=split_kv"])
        loaded = load_model(cfg.model, training=False)
        model = loaded.model
        text_config = model.model.language_model.config
        assert text_config._attn_implementation == SPLIT_KV_NAME
        with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen them so mask mistakes show
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
        chat = VisionChat(loaded.processor, abspath(cfg.data.root))
        rows = sorted(read_jsonl(demo_prepared / "val.jsonl"), key=lambda r: chat.sequence_length(r, with_answer=False))
        batches = [chat.generation_batch([rows[-1], rows[0], rows[len(rows) // 2]]), chat.generation_batch(rows[:2])]
        pad = chat.tokenizer.pad_token_id
        loop = GraphDecoder(model, None)
        ours = [loop(batch, 6, pad) for batch in batches]
        layers = model.config.text_config.num_hidden_layers
        assert len(calls) >= layers * 5  # each decode step, every layer
        text_config._attn_implementation = "sdpa"
        for batch, tokens in zip(batches, ours):
            with torch.inference_mode():
                reference = model.generate(**batch, max_new_tokens=6, do_sample=False, cache_implementation="static",
                                           disable_compile=True, pad_token_id=pad)[:, batch["input_ids"].shape[1]:]
            assert len(set(reference[0].tolist())) > 1
            assert torch.equal(tokens[:, :reference.shape[1]], reference)


    @pytest.mark.interpreter
    @pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,splits", [
        (2, 2, 16, torch.float32, None),  # plain multi-head (the GREEN judge)
        (4, 1, 32, torch.float32, 3),  # grouped heads, several slices
        (2, 2, 32, torch.float16, 2),
    ])
    def test_a_shared_beginning_read_once_gives_the_same_attention(interpreter, heads, kv_heads, head_dim, dtype,
                                                                   splits):
        """Every row's keys from its start on repeat the source row's for the shared length (as a common prompt
        beginning does): read from the source row once per block of rows, the attention is SDPA's over each
        row's own cache; the rows' own copies of those keys are not read at all."""
        generator = torch.Generator().manual_seed(head_dim)
        rows, keys, shared, source = 17, 128, 70, 1  # 17 rows: two blocks of 16 rows for the shared part
        query = torch.randn(rows, 1, heads, head_dim, generator=generator).transpose(1, 2).to(dtype)
        key, value = (torch.randn(rows, kv_heads, keys, head_dim, generator=generator).to(dtype) for _ in range(2))
        starts = torch.randint(0, 30, (rows,), generator=generator)
        for row in range(rows):
            for cache in (key, value):
                cache[row, :, starts[row]:starts[row] + shared] = cache[source, :, starts[source]:starts[source] + shared]
        mask = (torch.arange(keys) >= starts[:, None])[:, None, None, :].clone()
        mask[:, ..., 110:] = False  # the static cache's unwritten tail
        mask[0, ..., 105] = False  # a hole in row 0's own keys, past its shared beginning
        span = torch.tensor([source, shared], dtype=torch.int32)
        got = interpreter.attend(query, key, value, mask, 0.3, splits=splits, shared=(starts.int(), span))
        want = _reference(query.float(), key.float(), value.float(), mask, 0.3)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)
        changed = key.clone()
        changed[0, :, starts[0]:starts[0] + shared] += 1  # row 0's own copy: not read
        same = interpreter.attend(query, changed, value, mask, 0.3, splits=splits, shared=(starts.int(), span))
        assert torch.equal(same, got)
        changed[source, :, starts[source] + 5] += 1  # the source row's: read for every row
        moved = interpreter.attend(query, changed, value, mask, 0.3, splits=splits, shared=(starts.int(), span))
        assert not torch.allclose(moved[2:].float(), want[2:], atol=tolerance)

    @pytest.mark.interpreter
    def test_judge_with_a_shared_beginning_judges_as_generate(interpreter, monkeypatch, tmp_path):
        """The tiny Llama judge (float32) with eval.green.shared_prefix: its GREEN prompts' common beginning goes
        to the kernel's shared part at every decode step (where the prefill left it in each row's cache: the
        same attention as each row reading its own copy), and the judgments are generate()'s with transformers'
        attention."""
        from flare_exp.fixtures.tiny_models import build_tiny_causal_lm
        from flare_exp.metrics.green_judge import GreenJudge

        shared_calls = []
        attend = interpreter.attend

        def checked(*args, shared=None, **kwargs):  # each step's attention as if every row read its own copy
            got = attend(*args, shared=shared, **kwargs)
            shared_calls.append(shared is not None)
            torch.testing.assert_close(got, attend(*args, **kwargs), atol=1e-5, rtol=1e-5)
            return got

        monkeypatch.setattr(interpreter, "attend", checked)
        path = build_tiny_causal_lm(tmp_path / "judge")
        references = ["No acute cardiopulmonary process.", "Mild cardiomegaly. No effusion.", "Clear lungs."]
        candidates = ["Normal chest.", "Heart size is enlarged; small left effusion.", "No pneumothorax seen."]
        judged = {}
        for name, settings in {"ours": dict(decode_loop="graph", decode_attention="split_kv", shared_prefix=True),
                               "generate": dict(decode_loop="generate", decode_attention="transformers")}.items():
            judge = GreenJudge.from_pretrained(path, "float32", device="cpu", batch_size=3, max_new_tokens=3,
                                               **settings)
            with torch.no_grad():  # sharpen the random attention so that a wrong key shows in the tokens
                judge.model.model.layers[0].self_attn.q_proj.weight.mul_(8)
            judged[name] = judge.judge(references, candidates)
        assert shared_calls and all(shared_calls)
        assert judged["ours"] == judged["generate"] and len(set(judged["ours"])) > 1
