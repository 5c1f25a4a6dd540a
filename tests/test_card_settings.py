"""Settings sized by the card's memory (flare_exp/card.py), against a faked card: the SFT split keeps the
effective batch, the batch sizes set to auto follow the memory, a value the user sets stays, no GPU keeps the CPU
defaults; the compile cache and the quiet GPU messages."""
import logging
import types
import warnings

import pytest
import torch

from conftest import compose_cfg
from flare_exp import card as card_module
from flare_exp.card import Card, apply_rl_card, green_batch, infer_batch, sized_infer_batch
from flare_exp.stages.sft_card import apply_card_preset


@pytest.fixture
def card(monkeypatch):
    """A CUDA card of the given memory as torch reports it (no GPU here); memory["gib"] = None: no GPU."""
    memory = {"gib": 80}
    monkeypatch.delenv(card_module.CARD_GIB_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: memory["gib"] is not None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name="NVIDIA FAKE", total_memory=memory["gib"] * 2 ** 30))
    return memory


def _sft(base_overrides, *extra):
    return compose_cfg(["stage=sft", *base_overrides, "model.gradient_checkpointing=true",
                        "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=4", *extra])


# card GiB -> (micro-batch, accumulation, token budget), infer batch (256 new tokens), GREEN batch (2,048 tokens)
SIZED = {141: ((16, 1, 12000), 128, 96), 80: ((8, 2, 6500), 128, 48), 48: ((16, 1, 3500), 120, 24),
         40: ((16, 1, 2500), 96, 16), 24: ((16, 1, 1000), 40, 7)}


@pytest.mark.parametrize("gib", sorted(SIZED))
def test_every_stage_sizes_itself_to_the_card(base_overrides, card, gib, caplog):
    caplog.set_level(logging.INFO, logger="flare_exp")
    card["gib"] = gib
    (micro, accumulation, budget), infer, green = SIZED[gib]
    cfg = _sft(base_overrides)
    used, changed, found, why = apply_card_preset(cfg)
    assert (used.sft.per_device_train_batch_size, used.sft.gradient_accumulation_steps) == (micro, accumulation)
    assert micro * accumulation == 16 and used.sft.recompute_above_tokens == budget  # the same samples per step
    assert used.sft.compile_layers is True
    assert (cfg.sft.per_device_train_batch_size, cfg.sft.compile_layers) == (4, False)  # the configured: kept
    assert found.gib == gib and f"({gib} GiB, total)" in why and f"({gib} GiB" in caplog.text
    assert changed["sft.per_device_train_batch_size"] == [4, micro]
    assert infer_batch(found, 256)[0] == infer and green_batch(found, 2048)[0] == green
    sized, choice = sized_infer_batch(compose_cfg(["stage=infer", *base_overrides, "infer.batch_size=auto",
                                                   "infer.max_new_tokens=256"]))
    assert sized.infer.batch_size == infer and choice["auto"] and f"{gib} GiB" in choice["why"]


# card GiB -> rl.recompute_every_n_layers=auto for 8 completions of 256 tokens (0: none recomputes, 1: all),
# under the kept-activation coefficient measured on an H100 (card.MEMORY_MODEL)
RECOMPUTE = {141: 0, 80: 0, 64: 4, 48: 1, 40: 1, 24: 1}


def test_grpo_kept_activation_coefficient_reproduces_the_measured_peaks():
    """The H100's peaks at 8 completions of ~956 tokens (bench/run.py grpo 8 x 256): every layer recomputing
    21.29 GiB, every 2nd 43.22, every 4th 54.74; the coefficient with kept_share gives the latter two from the first
    within 0.3 GiB (a wrong share rule, e.g. 1/n kept, misses by 11 GiB)."""
    from flare_exp.card import MEMORY_MODEL, kept_share

    tokens = 8 * 956 / 1000
    for n, peak in ((2, 43.22), (4, 54.74)):
        assert abs(21.29 + kept_share(n) * tokens * MEMORY_MODEL["rl_kept_gib_per_1k_tokens"] - peak) < 0.3


