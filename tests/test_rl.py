import importlib.util
import json
import shutil

import pytest
import torch

from conftest import compose_cfg
from flare_exp.main import run


def _rl_cfg(base_overrides, sft_adapter, *extra):
    return compose_cfg(["stage=rl", *base_overrides, f"rl.init_from={sft_adapter}", "rl.max_steps=2",
                        "rl.per_device_train_batch_size=4", "rl.num_generations=2", "rl.max_completion_length=8",
                        "rl.save_steps=1", "rl.save_total_limit=null", *extra])


def test_grpo_two_steps_from_the_sft_adapter(base_overrides, sft_adapter, tmp_path):
    summary = run(_rl_cfg(base_overrides, sft_adapter), run_dir=tmp_path / "rl")
    assert summary["global_step"] == 2 and summary["decode_loop"] == "generate"  # auto, on a CPU
    final = tmp_path / "rl" / "final"
    meta = json.loads((final / "flare_exp_checkpoint.json").read_text())
    assert meta["init_from"].endswith("sft/final") and (final / "adapter_config.json").exists()
    history = json.loads((tmp_path / "rl" / "log_history.json").read_text())
    logged = [h for h in history if "reward" in h]
    assert len(logged) == 2 and all("reward_std" in h and "completions/mean_length" in h for h in logged)
    assert any(k.startswith("reward_term/") for h in logged for k in h)  # per-term means reach the log
    assert json.loads((tmp_path / "rl" / "rl_summary.json").read_text())["reward_last"] == summary["reward_last"]


def test_seed_readme_batch_is_refused_with_the_fix(base_overrides, sft_adapter, tmp_path):
    cfg = _rl_cfg(base_overrides, sft_adapter, "rl.per_device_train_batch_size=5", "rl.num_generations=2")
    with pytest.raises(ValueError, match=r"5 completions .* not divisible by rl.num_generations=2.*per_device_train_batch_size=\d"):
        run(cfg, run_dir=tmp_path / "rl")


def test_long_prompts_fail_at_startup_or_are_skipped(base_overrides, sft_adapter, tmp_path):
    cfg = _rl_cfg(base_overrides, sft_adapter, "model.max_seq_length=80", "rl.max_completion_length=20")
    with pytest.raises(ValueError, match=r"longer than 60 tokens.*rl.on_too_long=skip"):
        run(cfg, run_dir=tmp_path / "a")
    summary = run(_rl_cfg(base_overrides, sft_adapter, "model.max_seq_length=80", "rl.max_completion_length=20",
                          "rl.on_too_long=skip", "rl.max_steps=1"), run_dir=tmp_path / "b")
    assert summary["skipped_too_long"] > 0
    # every prompt too long: refused, not a 0-step run whose final/ is the SFT adapter, marked DONE
    with pytest.raises(ValueError, match=r"^all \d+ prompts are longer than 5 tokens .*none is left to train on"):
        run(_rl_cfg(base_overrides, sft_adapter, "model.max_seq_length=25", "rl.max_completion_length=20",
                    "rl.on_too_long=skip", "rl.max_steps=1", "run_name=c"), run_dir=tmp_path / "c")
    assert not (tmp_path / "c" / "DONE").exists()


def test_rl_resumes_from_its_last_checkpoint(base_overrides, sft_adapter, tmp_path):
    run_dir = tmp_path / "rl"
    run(_rl_cfg(base_overrides, sft_adapter), run_dir=run_dir)
    shutil.rmtree(run_dir / "final")  # as if the job were preempted after checkpoint-2
    (run_dir / "DONE").unlink()
    summary = run(_rl_cfg(base_overrides, sft_adapter, "rl.max_steps=3"), run_dir=run_dir)
    assert summary["global_step"] == 3
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "reward" in h] == [1, 2, 3]


