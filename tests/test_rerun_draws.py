"""A first run (which builds the tiny model and RadGraph in-process, on an empty cache) draws what a rerun (which
loads them) draws: building, loading and scoring leave torch's random state to the stage that seeded it."""
from __future__ import annotations

import torch


def test_building_the_tiny_models_leaves_the_callers_draws_alone(tmp_path):
    from flare_exp.fixtures.tiny_models import build_tiny_qwen3vl
    from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph

    torch.manual_seed(7)
    seeded = torch.get_rng_state()
    build_tiny_qwen3vl(tmp_path / "model")
    assert torch.equal(torch.get_rng_state(), seeded), "building the tiny Qwen3-VL moved torch's random state"
    build_tiny_radgraph(tmp_path / "radgraph")
    assert torch.equal(torch.get_rng_state(), seeded), "building the tiny RadGraph moved torch's random state"


def test_radgraph_rewards_leave_trainings_draws_alone(tmp_path):
    """The scorer loads on the first reward (mid-training) and parses new reports only: the draws that takes
    vary with the process's caches (radgraph's encoder, initialised once per process, is skipped where building
    the tiny RadGraph already made it), so they must not reach GRPO's sampling."""
    from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph
    from flare_exp.metrics.radgraph_f1 import RadGraphScorer

    scorer = RadGraphScorer(build_tiny_radgraph(tmp_path / "radgraph"), "radgraph-xl", device="cpu")
    uncached = RadGraphScorer(scorer.model_dir, "radgraph-xl", use_cache=False, device="cpu")
    torch.manual_seed(7)
    seeded = torch.get_rng_state()
    for each in (scorer, uncached):
        each.score_pairs(["the heart size is normal .", "mild cardiomegaly ."], ["the lungs are clear .", "no effusion ."])
        assert torch.equal(torch.get_rng_state(), seeded), "scoring with RadGraph moved torch's random state"