@pytest.mark.parametrize("gib", sorted(RECOMPUTE))
def test_grpo_recomputes_as_few_layers_as_the_card_allows(base_overrides, card, gib, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="flare_exp")
    card["gib"] = gib
    rl = compose_cfg(["stage=rl", *base_overrides, "model.gradient_checkpointing=true", "rl.num_generations=8",
                      "rl.per_device_train_batch_size=8", "rl.max_completion_length=256"])
    used, choice = apply_rl_card(rl)
    assert used.rl.recompute_every_n_layers == RECOMPUTE[gib] and rl.rl.recompute_every_n_layers == "auto"
    assert choice["changed"]["rl.recompute_every_n_layers"] == ["auto", RECOMPUTE[gib]]
    assert f"rl.recompute_every_n_layers=auto -> {RECOMPUTE[gib]}" in caplog.text
    for kept in ("model.gradient_checkpointing=false", "model.backend=unsloth", "rl.recompute_every_n_layers=2"):
        used, _ = apply_rl_card(compose_cfg(["stage=rl", *base_overrides, "model.gradient_checkpointing=true",
                                             "rl.num_generations=8", "rl.per_device_train_batch_size=8", kept]))
        assert used.rl.recompute_every_n_layers == {"model.gradient_checkpointing=false": 0,
                                                    "model.backend=unsloth": 1}.get(kept, 2)


def test_no_gpu_keeps_the_cpu_defaults(base_overrides, card):
    card["gib"] = None
    cfg = _sft(base_overrides)
    used, changed, found, why = apply_card_preset(cfg)
    assert used is cfg and changed == {} and found is None and "no GPU" in why
    assert infer_batch(None, 256)[0] == 32 and green_batch(None, 2048)[0] == 16
    sized, choice = sized_infer_batch(compose_cfg(["stage=infer", *base_overrides, "infer.batch_size=auto"]))
    assert sized.infer.batch_size == 32 and choice["why"] == "no GPU: the CPU default"
    rl = compose_cfg(["stage=rl", *base_overrides, "rl.per_device_train_batch_size=2",
                      "rl.gradient_accumulation_steps=4"])
    used, choice = apply_rl_card(rl)
    assert used.rl.per_device_train_batch_size == 2 and used.rl.recompute_every_n_layers == 0  # not checkpointed
    assert choice["changed"] == {"rl.recompute_every_n_layers": ["auto", 0]}
    checkpointed = compose_cfg(["stage=rl", *base_overrides, "model.gradient_checkpointing=true"])
    assert apply_rl_card(checkpointed)[0].rl.recompute_every_n_layers == 1  # no GPU: every layer


def test_what_the_user_sets_stays(base_overrides, card):
    card["gib"] = 141
    cfg = compose_cfg(["stage=infer", *base_overrides, "infer.batch_size=24"])
    assert sized_infer_batch(cfg) == (cfg, {"key": "infer.batch_size", "value": 24, "auto": False,
                                            "why": "set in the config"})
    for extra in (["sft.card_preset=none"], ["model.backend=unsloth"]):
        cfg = _sft(base_overrides, *extra)
        assert apply_card_preset(cfg)[:2] == (cfg, {})
    bigger = _sft(base_overrides, "sft.per_device_train_batch_size=16", "sft.gradient_accumulation_steps=2",
                  "sft.recompute_above_tokens=5000", "sft.compile_layers=true", "model.liger_kernel=true")
    assert apply_card_preset(bigger)[1] == {}  # only ever faster: a larger split or a set budget stays
    rl = compose_cfg(["stage=rl", *base_overrides, "rl.per_device_train_batch_size=2",
                      "rl.gradient_accumulation_steps=4"])
    used, choice = apply_rl_card(rl)
    assert (used.rl.per_device_train_batch_size, used.rl.gradient_accumulation_steps) == (8, 1)
    assert choice["changed"]["rl.per_device_train_batch_size"] == [2, 8]
    assert apply_rl_card(compose_cfg(["stage=rl", *base_overrides, "rl.per_device_train_batch_size=2",
                                      "rl.gradient_accumulation_steps=4", "rl.card_preset=none",
                                      "model.gradient_checkpointing=true"]))[1]["changed"] == {
        "rl.recompute_every_n_layers": ["auto", 1]}  # none: every layer recomputes, as before cards were sized


