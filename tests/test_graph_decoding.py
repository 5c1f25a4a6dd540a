"""infer.decode_loop=graph: one compiled step per token gives generate()'s tokens (padding, early stops, a reused
cache) and traces as one graph."""
import pytest
import torch

from conftest import compose_cfg


def _model_and_batches(base_overrides, demo_prepared, decode_attention="grouped"):
    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32",
                       f"model.decode_attention={decode_attention}"])
    loaded = load_model(cfg.model, training=False)
    with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen them so padding mistakes show
        for layer in loaded.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    rows = read_jsonl(demo_prepared / "val.jsonl")
    rows.sort(key=lambda r: chat.sequence_length(r, with_answer=False), reverse=True)
    first = chat.generation_batch([rows[0], rows[len(rows) // 2], rows[-6], rows[-5]])  # lengths differ: padded
    second = chat.generation_batch(rows[-4:])  # shorter prompts: the first batch's cache is reused
    assert not first["attention_mask"].all()
    assert second["input_ids"].shape[1] < first["input_ids"].shape[1]
    return loaded.model, chat.tokenizer.pad_token_id, first, second


def _generate(model, batch, pad, new_tokens):
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                             disable_compile=True, pad_token_id=pad)
    return out[:, batch["input_ids"].shape[1]:]


def _assert_same(ours, reference, pad):
    """generate stops when every row has finished; the loop may run a few pad tokens longer."""
    assert ours.shape[1] >= reference.shape[1]
    assert torch.equal(ours[:, :reference.shape[1]], reference)
    assert (ours[:, reference.shape[1]:] == pad).all()


@pytest.mark.parametrize("decode_attention", ["grouped", "transformers"])
def test_same_tokens_as_generate(decode_attention, base_overrides, demo_prepared):
    from flare_exp.models.graph_decoding import GraphDecoder

    model, pad, first, second = _model_and_batches(base_overrides, demo_prepared, decode_attention)
    loop = GraphDecoder(model, None)
    for batch in (first, second, first):
        reference = _generate(model, batch, pad, 8)
        assert len(set(reference[0].tolist())) > 1  # not one repeated token: the positions matter
        _assert_same(loop(batch, 8, pad), reference, pad)
    # the second batch needs less than half the first's cache: a cache of its own, then the first's again
    assert loop.cache_length == first["input_ids"].shape[1] + 8


def test_rows_end_at_their_own_limits(base_overrides, demo_prepared):
    """row_limits (the benchmark's answer-length mix): each row is generate's tokens up to its limit, then pad;
    the loop stops once every row reached its limit."""
    from flare_exp.models.graph_decoding import GraphDecoder

    model, pad, first, _ = _model_and_batches(base_overrides, demo_prepared)
    reference = _generate(model, first, pad, 8)
    limits = [2, 8, 1, 5]
    ours = GraphDecoder(model, None, stop_check_every=1)(first, 8, pad, row_limits=limits)
    for row, limit in enumerate(limits):
        assert torch.equal(ours[row, :limit], reference[row, :limit]) and (ours[row, limit:] == pad).all()
    short = GraphDecoder(model, None, stop_check_every=1)(first, 8, pad, row_limits=[2, 3, 1, 2])
    assert short.shape[1] == 3  # the host saw every row finished: no token past the longest limit


def test_rows_that_finish_early(base_overrides, demo_prepared):
    from flare_exp.models.graph_decoding import GraphDecoder

    model, pad, first, _ = _model_and_batches(base_overrides, demo_prepared)
    free = _generate(model, first, pad, 8)
    model.generation_config.eos_token_id = int(free[0, 2])  # row 0 ends at its third token; others may not
    reference = _generate(model, first, pad, 8)
    _assert_same(GraphDecoder(model, None)(first, 8, pad), reference, pad)
    assert (reference[0, 3:] == pad).all()

    model.generation_config.eos_token_id = sorted(set(free[:, 1].tolist()))  # every row ends at its second
    reference = _generate(model, first, pad, 8)
    ours = GraphDecoder(model, None, stop_check_every=1)(first, 8, pad)
    assert reference.shape[1] == 2 and torch.equal(ours, reference)  # the loop stopped too
    ours = GraphDecoder(model, None, stop_check_every=4)(first, 8, pad)
    assert ours.shape[1] == 5  # it looks every 4th token: tokens 2-4 are pad
    _assert_same(ours, reference, pad)

    model.generation_config.min_new_tokens = 5  # end tokens banned before the fifth, as generate's processor
    reference = _generate(model, first, pad, 8)
    assert reference.shape[1] >= 5
    _assert_same(GraphDecoder(model, None)(first, 8, pad), reference, pad)


def test_the_host_waits_only_at_stop_checks(base_overrides, demo_prepared):
    """Reading a GPU value on the host (item, bool) waits for the GPU: 32 tokens may read it twice (the checks
    after tokens 1 and 17), never per token. Counted as the ops that read a value back, on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flare_exp.models.graph_decoding import GraphDecoder

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero"):
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    model, pad, first, _ = _model_and_batches(base_overrides, demo_prepared)
    model.generation_config.eos_token_id = 0  # the pad token: never picked, so no row ends early
    reads = {}
    for tokens in (1, 32):
        HostReads.count = 0
        with HostReads():
            GraphDecoder(model, None)(first, tokens, pad)
        reads[tokens] = HostReads.count  # the prefill's (transformers' vision code) plus the loop's
    assert reads[32] - reads[1] == 2


def test_token_step_traces_as_one_graph(base_overrides, demo_prepared):
    """The step (model, mask, greedy pick, stop flags) compiles as one full graph (eager backend: CPU), once
    for a run: another batch of the same size reuses the cache and the graph (prompts of 133 and 44 tokens
    + 60 new: the kept cache is less than twice as long as the second batch needs)."""
    import torch._dynamo

    from flare_exp.models.graph_decoding import GraphDecoder

    model, pad, first, second = _model_and_batches(base_overrides, demo_prepared)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loop = GraphDecoder(model, dict(backend="eager", fullgraph=True, dynamic=False))
    for batch in (first, second):
        _assert_same(loop(batch, 60, pad), _generate(model, batch, pad, 60), pad)
    assert loop.cache_length == first["input_ids"].shape[1] + 60
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("sampling", [(0.7, 20, 0.8), (1.0, None, 0.5), (1.3, 5, 1.0), (1.0, None, 1.0)])
def test_sampling_warps_as_generate(sampling):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from flare_exp.models.graph_decoding import Sampling, sampling_scores

    temperature, top_k, top_p = sampling
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    expected = warpers(torch.zeros(4, 1, dtype=torch.long), scores.clone())
    got = sampling_scores(scores, Sampling(temperature, top_k, top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and (top_k is None and top_p == 1.0
                                                                     or torch.isinf(got).any())
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_draws_follow_the_warped_distribution():
    from flare_exp.models.graph_decoding import Sampling, pick, sampling_scores

    torch.manual_seed(0)
    scores = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).expand(40000, -1)
    sampling = Sampling(temperature=0.8, top_k=4)
    is_end, never = torch.arange(6) == 0, torch.tensor([False])  # token 0 is an end token, banned for now
    none = torch.zeros(6, dtype=torch.bool)
    drawn = pick(scores, is_end, never, none, sampling)
    expected = sampling_scores(scores[:1].masked_fill(torch.arange(6) == 0, float("-inf")), sampling).softmax(-1)[0]
    frequencies = torch.bincount(drawn, minlength=6) / len(drawn)
    assert frequencies[0] == 0 and frequencies[5] == 0  # the banned end token; beyond the top 4 of the rest
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    assert torch.equal(pick(scores[:3], is_end, torch.tensor([True]), none), torch.zeros(3, dtype=torch.long))
    assert torch.equal(pick(scores[:3], is_end, torch.tensor([True]), is_end), torch.ones(3, dtype=torch.long))


def test_sampling_with_one_candidate_is_greedy(base_overrides, demo_prepared):
    from flare_exp.models.graph_decoding import GraphDecoder, Sampling

    model, pad, first, _ = _model_and_batches(base_overrides, demo_prepared)
    greedy = GraphDecoder(model, None)(first, 8, pad)
    assert torch.equal(GraphDecoder(model, None, sampling=Sampling(0.7, top_k=1))(first, 8, pad), greedy)
    sampled = [GraphDecoder(model, None, sampling=Sampling(1.5))(first, 8, pad) for _ in range(2)]
    assert not torch.equal(sampled[0], sampled[1])  # drawn, not picked


def test_settings_it_cannot_follow():
    from transformers import GenerationConfig

    from flare_exp.models.graph_decoding import Sampling, end_token_ids, sampling_of, unsupported_settings

    assert unsupported_settings(GenerationConfig(repetition_penalty=1.0, top_k=20, temperature=0.7)) == []
    assert unsupported_settings(GenerationConfig(repetition_penalty=1.1, no_repeat_ngram_size=3)) == [
        "generation_config.repetition_penalty=1.1", "generation_config.no_repeat_ngram_size=3"]
    assert unsupported_settings(GenerationConfig(min_p=0.1)) == []  # a warper: only when sampling
    assert unsupported_settings(GenerationConfig(min_p=0.1, do_sample=True)) == ["generation_config.min_p=0.1"]
    assert end_token_ids(GenerationConfig(eos_token_id=[5, 7])) == [5, 7]
    assert sampling_of(GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)) == Sampling(0.7, 20, 0.8)
    assert sampling_of(GenerationConfig(do_sample=True, top_k=None)) == Sampling(1.0, None, 1.0)
    assert sampling_of(GenerationConfig(do_sample=False, temperature=0.7)) is None
    with pytest.raises(ValueError, match="no eos_token_id"):
        end_token_ids(GenerationConfig())


def test_infer_stage_with_the_graph_loop(base_overrides, sft_adapter, tmp_path, caplog):
    """The stage's predictions with the loop equal generate's (static cache): a LoRA checkpoint, two full
    batches and a smaller last one (which generate decodes); sampled decoding runs too."""
    from flare_exp.io import read_jsonl
    from flare_exp.main import run

    caplog.set_level("INFO", logger="flare_exp.stages.infer")
    caplog.set_level("INFO", logger="flare_exp.models.decoding")
    common = ["stage=infer", *base_overrides, f"infer.checkpoint={sft_adapter}", "infer.batch_size=3",
              "infer.num_samples=7", "infer.max_new_tokens=6", "infer.cache_implementation=static"]
    predictions = {}
    for loop in ("generate", "graph"):
        cfg = compose_cfg([*common, f"infer.decode_loop={loop}", f"run_name=infer-{loop}"])
        assert run(cfg, run_dir=tmp_path / loop)["decode_loop"] == loop
        predictions[loop] = {r["id"]: r["prediction"] for r in read_jsonl(tmp_path / loop / "predictions.jsonl")}
    assert len(predictions["graph"]) == 7 and predictions["graph"] == predictions["generate"]
    assert "infer.decode_loop=graph: the graph loop, one uncompiled step per token" in caplog.text

    cfg = compose_cfg([*common, "infer.decode_loop=graph", "infer.do_sample=true", "infer.temperature=0.7",
                       "run_name=infer-sampled"])
    run(cfg, run_dir=tmp_path / "sampled")
    assert len(read_jsonl(tmp_path / "sampled" / "predictions.jsonl")) == 7
    assert "generate instead" not in caplog.text  # sampled through the loop


@pytest.mark.parametrize("setting, backend, compiled_static_on_gpu, chosen", [
    ("auto", "hf", True, True),  # where generate would run a compiled static-cache step: measured faster
    ("auto", "hf", False, False),  # CPU, a dynamic cache or compilation off: generate
    ("auto", "unsloth", True, False),
    ("graph", "hf", False, True),  # asked for: runs uncompiled off the GPU
    ("graph", "unsloth", True, False),  # transformers' forward only: generate, said
    ("generate", "hf", True, False),
])
def test_which_decode_loop_runs(setting, backend, compiled_static_on_gpu, chosen, caplog):
    from flare_exp.models.decoding import graph_loop_chosen

    assert graph_loop_chosen("infer.decode_loop", setting, backend, compiled_static_on_gpu) is chosen
    assert ("backend=hf only" in caplog.text) == (setting == "graph" and backend == "unsloth")


def test_one_decoding_object_for_every_section():
    """decoder_for resolves infer's, the rollouts' and the judges' settings by one rule (no model is run)."""
    from types import SimpleNamespace

    from flare_exp.models.decoding import DecodeSettings, decoder_for

    model = SimpleNamespace(device=torch.device("cpu"))
    infer = decoder_for(model, DecodeSettings("infer"), on_gpu=True)
    assert (infer.cache, infer.compiled, infer.graph.compiled, infer.used) == ("static", True, True, "graph")
    assert decoder_for(model, DecodeSettings("infer")).graph is None  # auto on a CPU: generate, dynamic cache
    rl = decoder_for(model, DecodeSettings("rl", static_on_cpu=True))  # TRL's static cache on a CPU too
    assert (rl.cache, rl.compiled, rl.graph) == ("static", True, None)
    assert decoder_for(model, DecodeSettings("rl", vllm=True), on_gpu=True).graph is None
    with pytest.raises(ValueError, match="rl.use_vllm=true"):
        decoder_for(model, DecodeSettings("rl", "graph", vllm=True))
    refused = DecodeSettings("eval.crimson", refusal="its sliding-window attention layers")
    assert decoder_for(model, refused, on_gpu=True).graph is None
    with pytest.raises(ValueError, match="eval.crimson.decode_loop=graph.*sliding-window"):
        decoder_for(model, DecodeSettings("eval.crimson", "graph", refusal="its sliding-window attention layers"))
    with pytest.raises(ValueError, match="eval.green.decode_loop='fast'"):
        decoder_for(model, DecodeSettings("eval.green", "fast"))
    off = decoder_for(model, DecodeSettings("rl", "graph", compile=False, cache_implementation="static"), on_gpu=True)
    assert not off.graph.compiled and off.used == "graph"  # rl.compile_generation=false: the loop uncompiled


def test_the_infer_default_on_cpu_is_generate(base_overrides, sft_adapter, tmp_path, caplog):
    """decode_loop=auto on a CPU: transformers' generate (the loop is chosen only where it was measured)."""
    from flare_exp.main import run

    caplog.set_level("INFO", logger="flare_exp.stages.infer")
    caplog.set_level("INFO", logger="flare_exp.models.decoding")
    cfg = compose_cfg(["stage=infer", *base_overrides, f"infer.checkpoint={sft_adapter}", "infer.num_samples=2",
                       "infer.max_new_tokens=3", "run_name=infer-auto"])
    assert cfg.infer.decode_loop == "auto" and cfg.rl.decode_loop == "auto"
    assert run(cfg, run_dir=tmp_path / "auto")["decode_loop"] == "generate"
    assert "graph loop" not in caplog.text


@pytest.mark.parametrize("kept_length, batch_size, needed, reused", [
    (100, 4, 100, True), (100, 4, 51, True),  # long enough, at most twice the need
    (100, 4, 49, False),  # more than twice as long: every token would attend over the idle half
    (100, 4, 101, False), (100, 8, 60, False),  # too short; another batch size
])
def test_a_kept_cache_is_reused_only_when_it_fits(kept_length, batch_size, needed, reused, tiny_model_dir):
    """After a batch of large images the cache is not kept for much shorter prompts."""
    from types import SimpleNamespace

    from transformers import Qwen3VLForConditionalGeneration

    from flare_exp.models.graph_decoding import GraphDecoder

    loop = GraphDecoder(Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir), None)
    kept = SimpleNamespace(reset=lambda: None)
    loop.cache, loop.cache_shape = kept, (4, kept_length)
    cache = loop._static_cache(batch_size, needed)
    assert (cache is kept) == reused and loop.cache is cache
    assert reused or loop.cache_shape == (batch_size, needed)
    loop = GraphDecoder(loop.model, None, shrink_cache=False)  # GRPO's rollouts: long enough is kept
    loop.cache, loop.cache_shape = kept, (4, kept_length)
    assert (loop._static_cache(batch_size, needed) is kept) == (batch_size == 4 and needed <= kept_length)


def test_the_input_gradient_hooks_are_off_while_the_loop_decodes(base_overrides, demo_prepared):
    """TRL sets transformers' enable_input_require_grads hooks on a PEFT policy trained with gradient
    checkpointing; their requires_grad_ breaks the compiled step's graph (torch 2.11): off while decoding, the
    same hooks back after, in their order."""
    from flare_exp.models.graph_decoding import GraphDecoder
    from flare_exp.models.loading import load_model

    cfg = compose_cfg(["stage=rl", *base_overrides, "model.gradient_checkpointing=true"])
    policy = load_model(cfg.model, training=True).model
    policy.enable_input_require_grads()  # as TRL does, on the PEFT model
    embeddings = policy.get_input_embeddings()
    hooks_seen = []
    embeddings.register_forward_hook(lambda module, *_: hooks_seen.append(len(module._forward_hooks)))
    before = list(embeddings._forward_hooks.items())
    assert sum(getattr(h, "__name__", "") == "make_inputs_require_grads" for _, h in before) >= 2  # loading's, TRL's
    _, pad, first, _ = _model_and_batches(base_overrides, demo_prepared)
    GraphDecoder(policy.eval(), None)(first, 4, pad)
    assert hooks_seen and set(hooks_seen) == {1}  # only this test's hook ran in the decode
    assert list(embeddings._forward_hooks.items()) == before  # back, in their order
    with torch.enable_grad():
        assert embeddings(first["input_ids"][:, :3]).requires_grad  # they work again
