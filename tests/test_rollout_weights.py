"""rl.rollout_weights=merged: the rollouts decode with a bf16 (here also float32) rounding of W + scaling * B @ A
in buffers kept for the run, the base weights and adapters restored afterwards; same greedy tokens as the adapter."""
import pytest
import torch

from conftest import compose_cfg


def _policy(base_overrides, dtype: str, seed: int = 0):
    """The tiny Qwen3-VL with a fresh LoRA whose B is nonzero (PEFT starts B at 0: the adapter would do nothing)."""
    from flare_exp.models.loading import load_model

    cfg = compose_cfg(["stage=rl", *base_overrides, f"model.dtype={dtype}"])
    loaded = load_model(cfg.model, training=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in loaded.model.modules():
            if hasattr(module, "lora_B"):
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    return cfg, loaded


def _expected(entry, base):
    """W + scaling * (B @ A) in float32, rounded once to W's dtype."""
    layer = entry.layer
    product = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    return (base.float() + layer.scaling["default"] * product).to(base.dtype)


def _batch(cfg, loaded, demo_prepared, rows: int = 4):
    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.runtime import abspath

    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    records = read_jsonl(demo_prepared / "train.jsonl")
    return chat.generation_batch(records[:rows // 2] + records[-(rows - rows // 2):])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_buffers_then_the_original_weights_and_adapters(base_overrides, dtype):
    from flare_exp.models.rollout_weights import MergedCopy, lora_layers

    _, loaded = _policy(base_overrides, dtype)
    layers, why = lora_layers(loaded.model)
    assert why is None and len(layers) > 10
    copy = MergedCopy(layers)
    before = {e.name: (e.weight, e.weight.data_ptr(), e.weight.detach().clone()) for e in layers}

    def restored():
        for e in layers:
            parameter, address, values = before[e.name]
            assert e.weight is parameter and e.weight.data_ptr() == address and torch.equal(e.weight, values)
            assert not e.layer.disable_adapters

    with copy.swapped():
        for e in layers:
            assert e.weight is before[e.name][0] and e.weight.data_ptr() == e.buffer.data_ptr()
            assert e.buffer.dtype == before[e.name][2].dtype and e.layer.disable_adapters
            assert torch.equal(e.weight, _expected(e, before[e.name][2])), e.name
    restored()
    assert not torch.equal(layers[0].buffer, before[layers[0].name][2])  # the adapter moved the weight
    with pytest.raises(RuntimeError, match="rollout failed"):
        with copy.swapped():
            raise RuntimeError("rollout failed")
    restored()


def test_merged_rollout_decodes_the_adapters_tokens(base_overrides, demo_prepared):
    """Greedy tokens through the graph loop (uncompiled on a CPU): the same with the merged copy as with the
    float32 policy's adapter; its logits close, and far from the base model's (the adapter matters)."""
    from transformers import GenerationConfig

    from flare_exp.models.decoding import decoder_for
    from flare_exp.models.rollout_weights import RolloutWeights
    from flare_exp.stages.rl import rollout_settings

    cfg, loaded = _policy(base_overrides, "float32")
    policy = loaded.model.eval()
    batch = _batch(cfg, loaded, demo_prepared)
    tokenizer = loaded.processor.tokenizer
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    graph = decoder_for(policy, rollout_settings(compose_cfg(["rl.decode_loop=graph"]).rl, "hf")).graph
    weights = RolloutWeights("merged", "hf", graph_loop=True)

    def decode():
        with torch.no_grad():
            logits = policy(**batch).logits
            return graph.generate(policy, pytest.fail, generation_config=greedy, **batch), logits

    adapter_tokens, adapter_logits = decode()
    with weights.around_rollout(policy):
        merged_tokens, merged_logits = decode()
    with policy.disable_adapter():
        _, base_logits = decode()
    assert weights.used == "merged" and graph.loop is not None
    assert torch.equal(merged_tokens, adapter_tokens)
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    assert (base_logits - adapter_logits).abs().max() > 1e-2


def test_the_next_rollout_merges_the_updated_lora_into_the_same_buffers(base_overrides, demo_prepared):
    from flare_exp.models.rollout_weights import RolloutWeights

    cfg, loaded = _policy(base_overrides, "float32")
    policy, weights = loaded.model, RolloutWeights("merged", "hf", graph_loop=True)
    with weights.around_rollout(policy):
        pass
    layers = weights.copy.layers
    buffers = [(e.buffer, e.buffer.data_ptr(), e.buffer.clone()) for e in layers]
    batch = _batch(cfg, loaded, demo_prepared, rows=2)
    policy.train()
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    policy(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    with weights.around_rollout(policy):
        for e, (buffer, address, _) in zip(layers, buffers):
            assert e.buffer is buffer and e.buffer.data_ptr() == address and e.weight.data_ptr() == address
    for e in layers:  # the buffers keep the last rollout's values; the base weight is back
        assert torch.equal(e.buffer, _expected(e, e.weight)), e.name
    assert sum(not torch.equal(e.buffer, old) for e, (_, _, old) in zip(layers, buffers)) > len(layers) // 2


def test_settings_are_checked_and_auto_keeps_the_adapter_on_a_cpu(base_overrides, caplog):
    from flare_exp.models.rollout_weights import RolloutWeights
    from flare_exp.stages.rl import check_settings

    with pytest.raises(ValueError, match=r"rl.rollout_weights='bogus': choose adapter, merged or auto"):
        check_settings(compose_cfg(["rl.rollout_weights=bogus"]))
    with pytest.raises(ValueError, match=r"rl.rollout_weights=merged is for model.backend=hf"):
        check_settings(compose_cfg(["rl.rollout_weights=merged", "model.backend=unsloth"]))
    with pytest.raises(ValueError, match=r"rl.rollout_weights=merged .* rl.use_vllm=true"):
        check_settings(compose_cfg(["rl.rollout_weights=merged", "rl.use_vllm=true", "rl.decode_loop=generate"]))
    check_settings(compose_cfg(["rl.rollout_weights=auto", "model.backend=unsloth"]))
    _, loaded = _policy(base_overrides, "float32")
    caplog.set_level("INFO", logger="flare_exp.models.rollout_weights")
    auto = RolloutWeights("auto", "hf", graph_loop=True)
    with auto.around_rollout(loaded.model):
        assert not any(m.disable_adapters for m in loaded.model.modules() if hasattr(m, "lora_A"))
    assert auto.used == "adapter" and auto.copy is None
    assert "rl.rollout_weights=auto: adapter (no GPU; the merged copy would take" in caplog.text


def test_auto_takes_the_copy_only_with_the_graph_loop_on_a_gpu_where_it_fits():
    from flare_exp.models.rollout_weights import auto_margin_bytes, auto_refusal

    gib = 2**30
    margin = auto_margin_bytes(rollout_rows=8, micro_batch=8, sequence_tokens=956)
    assert 8 * gib < margin < 11 * gib  # 2.2 (rollout) + 5.4 (training pass) + 2
    # every 2nd layer keeping its activations (rl.recompute_every_n_layers=2): half of them in the margin too
    half = auto_margin_bytes(rollout_rows=8, micro_batch=8, sequence_tokens=956, kept_share=0.5)
    assert 30 * gib < half < 34 * gib  # + 0.5 x 7.6k tokens x GRPO's measured 5.8 GiB per 1,000 kept
    assert auto_refusal(True, True, free=120 * gib, copy=8 * gib, margin=margin) is None
    assert "GiB free < the copy" in auto_refusal(True, True, free=14 * gib, copy=8 * gib, margin=margin)
    assert auto_refusal(True, False, free=120 * gib, copy=8 * gib, margin=margin) == (
        "the rollouts do not run the graph decode loop")
    assert auto_refusal(False, True, free=120 * gib, copy=8 * gib, margin=margin) == "no GPU"


def test_a_lora_variant_keeps_the_adapter_and_says_why(tiny_model_dir, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from flare_exp.models.rollout_weights import RolloutWeights

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    caplog.set_level("INFO", logger="flare_exp.models.rollout_weights")
    weights = RolloutWeights("merged", "hf", graph_loop=True)
    with weights.around_rollout(dora):
        pass
    assert weights.used == "adapter" and weights.copy is None
    assert "rl.rollout_weights=merged: the rollouts keep the adapter, because of" in caplog.text
    assert "DoraLinearVariant" in caplog.text


def test_grpo_with_merged_rollouts(base_overrides, sft_adapter, tmp_path, monkeypatch):
    from flare_exp.main import run
    from flare_exp.models.rollout_weights import MergedCopy

    refreshed = []
    original = MergedCopy.refresh
    monkeypatch.setattr(MergedCopy, "refresh", lambda self: (refreshed.append(len(self.layers)), original(self)))
    summary = run(compose_cfg(["stage=rl", *base_overrides, f"rl.init_from={sft_adapter}", "rl.max_steps=2",
                               "rl.per_device_train_batch_size=4", "rl.num_generations=2",
                               "rl.max_completion_length=8", "rl.decode_loop=graph", "rl.rollout_weights=merged"]),
                  run_dir=tmp_path / "rl")
    assert summary["global_step"] == 2 and summary["rollout_weights"] == "merged"
    assert summary["decode_loop"] == "graph" and len(refreshed) == 2 and refreshed[0] > 10


def test_a_resume_that_changes_the_rollout_weights_says_which_steps_used_which(base_overrides, sft_adapter,
                                                                               tmp_path):
    import shutil

    from flare_exp.main import run

    def rl(weights: str, steps: int):
        return compose_cfg(["stage=rl", *base_overrides, f"rl.init_from={sft_adapter}", f"rl.max_steps={steps}",
                            "rl.per_device_train_batch_size=4", "rl.num_generations=2", "rl.save_steps=2",
                            "rl.logging_steps=2",  # the second attempt's first log line is at step 4, not 3
                            "rl.max_completion_length=8", "rl.decode_loop=graph", f"rl.rollout_weights={weights}"])

    first = run(rl("adapter", 2), run_dir=tmp_path / "rl")
    assert first["rollout_weights"] == "adapter" and "rollout_weights_from_step" not in first
    shutil.rmtree(tmp_path / "rl" / "final")  # as if preempted after checkpoint-2
    (tmp_path / "rl" / "DONE").unlink()
    summary = run(rl("merged", 4), run_dir=tmp_path / "rl")
    assert summary["global_step"] == 4 and summary["rollout_weights"] == "merged"
    assert summary["rollout_weights_from_step"] == {"1": "adapter", "3": "merged"}