def test_the_green_judge_sizes_its_batch_from_its_rows(card, tmp_path, caplog):
    """eval.green.batch_size=auto, sized when the prompts are known: a row spans max_length tokens under the
    package's budget, or the longest prompt + max_new_tokens; a number stays; exact keeps the package's 8."""
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm
    from flare_exp.metrics.green_judge import GreenJudge

    caplog.set_level(logging.INFO, logger="flare_exp")
    card["gib"] = 40
    path = build_tiny_causal_lm(tmp_path / "judge")
    refs = ["The heart is normal."] * 40
    cands = [f"Heart normal {i} {'and lungs clear ' * (i % 7)}." for i in range(40)]  # 40 distinct prompts
    load = lambda **kw: GreenJudge.from_pretrained(path, "float32", device="cpu", **kw)  # noqa: E731
    for settings in ({"max_new_tokens": 300}, {}):
        judge, batches = load(batch_size="auto", **settings), []
        judge.generate = lambda texts: (batches.append(len(texts)), ["x"] * len(texts))[1]
        assert judge.batch_size == "auto" and judge.batch_choice is None  # not sized before the prompts
        judge.judge(refs, cands)
        rows = min(2048, max(judge.input_tokens(refs, cands)) + 300) if settings else 2048
        assert judge.row_tokens(refs, cands) == rows and rows < 2048 or not settings
        batch = green_batch(Card("NVIDIA FAKE", 40, "total"), rows)[0]
        assert judge.batch_choice == {"key": "eval.green.batch_size", "value": batch, "auto": True,
                                      "why": judge.batch_choice["why"]}
        assert f"up to {rows} tokens" in judge.batch_choice["why"] and max(batches) == min(batch, 40)
    assert batch == 16 and green_batch(Card("NVIDIA FAKE", 40, "total"), 1216)[0] == 32
    fixed = load(batch_size=5)
    assert fixed.batch_choice["why"] == "set in the config" and fixed.batch_size == 5
    assert load(batch_size="auto", exact=True).batch_size == 8
    with pytest.raises(ValueError, match="eval.green.batch_size"):
        load(batch_size=0)


def test_the_card_memory_a_process_may_use(card, monkeypatch):
    card["gib"] = 141
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.5, raising=False)
    assert card_module.card_memory().gib == pytest.approx(70.5)
    monkeypatch.setenv(card_module.CARD_GIB_ENV, "40")
    assert str(card_module.card_memory()) == f"NVIDIA FAKE (40 GiB, {card_module.CARD_GIB_ENV})"
    monkeypatch.setenv(card_module.CARD_GIB_ENV, "lots")
    with pytest.raises(ValueError, match=card_module.CARD_GIB_ENV):
        card_module.card_memory()


def test_a_batch_is_a_number_or_auto(base_overrides):
    from flare_exp.setting_checks import range_problems

    cfg = compose_cfg(["stage=infer", *base_overrides, "infer.batch_size=big", "eval.green.batch_size=0"])
    problems = range_problems(cfg, {"infer", "eval"})
    assert "infer.batch_size='big': must be an integer >= 1 or auto (sized by the card's memory)" in problems
    assert any(p.startswith("eval.green.batch_size=0") for p in problems)
    assert range_problems(compose_cfg(["stage=infer", *base_overrides, "infer.batch_size=auto"]), {"infer"}) == []
    for half in ("1.5", "2.0"):  # a batch is a whole number: no launch records a run it cannot make
        problems = range_problems(compose_cfg(["stage=infer", *base_overrides, f"infer.batch_size={half}",
                                               f"eval.green.batch_size={half}"]), {"infer", "eval"})
        assert f"infer.batch_size={half}: must be an integer >= 1 or auto (sized by the card's memory)" in problems
        assert f"eval.green.batch_size={half}: must be an integer >= 1 or auto (sized by the card's memory)" in problems


def test_compile_caches_live_under_the_cache_dir(tmp_path, monkeypatch):
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from flare_exp.compile_cache import use_compile_cache

    for key in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(key, "")  # restored afterwards
        monkeypatch.delenv(key)
    # torch's own patch() restores its config; pytest's monkeypatch would delete the key on undo, which hides it
    # from torch for the rest of the session (every later compilation fails)
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        directory = use_compile_cache(tmp_path / "cache")
        assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    assert directory == tmp_path / "cache" / "torch_compile" and directory.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(directory)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own stays
    assert use_compile_cache(tmp_path / "cache") == tmp_path / "mine"


