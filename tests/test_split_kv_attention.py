"""model.decode_attention=split_kv: the Triton decode kernel gives SDPA's attention (any boolean mask, grouped
and plain heads, one slice or several) and the graph loop's tokens equal generate's with transformers' own
attention. The kernels run under Triton's CPU interpreter, which must be chosen before Triton is first imported:
``test_kernels_under_the_interpreter`` runs this file's interpreter tests in a child pytest with
TRITON_INTERPRET=1 (they exist only there). The GPU numbers are in docs/performance.md."""
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


@pytest.mark.skipif(INTERPRETED, reason="the child run itself")
def test_kernels_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            "--basetemp", str(tmp_path / "child"), __file__], env=env, capture_output=True,
                           text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
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


if INTERPRETED:  # the child run's tests (test_kernels_under_the_interpreter)
    def test_the_self_check_agrees_and_catches_a_wrong_kernel(interpreter, monkeypatch):
        """Run at load time on a GPU: a kernel that compiles wrongly or not at all keeps SDPA, with the reason."""
        assert interpreter.self_check("cpu", torch.float32, 32) is None
        monkeypatch.setattr(interpreter, "attend", lambda q, k, v, m: torch.zeros(2, 1, 8, 32))
        assert interpreter.self_check("cpu", torch.float32, 32).startswith("differs from SDPA by")
        monkeypatch.setattr(interpreter, "attend", lambda *a: 1 / 0)
        assert interpreter.self_check("cpu", torch.float32, 32).startswith("ZeroDivisionError")

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