def test_wandb_run_id_is_stable_per_run_dir(tmp_path, monkeypatch):
    import os

    from flare_exp.training import setup_tracking

    section = compose_cfg(["rl.report_to=wandb"]).rl
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    assert setup_tracking(section, tmp_path / "job") == "wandb"
    first = os.environ["WANDB_RUN_ID"]
    setup_tracking(section, tmp_path / "job")
    assert os.environ["WANDB_RUN_ID"] == first and os.environ["WANDB_RESUME"] == "allow"
    setup_tracking(section, tmp_path / "other")
    assert os.environ["WANDB_RUN_ID"] != first
    assert os.environ["WANDB_DIR"] == str(tmp_path / "other")  # a second run in the same process: its own dir


@pytest.mark.parametrize("backend,cache,compiled,expected", [
    ("hf", "auto", None, ("static", True)), ("unsloth", "auto", None, (None, False)),
    ("hf", "dynamic", None, (None, False)), ("hf", "static", False, ("static", False)),
    ("unsloth", "static", True, ("static", True))])
def test_rollout_settings_resolve_auto_per_backend(backend, cache, compiled, expected):
    from flare_exp.stages.rl import rollout_settings

    rl = compose_cfg([f"rl.cache_implementation={cache}", f"rl.compile_generation={compiled}"
                      if compiled is not None else "rl.compile_generation=null"]).rl
    assert rollout_settings(rl, backend).generate_settings(on_gpu=False) == expected  # TRL's static cache on a CPU too


def test_compiled_rollouts_need_a_static_cache():
    from flare_exp.stages.rl import rollout_settings

    rl = compose_cfg(["rl.cache_implementation=dynamic", "rl.compile_generation=true"]).rl
    with pytest.raises(ValueError, match="rl.cache_implementation=static"):
        rollout_settings(rl, "hf").check()


def test_grpo_config_passes_scale_rewards_and_rollout_cache(tmp_path):
    from flare_exp.stages.rl import grpo_args

    cfg = compose_cfg(["model.backend=hf"])
    args = grpo_args(cfg, tmp_path, "none", bf16=False)
    assert args.scale_rewards == "none" and args.cache_implementation == "static" and args.loss_type == "dr_grpo"
    assert args.generation_kwargs is None
    assert grpo_args(cfg, tmp_path, "none", bf16=False, suppress_tokens=[3, 5]).generation_kwargs == {
        "suppress_tokens": [3, 5]}
    vllm = compose_cfg(["model.backend=hf", "rl.use_vllm=true"])
    assert grpo_args(vllm, tmp_path, "none", bf16=False, suppress_tokens=[3, 5]).generation_kwargs is None
    with pytest.raises(ValueError, match="rl.scale_rewards='std'"):
        from flare_exp.stages.rl import check_settings

        check_settings(compose_cfg(["rl.scale_rewards=std"]))
    if importlib.util.find_spec("vllm") is None:  # this machine: TRL would fail only after the model loaded
        with pytest.raises(ValueError, match="rl.use_vllm=true: vLLM is not installed"):
            check_settings(compose_cfg(["rl.use_vllm=true", "rl.decode_loop=generate"]))


def test_loss_settings_are_checked_at_startup():
    """TRL refuses an unknown loss type only when it computes the first loss (after the model is loaded and the
    first rollouts are decoded; in a pipeline, after SFT): the check runs before any step, from the list the
    installed TRL documents."""
    from flare_exp.stages.rl import check_settings, trl_loss_types

    assert {"grpo", "dr_grpo", "dapo"} <= set(trl_loss_types())
    check_settings(compose_cfg(["rl.loss_type=grpo", "rl.importance_sampling_level=token"]))
    with pytest.raises(ValueError, match="rl.loss_type='gspo': choose grpo, dr_grpo"):
        check_settings(compose_cfg(["rl.loss_type=gspo"]))
    with pytest.raises(ValueError, match="rl.importance_sampling_level='seq'"):
        check_settings(compose_cfg(["rl.importance_sampling_level=seq"]))


def test_rollouts_run_in_eval_mode_and_training_resumes(base_overrides, sft_adapter, tmp_path, monkeypatch):
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    modes = []  # (training?, tokens in this forward) per call of the first decoder layer
    layer = modeling_qwen3_vl.Qwen3VLTextDecoderLayer
    original = layer.forward

    def recording(self, hidden_states, *args, **kwargs):
        if self.self_attn.layer_idx == 0:
            modes.append((self.training, hidden_states.shape[1]))
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", recording)
    run(_rl_cfg(base_overrides, sft_adapter, "rl.max_steps=1"), run_dir=tmp_path / "rl")
    decode_steps = [training for training, tokens in modes if tokens == 1]
    assert len(decode_steps) >= 7 and not any(decode_steps)  # the rollout (8 tokens) ran in eval mode
    assert modes[-1][0] and modes[-1][1] > 1  # the policy's loss forward ran in training mode again