def test_compiled_blocks_run_eagerly_in_evaluation():
    from flare_exp.compile_cache import compiled_in_training_only

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    block = torch.nn.Linear(4, 4)
    block.compile(backend=counting_backend)
    compiled_in_training_only(block)
    x = torch.randn(2, 4)
    expected = block._call_impl(x)
    assert torch.equal(block(x), expected) and len(graphs) == 1  # training: compiled
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), expected) and len(graphs) == 1  # eval, no grad: eager, nothing recompiled


def test_gpu_messages_are_one_line_or_none(caplog):
    from flare_exp.quiet import RECOMPILE_LOGGER, quiet_gpu_messages

    quiet_gpu_messages()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_gpu_messages.__globals__["_installed"] = False  # the filters again, inside this recording
        quiet_gpu_messages()
        warnings.warn("Document 3 has a sentence with a single token or no tokens. This may break the modeling code.")
        warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled.")
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.")
        warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.",
                      DeprecationWarning)
        warnings.warn("another warning")  # only the known ones are silenced
    assert [str(w.message) for w in caught] == ["another warning"]
    caplog.set_level(logging.WARNING, logger=RECOMPILE_LOGGER)
    recompile = logging.getLogger(RECOMPILE_LOGGER)
    for layer in range(3):
        recompile.warning("torch._dynamo hit config.%s (%s)\n   function: %s\n   last reason: layer %d\nTo log all",
                          "recompile_limit", 8, "'forward' (modeling_qwen3_vl.py:400)", layer)
    lines = [r.getMessage() for r in caplog.records if r.name == RECOMPILE_LOGGER]
    assert len(lines) == 1 and "\n" not in lines[0] and "sft.compile_layers=false" in lines[0]
    assert "'forward' (modeling_qwen3_vl.py:400)" in lines[0]


def test_the_bench_fits_the_coefficients():
    from bench.card import card_table, infer_fit, memory_fits

    rows = [{"mode": "kept", "tokens": t, "peak_gib": 10.0 + 9.0 * t / 1000} for t in (700, 1400, 2800)]
    rows += [{"mode": "recomputed", "tokens": t, "peak_gib": 10.0 + 0.7 * t / 1000} for t in (1400, 11200)]
    rows.append({"mode": "recomputed", "tokens": 22400, "peak_gib": "out of memory"})
    assert memory_fits(rows) == {"kept": {"gib_per_1k_tokens": 9.0, "intercept_gib": 10.0},
                                 "recomputed": {"gib_per_1k_tokens": 0.7, "intercept_gib": 10.0}}
    infer = [{"what": "infer", "batch_used": b, "new_tokens": 128, "peak_memory_gib": 9 + 0.43 * b * 0.828,
              "reports_per_second": 10.0, "card_gib": 80, "generate_seconds_per_batch": [9.0, 3.2, 3.2, 1.0],
              "batch_choice": {"auto": b == 128, "why": "w"}}
             for b in (32, 128)]
    assert infer_fit(infer, 700)["gib_per_1k_tokens"] == 0.43
    assert "| 80 | infer | batch 128 (auto) | 40.0 |" in "\n".join(card_table(infer))


def test_the_next_batch_is_built_ahead_where_the_batch_fits(base_overrides, card):
    """infer.inputs_ahead=auto: on wherever the batch itself fits the card (the input ahead adds nothing to the
    measured peaks), at auto's batch on 80 and 40 GiB cards alike; off for a batch set larger than the card
    holds (it needs what there is) and without a GPU. A bad value is refused."""
    from flare_exp.card import card_memory, infer_ahead_room
    from flare_exp.stages.infer import check_settings

    assert infer_ahead_room(card_memory(), 128, 256)[0]
    card["gib"] = 40
    auto = infer_batch(card_memory(), 256)[0]
    fits, why = infer_ahead_room(card_memory(), auto, 256)
    assert fits and "40 GiB" in why and f"batch {auto} " in why
    fits, why = infer_ahead_room(card_memory(), auto + 16, 256)  # a batch the user set above what fits
    assert not fits and f"batch {auto + 16} needs ~" in why
    assert infer_ahead_room(None, 8, 256) == (False, "no GPU")
    check_settings(compose_cfg(["stage=infer", *base_overrides, "infer.inputs_ahead=false"]))
    for bad in ("always", "1", "0", "1.0", "2"):  # a switch is true or false, not a number
        with pytest.raises(ValueError, match="infer.inputs_ahead=.*: choose auto, true or false"):
            check_settings(compose_cfg(["stage=infer", *base_overrides, f"infer.inputs_ahead={bad}"]))
