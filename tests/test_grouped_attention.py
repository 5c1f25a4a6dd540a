"""model.decode_attention=grouped: decode steps of a padded batch attend per key/value head without copying the
cache, with the same outputs as transformers' sdpa path."""
import pytest
import torch

from conftest import compose_cfg


class _Attention(torch.nn.Module):
    num_key_value_groups, is_causal, training = 4, True, False


def _decode_inputs(q_len=1):
    torch.manual_seed(0)
    batch, kv_heads, keys, dim = 3, 2, 11, 16
    query = torch.randn(batch, kv_heads * 4, q_len, dim)
    key, value = torch.randn(batch, kv_heads, keys, dim), torch.randn(batch, kv_heads, keys, dim)
    mask = torch.ones(batch, 1, q_len, keys + 5, dtype=torch.bool)  # a static cache's mask is longer than needed
    mask[0, ..., :4] = False  # left padding
    mask[2, ..., :7] = False
    return query, key, value, mask


def test_grouped_decode_matches_transformers_without_copying_the_cache(monkeypatch):
    from transformers.integrations import sdpa_attention

    from flare_exp.models.grouped_attention import grouped_decode_attention

    query, key, value, mask = _decode_inputs()
    with pytest.raises(RuntimeError):  # transformers' SDPA path takes a mask only as long as the keys
        sdpa_attention.sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention.sdpa_attention_forward(_Attention(), query, key, value, mask[..., :11], scaling=0.25)

    def no_copies(*_):
        raise AssertionError("repeat_kv called: the cache was copied per query head")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_copies)
    got, weights = grouped_decode_attention(_Attention(), query, key, value, mask, scaling=0.25)
    assert weights is None and got.shape == expected.shape == (3, 1, 8, 16) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the layout matters: pairing query heads with the wrong key/value head changes the result
    wrong = query.reshape(3, 4, 2, 1, 16).transpose(1, 2).reshape(3, 8, 1, 16)
    assert not torch.allclose(grouped_decode_attention(_Attention(), wrong, key, value, mask, scaling=0.25)[0],
                              expected, atol=1e-3)


def test_grouped_decode_traces_as_one_graph():
    """transformers compiles the static-cache decode step: the function must not break the graph."""
    from flare_exp.models.grouped_attention import grouped_decode_attention

    module = _Attention()
    for q_len in (1, 3):  # the grouped path, and the delegation to transformers (prefill, compiled blocks)
        query, key, value, mask = _decode_inputs(q_len)
        compiled = torch.compile(lambda *t: grouped_decode_attention(module, *t)[0], fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(query, key, value, mask),
                                   grouped_decode_attention(module, query, key, value, mask)[0])


def test_prefill_and_unmasked_steps_keep_transformers_path(monkeypatch):
    from transformers.integrations import sdpa_attention

    from flare_exp.models.grouped_attention import grouped_decode_attention

    seen = []
    original = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: (seen.append(1), original(*a, **kw))[1])
    query, key, value, mask = _decode_inputs(q_len=3)
    grouped_decode_attention(_Attention(), query, key, value, mask)  # prefill: many query tokens
    query, key, value, _ = _decode_inputs()
    grouped_decode_attention(_Attention(), query, key, value, None)  # no padding: SDPA shares heads itself
    assert len(seen) == 2


@pytest.mark.parametrize("cache", [None, "static"])
def test_generation_is_unchanged(cache, base_overrides, demo_prepared, monkeypatch):
    from omegaconf import OmegaConf

    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.grouped_attention import NAME
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32", "model.decode_attention=grouped"])
    loaded = load_model(cfg.model, training=False)
    model = loaded.model
    text_config, vision_config = model.config.text_config, model.config.vision_config
    assert text_config._attn_implementation == NAME and vision_config._attn_implementation == "sdpa"
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    rows = read_jsonl(demo_prepared / "val.jsonl")
    records = [r for r in rows if r["dataset"] == "IU_XRay"][:2] + [r for r in rows if r["dataset"] != "IU_XRay"][:2]
    batch = chat.generation_batch(records)
    assert not batch["attention_mask"].all()  # padded: transformers would copy the cache per query head
    with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen them so the math shows
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8)

    grouped_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, *a, **kw: (
        grouped_calls.append(1) if q.shape[1] == k.shape[1] == 2 and q.shape[2] == 2 and k.shape[2] > 2 else None,
        sdpa(q, k, *a, **kw))[1])

    def run():
        kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                      pad_token_id=chat.tokenizer.pad_token_id)
        if cache:
            kwargs.update(cache_implementation=cache, disable_compile=True)
        with torch.inference_mode():
            return model.generate(**batch, **kwargs)

    grouped = run()
    assert len(grouped_calls) >= 2 * 5  # two layers, at least five decode steps
    text_config._attn_implementation = "sdpa"
    reference = run()
    assert torch.equal(grouped.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(grouped.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)
    # the infer stage's own decoding sees the switch too
    text_config._attn_implementation = NAME
    from flare_exp.models.batch_decoding import generate

    inf = OmegaConf.create({"max_new_tokens": 4, "do_sample": False})
    assert len(generate(model, chat, records, inf, cache=cache, compile_decode=False)) == 4


def test_settings(base_overrides):
    from flare_exp.models.loading import load_model

    model = load_model(compose_cfg(["stage=infer", *base_overrides, "model.decode_attention=transformers"]).model,
                       training=False).model
    assert model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="model.decode_attention='fast'"):
        load_model(compose_cfg(["stage=infer", *base_overrides, "model.decode_attention=fast"]).model)


@pytest.mark.parametrize("policy", [False, True])  # infer's model; rl's LoRA policy (its casting flag inside)
def test_compiled_decoding_traces_one_graph(policy, base_overrides, demo_prepared):
    """transformers' own compiled decode step (static cache), forced onto the CPU with the eager backend: one
    full graph with the grouped attention inside, the same tokens as uncompiled decoding."""
    import torch._dynamo
    from transformers import CompileConfig

    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    loaded = load_model(compose_cfg(["stage=infer", *base_overrides]).model, training=policy)
    loaded.model.eval()  # rl's rollouts run in eval mode too
    chat = VisionChat(loaded.processor, abspath(compose_cfg(base_overrides).data.root))
    rows = read_jsonl(demo_prepared / "val.jsonl")
    batch = chat.generation_batch([r for r in rows if r["dataset"] == "IU_XRay"][:2] +
                                  [r for r in rows if r["dataset"] != "IU_XRay"][:2])
    compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True
    kwargs = dict(max_new_tokens=5, do_sample=False, cache_implementation="static",
                  pad_token_id=chat.tokenizer.pad_token_id)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        compiled = loaded.model.generate(**batch, compile_config=compile_config, **kwargs)
        eager = loaded.model.generate(**batch, disable_compile=True, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, eager)