@pytest.mark.parametrize("settings, recomputing", [
    (("model.gradient_checkpointing=true", "rl.recompute_every_n_layers=1"), {0: True, 1: True}),
    (("model.gradient_checkpointing=true", "rl.recompute_every_n_layers=2"), {0: True, 1: False}),
    (("model.gradient_checkpointing=true", "rl.recompute_every_n_layers=0"), {0: False, 1: False}),
    (("model.gradient_checkpointing=false",), {0: False, 1: False})])  # TRL's own default would turn it on
def test_grpo_recomputes_the_layers_it_is_told_to(base_overrides, sft_adapter, tmp_path, monkeypatch, settings,
                                                  recomputing):
    """The loss forward's text layers recompute as rl.recompute_every_n_layers says (every n-th checkpointed
    layer: the tiny model's two vision blocks count first) and as model.gradient_checkpointing says."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    seen = {}
    layer = modeling_qwen3_vl.Qwen3VLTextDecoderLayer
    original = layer.__call__

    def recording(self, *args, **kwargs):
        if self.training:
            seen[self.self_attn.layer_idx] = self.gradient_checkpointing
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer, "__call__", recording)
    run(_rl_cfg(base_overrides, sft_adapter, "rl.max_steps=1", *settings), run_dir=tmp_path / "rl")
    assert seen == recomputing


def test_a_failing_compiled_decode_falls_back_to_eager_rollouts(base_overrides, sft_adapter, tmp_path, monkeypatch,
                                                                caplog):
    """Compilation only happens on GPU; here the decode step is 'compiled' into a function that fails the way
    torch.compile does, and the step must still finish, with eager rollouts and a warning."""
    import torch._dynamo.exc
    from transformers import PreTrainedModel
    from transformers.generation.utils import GenerationMixin

    attempts = []

    def failing_compiled_call(self, compile_config):
        def call(*args, **kwargs):
            attempts.append(1)
            raise torch._dynamo.exc.TorchDynamoException("backend compiler failed")
        return call

    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria",
                        lambda self, kwargs, config: not config.disable_compile)
    monkeypatch.setattr(PreTrainedModel, "get_compiled_call", failing_compiled_call)
    summary = run(_rl_cfg(base_overrides, sft_adapter, "rl.max_steps=2", "rl.cache_implementation=static",
                          "rl.compile_generation=true"), run_dir=tmp_path / "rl")
    assert summary["global_step"] == 2 and len(attempts) == 1  # tried once, then eager for good
    assert "continuing uncompiled. Pass rl.compile_generation=false" in caplog.text


def test_graph_rollouts_answer_generate_as_generate_would(base_overrides, demo_prepared):
    """TRL's rollout config (sampling, the image token suppressed, two end tokens) through the graph loop: with
    top_k=1 the draw is deterministic, so the tokens must equal the policy's own generate(); a config the loop
    cannot follow goes to generate."""
    from transformers import GenerationConfig

    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath
    from flare_exp.models.decoding import decoder_for
    from flare_exp.stages.rl import rollout_settings

    cfg = compose_cfg(["stage=rl", *base_overrides, "model.dtype=float32", "rl.decode_loop=graph"])
    loaded = load_model(cfg.model, training=True)
    policy = loaded.model.eval()
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    rows = read_jsonl(demo_prepared / "train.jsonl")
    batch = chat.generation_batch(rows[:2] + rows[-2:])
    tokenizer = chat.tokenizer
    trl_like = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1, top_p=0.9, temperature=0.7,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id,
                                                                                   tokenizer.pad_token_id],
                                cache_implementation="static", disable_compile=True)
    with torch.no_grad():
        first_pick = int(policy.generate(**batch, generation_config=trl_like)[0, batch["input_ids"].shape[1]])
        # TRL suppresses the image token; suppress the first pick too, so the suppression shows
        trl_like.suppress_tokens = [policy.config.image_token_id, first_pick]
        expected = policy.generate(**batch, generation_config=trl_like)
    assert int(expected[0, batch["input_ids"].shape[1]]) != first_pick
    graph, fallbacks = decoder_for(policy, rollout_settings(cfg.rl, "hf")).graph, []
    assert not graph.compiled  # on a CPU
    original = lambda **kw: (fallbacks.append(1), policy.generate(**kw))[1]  # noqa: E731
    with torch.no_grad():
        got = graph.generate(policy, original, generation_config=trl_like, **batch)
    assert not fallbacks and graph.loop is not None and graph.loop.cache_length % 256 == 0
    assert torch.equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == tokenizer.pad_token_id).all()
    trl_like.repetition_penalty = 1.2
    with torch.no_grad():
        graph.generate(policy, original, generation_config=trl_like, **batch)
    assert fallbacks == [1] and graph.fell_back  # the stage's summary then says decode_loop: generate


def test_grpo_with_graph_rollouts(base_overrides, sft_adapter, tmp_path, monkeypatch, caplog):
    from flare_exp.models.graph_decoding import GraphDecoder

    calls = []
    original = GraphDecoder.generate
    monkeypatch.setattr(GraphDecoder, "generate", lambda self, config, **kw: (
        calls.append(sorted(config.suppress_tokens)), original(self, config, **kw))[1])
    caplog.set_level("INFO", logger="flare_exp.stages.rl")
    summary = run(_rl_cfg(base_overrides, sft_adapter, "rl.max_steps=2", "rl.decode_loop=graph"),
                  run_dir=tmp_path / "rl")
    assert summary["global_step"] == 2 and len(calls) == 2  # one rollout per step, both through the loop
    assert summary["decode_loop"] == "graph"
    config = compose_cfg(base_overrides)  # the tiny model's vision tokens are never sampled
    from transformers import AutoConfig

    from flare_exp.stages.rl import vision_token_ids

    vision = vision_token_ids(AutoConfig.from_pretrained(config.model.path))
    assert len(vision) == 4 and calls[0] == vision
    assert "rollouts: graph decode loop" in caplog.text


def test_out_of_gpu_memory_in_grpo_says_what_to_lower(base_overrides, sft_adapter, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    def small_gpu(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GRPOTrainer, "training_step", small_gpu)
    with pytest.raises(RuntimeError, match=r"rl: the GPU ran out of memory in step 1: (set model.gradient_"
                                           r"checkpointing=true, and rerun with the same run_name: it starts again "
                                           r"from step 0 \(no checkpoint was saved yet.*\. Or )?lower "
                                           r"rl.per_device_train_batch_size=4 .*rl.num_generations=2.*"
                                           r"rl.max_completion_length=8.*that changes what the run trains, so give it "
                                           r"a new run_name="):
        run(_rl_cfg(base_overrides, sft_adapter), run_dir=tmp_path / "rl")


def test_a_task_or_dataset_the_length_limit_empties_is_named():
    """Skipping too-long records dropped whole task types (rl) or datasets (sft) with only a count in the log."""
    from flare_exp.data.vision import emptied

    before = [{"task_type": t, "dataset": d} for t, d in (("regression", "boneresorption"), ("classification", "dental"),
                                                         ("classification", "chestdr"))]
    assert emptied(before, before[1:2], "task_type") == ["regression"]
    assert emptied(before, before[1:2], "dataset") == ["boneresorption", "chestdr"]
    assert emptied(before, before, "dataset") == []


def test_a_resume_drops_the_stopped_attempts_rollouts_past_its_checkpoint(base_overrides, sft_adapter, tmp_path):
    """Killed after step 3, resumed from checkpoint-1: steps 2-3 are trained again, but rollouts.jsonl kept the
    stopped attempt's groups for them (the tester's step 8: mean total 0.55 there against the logged 0.43). They go
    and the redone steps write theirs; a rollouts.jsonl broken inside (an edit) is set aside, not a failed resume."""
    run_dir = tmp_path / "rl"
    extra = ("rl.max_steps=3", "rl.log_rollouts_steps=1")
    run(_rl_cfg(base_overrides, sft_adapter, *extra), run_dir=run_dir)
    for gone in ("final", "checkpoint-3", "checkpoint-2"):
        shutil.rmtree(run_dir / gone)
    (run_dir / "DONE").unlink()
    journal = run_dir / "rollouts.jsonl"
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2, 3]
    journal.write_text("".join(json.dumps({**r, "reference": "STALE"}) + "\n" for r in rows))
    run(_rl_cfg(base_overrides, sft_adapter, *extra), run_dir=run_dir)
    after = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["step"] for r in after if r["reference"] == "STALE"] == [r["step"] for r in rows if r["step"] == 1]
    assert sorted({r["step"] for r in after if r["reference"] != "STALE"}) == [2, 3]
    for gone in ("final", "checkpoint-3", "checkpoint-2"):
        shutil.rmtree(run_dir / gone)
    (run_dir / "DONE").unlink()
    journal.write_text('{"step": 1, "id": BROKEN\n' + journal.read_text())
    run(_rl_cfg(base_overrides, sft_adapter, *extra), run_dir=run_dir)
    assert (run_dir / "rollouts.jsonl.damaged").read_text().startswith('{"step": 1, "id": BROKEN')
    assert sorted({json.loads(line)["step"] for line in journal.read_text().splitlines()}) == [2, 3]
    # the budget lowered onto a checkpoint at it (nothing left to train): step 3's groups went there too
    shutil.rmtree(run_dir / "final")
    (run_dir / "DONE").unlink()
    run(_rl_cfg(base_overrides, sft_adapter, "rl.max_steps=2", "rl.log_rollouts_steps=1"), run_dir=run_dir)
    assert sorted({json.loads(line)["step"] for line in journal.read_text().splitlines()}) == [2]


def test_the_runs_last_reward_is_said_as_the_mean_it_is_beside_the_last_step():
    """The log's "final reward 0.5022" was the mean of the last quarter of the steps (step 12 alone: 0.3733) and
    reward_first step 1's own: both ends are kept now, and the line says which is which."""
    from flare_exp.rl_monitor.reward_summary import reward_line, summarise

    rewards = [0.36, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.2, 0.3, 0.6, 0.5334, 0.3733]
    summary = summarise([{"step": i + 1, "reward": r} for i, r in enumerate(rewards)], 12)
    assert summary["reward_last"] == 0.5022 and summary["reward_last_step"] == 0.3733
    assert summary["reward_first"] == 0.36 and summary["reward_last_steps"] == [10, 12]
    assert reward_line(summary) == ("reward 0.36 at the first logged step, mean 0.5022 over logged steps 10-12 "
                                    "(reward_last), 0.3733 at step 12")
    assert reward_line(summarise([{"step": 1, "reward": 0.5}], 1)) == "reward 0.5 at the first logged step, 0.5 at step 1"
    assert reward_line(summarise([], 0)) == "no reward logged"
    assert "reward_note" not in summary and "reward_unlogged_steps" not in summary


def test_steps_trained_after_the_last_logged_reward_are_said():
    """A run stopped after its last checkpoint (checkpoint-12 at max_steps 12) and resumed has nothing left to
    train: the stopped attempt's rewards of steps 11-12 died with it, and its numbers end at step 10. Said in the
    summary and the line, not left for a sweep to rank as the run's end."""
    from flare_exp.rl_monitor.reward_summary import reward_line, summarise

    summary = summarise([{"step": s, "reward": r} for s, r in ((5, 0.36), (10, 0.4478))], 12)
    assert summary["reward_unlogged_steps"] == [11, 12] and summary["reward_last_steps"] == [10, 10]
    assert reward_line(summary).endswith("0.4478 at step 10; no reward logged for steps 11-12 (a stopped attempt's "
                                         "unlogged steps, or rl.logging_steps not reaching the end): the reward "
                                         "numbers end at step 10")
    assert "for step 12 " in summarise([{"step": 11, "reward": 0.1}], 12)["reward_note"]
