"""model.fused_prefill: the norms, rotary embedding and SiLU x up of forwards without gradients run as compiled
functions (traced here with aot_eager on a CPU, the GPU check forced on): the same logits and greedy tokens as
transformers' own forwards; training, compiled regions and CPU tensors keep transformers' code."""
import pytest
import torch

from conftest import compose_cfg


@pytest.fixture
def fused(monkeypatch):
    """fused_prefill with aot_eager and the GPU check forced on; transformers' rotary functions restored after."""
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3_vl

    from flare_exp.models import fused_prefill

    monkeypatch.setattr(qwen3_vl, "apply_rotary_pos_emb", qwen3_vl.apply_rotary_pos_emb)
    monkeypatch.setattr(fused_prefill, "BACKEND", "aot_eager")
    monkeypatch.setattr(fused_prefill, "FAILED", [False])
    fused_prefill.compiled.cache_clear()
    calls = []
    monkeypatch.setattr(fused_prefill, "on_gpu", lambda t: calls.append(t.shape) or True)
    monkeypatch.setattr(fused_prefill, "gpu_here", lambda: True)
    yield fused_prefill, calls
    fused_prefill.compiled.cache_clear()


def _model(base_overrides, fused: str):
    from flare_exp.models.loading import load_model

    cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32", f"model.fused_prefill={fused}"])
    return cfg, load_model(cfg.model, training=False)


def _batch(cfg, loaded, demo_prepared):
    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.runtime import abspath

    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    rows = read_jsonl(demo_prepared / "val.jsonl")
    return chat.generation_batch([rows[0], rows[-1], rows[len(rows) // 2]])  # padded: lengths differ


def test_same_logits_and_tokens_as_transformers(fused, base_overrides, demo_prepared):
    from flare_exp.models.graph_decoding import GraphDecoder

    module, calls = fused
    cfg, plain = _model(base_overrides, "false")
    batch = _batch(cfg, plain, demo_prepared)
    pad = plain.processor.tokenizer.pad_token_id
    with torch.inference_mode():  # before the patched model exists: its rotary function is patched module-wide
        want = plain.model(**batch).logits
    want_tokens = GraphDecoder(plain.model, None)(batch, 8, pad)
    assert not calls
    _, patched = _model(base_overrides, "true")
    with torch.inference_mode():
        got = patched.model(**batch).logits
    layers = plain.model.config.text_config.num_hidden_layers
    assert len(calls) >= layers * 6  # norms (input, post-attention, q, k), MLP and rope of every layer
    assert (got - want).abs().max() < 1e-5
    tokens = GraphDecoder(patched.model, None)(batch, 8, pad)
    assert len(set(want_tokens[0].tolist())) > 1 and torch.equal(tokens, want_tokens)
    assert module.compiled.cache_info().currsize == 3  # norm, SiLU x up, rope
    module.compiled.cache_clear()
    with module.paused(), torch.inference_mode():  # bench.same_tokens' reference
        assert torch.equal(patched.model(**batch).logits, want)
    assert not module.compiled.cache_info().currsize


def test_gradients_and_compiled_regions_keep_transformers_code(fused, base_overrides, demo_prepared):
    module, calls = fused
    cfg, loaded = _model(base_overrides, "true")
    batch = _batch(cfg, loaded, demo_prepared)
    with torch.enable_grad():
        loaded.model(**batch).logits.sum().backward()
    assert not module.compiled.cache_info().currsize  # nothing compiled: every wrapper stepped aside
    norm = loaded.model.model.language_model.norm
    hidden = torch.randn(2, 5, norm.weight.shape[0])
    traced = torch.compile(lambda h: norm(h), backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(traced(hidden), type(norm).forward(norm, hidden))
    assert not module.compiled.cache_info().currsize


def test_on_a_cpu_nothing_is_patched_or_compiled_and_patching_twice_changes_nothing(base_overrides, monkeypatch):
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3_vl

    from flare_exp.models import fused_prefill

    monkeypatch.setattr(qwen3_vl, "apply_rotary_pos_emb", qwen3_vl.apply_rotary_pos_emb)
    original = qwen3_vl.apply_rotary_pos_emb
    _, loaded = _model(base_overrides, "true")  # the default: nothing of transformers' is patched without a GPU
    assert qwen3_vl.apply_rotary_pos_emb is original and not any("forward" in vars(m) for m in loaded.model.modules()
                                                                  if type(m).__name__ in fused_prefill.NORM_CLASSES)
    monkeypatch.setattr(fused_prefill, "gpu_here", lambda: True)  # patched as on a GPU: CPU tensors step aside
    assert fused_prefill.use_fused_prefill(loaded.model, True) > 0
    rope = qwen3_vl.apply_rotary_pos_emb
    assert getattr(rope, fused_prefill.FUSED) is original
    assert fused_prefill.use_fused_prefill(loaded.model, True) == 0 and qwen3_vl.apply_rotary_pos_emb is rope
    fused_prefill.compiled.cache_clear()
    with torch.inference_mode():
        loaded.model.model.language_model.norm(torch.randn(2, 3, loaded.model.config.text_config.hidden_size))
    assert not fused_prefill.compiled.cache_info().currsize
    assert fused_prefill.use_fused_prefill(loaded.model, False) == 0


def test_a_compilation_that_fails_leaves_transformers_code_said_once(fused, base_overrides, demo_prepared, monkeypatch,
                                                                     caplog):
    module, calls = fused

    def broken(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(module, "BACKEND", broken)
    cfg, loaded = _model(base_overrides, "true")
    batch = _batch(cfg, loaded, demo_prepared)
    with torch.inference_mode():
        with module.paused():
            want = loaded.model(**batch).logits
        got = loaded.model(**batch).logits
        again = loaded.model(**batch).logits
    assert torch.equal(got, want) and torch.equal(again, want)
    said = [r.message for r in caplog.records if "compiling model.fused_prefill's" in r.message]
    assert len(said) == 1 and "transformers' own code" in said[0]


def test_norms_patched_before_keep_their_kernels(fused, base_overrides, monkeypatch):
    """Liger binds its RMSNorm into each norm of the model it trains and swaps the module's rotary function: the
    fused prefill leaves both to it (training keeps Liger's kernels)."""
    import types

    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3_vl

    module, _ = fused
    liger_calls = []

    def liger_norm(self, hidden):
        liger_calls.append(1)
        return type(self).forward(self, hidden)

    def liger_rope(*args, **kwargs):
        return liger_rope.original(*args, **kwargs)

    liger_rope.original = qwen3_vl.apply_rotary_pos_emb
    monkeypatch.setattr(qwen3_vl, "apply_rotary_pos_emb", liger_rope)
    cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32", "model.fused_prefill=false"])
    from flare_exp.models.loading import load_model

    loaded = load_model(cfg.model, training=False)
    norms = [m for m in loaded.model.modules() if type(m).__name__ == "Qwen3VLTextRMSNorm"]
    for norm in norms:
        norm.forward = types.MethodType(liger_norm, norm)
    patched = module.use_fused_prefill(loaded.model, True)
    assert patched == len([m for m in loaded.model.modules() if type(m).__name__ == "Qwen3VLTextMLP"])
    assert qwen3_vl.apply_rotary_pos_emb is liger_rope
    with torch.inference_mode():
        norms[0](torch.randn(2, 3, norms[0].weight.shape[0]))
    assert liger_calls == [1]
