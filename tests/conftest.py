"""Shared fixtures: Hydra compose API configs, a tiny Qwen3-VL and the prepared demo, built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
sys.path.insert(0, str(REPO))

import flare_exp.config  # noqa: E402,F401  (registers the schema)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """The whole launches (marked slow) first: on two workers the short tests then fill in around them, instead
    of one worker ending the suite alone in a sweep collected late (test_readme, test_sweep*)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def compose_cfg(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flare_session")


@pytest.fixture(scope="session")
def tiny_model_dir(session_dir) -> Path:
    from flare_exp.fixtures.tiny_models import build_tiny_qwen3vl

    return build_tiny_qwen3vl(session_dir / "cache" / "models" / "tiny-qwen3vl")


@pytest.fixture(scope="session")
def demo_prepared(session_dir) -> Path:
    """The demo tree generated and prepared once: returns the prepared dir (train/val/test.jsonl)."""
    from flare_exp.main import run

    cfg = compose_cfg([f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={session_dir / 'out'}",
                       "stage=prepare"])
    run(cfg, run_dir=session_dir / "out" / "prepare")
    return session_dir / "cache" / "demo" / "prepared"


@pytest.fixture
def base_overrides(session_dir, tmp_path, tiny_model_dir, demo_prepared) -> list[str]:
    """Overrides for a test run: shared tiny model + prepared demo, a private output dir."""
    return [f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={tmp_path / 'out'}"]


@pytest.fixture(scope="session")
def sft_adapter(session_dir, tiny_model_dir, demo_prepared) -> Path:
    """A tiny SFT run (2 steps) whose adapter the rl, infer and sweep tests start from."""
    from flare_exp.main import run

    out = session_dir / "sft_adapter"
    if not (out / "sft" / "DONE").exists():
        run(compose_cfg(["stage=sft", f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={out}",
                         # the budget before the demo's: its tests need an adapter, not one that learned
                         "sft.max_steps=2", "sft.per_device_train_batch_size=2", "sft.learning_rate=1e-3",
                         "sft.eval_steps=0"]), run_dir=out / "sft")
    return out / "sft"


@pytest.fixture(scope="session")
def learned_sft_adapter(session_dir, tiny_model_dir, demo_prepared) -> Path:
    """An SFT adapter that learned the demo's answers (the demo's settings, half its steps: multi-label F1 and
    the reports' ROUGE well above 0), for the tests whose outcome needs a policy that can get worse or better:
    a pruned search, reward weights that change the outcome."""
    from flare_exp.main import run

    out = session_dir / "learned_sft_adapter"
    if not (out / "sft" / "DONE").exists():
        run(compose_cfg(["stage=sft", f"paths.cache_dir={session_dir / 'cache'}", f"paths.output_root={out}",
                         "sft.max_steps=40", "sft.eval_steps=0", "sft.save_steps=40"]), run_dir=out / "sft")
    return out / "sft"


@pytest.fixture(autouse=True)
def _no_lock_outlives_its_test(monkeypatch):
    """A test that takes a run lock and leaves it (or has it taken over on purpose) does not leave it to the
    next test's lost-lock checks: every lock still listed as this process's is let go after each test. A lock
    taken over does not end the test process (a subprocess test checks that it ends a run's)."""
    from flare_exp.run import lock as run_lock

    monkeypatch.setattr(run_lock, "HARD_STOP", [False])
    yield
    for lock in list(run_lock._LOCKS_HERE):
        lock._stop.set()
        run_lock._LOCKS_HERE.remove(lock)
