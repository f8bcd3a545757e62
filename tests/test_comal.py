"""COMAL on real HalfCheetah-v5: the reference reset, equality with its inner solver when the reset is
off, the plateau criterion, the within-batch win rates, and a small end-to-end run."""

import copy
import csv

import numpy as np
import pytest
import torch

from rl_align.agents.base import EpisodeTracker
from rl_align.agents.comal import segment_win_rates
from rl_align.errors import UserError
from rl_align.checkpoints import load_checkpoint
from rl_align.runs import resolve_config
from rl_align.runs import build_agent
from rl_align.train import prepare, train

SMALL = ["agent.ref=init", "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=20", "agent.diag_every=0",
         "agent.win_rate_episodes=1", "env.max_episode_steps=100", "run.eval_episodes=1", "run.progress=false"]


def _trained_agent(extra=()):
    cfg = resolve_config("halfcheetah-cyclic", "comal", SMALL + ["agent.inner_updates=0", *extra])
    agent, env = build_agent(cfg)
    prepare(agent, cfg)
    obs = env.reset()
    for _ in range(2):
        obs = agent.collect(env, obs, EpisodeTracker(env.n_envs))
        agent.update([])
    return agent, env


def _same(a, b) -> bool:
    """Exact equality of nested state dicts (tensors, arrays, numbers, lists)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_reset_replaces_the_reference_exactly_and_nothing_else():
    agent, _ = _trained_agent()
    assert not _same(agent.ref_policy.state_dict(), agent.policy.state_dict())  # the policy has moved away
    before = copy.deepcopy({k: m.state_dict() for k, m in agent.modules().items() if k not in ("ref_policy", "diagnostics")})
    opt, rng = copy.deepcopy(agent.optimizer.state_dict()), agent.rng.bit_generator.state
    agent.reset_reference()
    assert _same(agent.ref_policy.state_dict(), agent.policy.state_dict())
    assert agent.ref_policy.state_dict()["log_std"].data_ptr() != agent.policy.state_dict()["log_std"].data_ptr()  # a copy
    assert not any(p.requires_grad for p in agent.ref_policy.parameters())
    after = {k: m.state_dict() for k, m in agent.modules().items() if k not in ("ref_policy", "diagnostics")}
    assert before.keys() == after.keys() and "init_ref_policy" in before
    for k in before:
        assert _same(before[k], after[k]), k
    assert _same(agent.optimizer.state_dict(), opt) and agent.rng.bit_generator.state == rng
    assert agent.resets == 1 and agent.inner_step == 0


def test_scheduled_reset_in_the_update_and_plateau_criterion():
    agent, env = _trained_agent(["agent.plateau_window=2"])
    agent.config.inner_updates = 1
    agent.collect(env, env.reset(), EpisodeTracker(env.n_envs))
    m = agent.update([])
    assert m["comal/resets"] == 1.0 and _same(agent.ref_policy.state_dict(), agent.policy.state_dict())
    agent.inner_values = [0.0, 0.1, 0.2, 0.3]  # still improving by 0.2 per window
    assert not agent.plateaued()
    agent.inner_values = [0.0, 0.1, 0.105, 0.1]  # windows [0, 0.1] -> [0.105, 0.1]: gained 0.0525
    agent.config.plateau_tol = 0.1
    assert agent.plateaued()
    agent.inner_values = agent.inner_values[:3]  # fewer than 2 W values since the reset
    assert not agent.plateaued()


def test_without_reset_comal_equals_its_inner_solver(tmp_path):
    common = SMALL + [f"run.out_dir={tmp_path}", "agent.revkl_coef=0.05", "agent.lr=0.001", "agent.shift_coef=0.1", "agent.revkl_std=false"]
    f_sail, _ = train(resolve_config("halfcheetah-cyclic", "sail-revkl", common, steps=600, seed=3), quiet=True)
    f_comal, _ = train(resolve_config("halfcheetah-cyclic", "comal", common + ["agent.inner=sail-revkl", "agent.inner_updates=0",
                                                                              "agent.plateau_window=0"], steps=600, seed=3), quiet=True)
    a, b = load_checkpoint(f_sail), load_checkpoint(f_comal)
    assert _same(a["policy"], b["policy"]) and _same(a["ref_policy"], b["ref_policy"])
    assert b["updates"] == 3 and b["comal"]["resets"] == 0
    # with the reset on, the same seed gives a different policy (the reset changes the objective)
    f_reset, _ = train(resolve_config("halfcheetah-cyclic", "comal", common + ["agent.inner=sail-revkl", "agent.inner_updates=1"],
                                      steps=600, seed=3), quiet=True)
    assert not _same(a["policy"], load_checkpoint(f_reset)["policy"])


def test_comal_inpo_runs_end_to_end(tmp_path):
    cfg = resolve_config("halfcheetah-cyclic", "comal", SMALL + [f"run.out_dir={tmp_path}", "agent.inner=inpo", "agent.inner_updates=2"], steps=800, seed=0)
    folder, summary = train(cfg, quiet=True)
    state = load_checkpoint(folder)
    assert state["updates"] == 4 and state["comal"]["resets"] == 2
    assert _same(state["ref_policy"], state["policy"])  # the last update ended with a reset
    assert not _same(state["init_ref_policy"], state["policy"])  # and the policy has learned away from pi_ref^1
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    resets = [float(r["comal/resets"]) for r in rows if r.get("comal/resets")]
    assert resets == [0.0, 1.0, 1.0, 2.0]
    assert all(np.isfinite(float(r["comal/inner_objective"])) for r in rows if r.get("comal/inner_objective"))
    assert 0.0 <= summary["final"]["eval/win_rate_vs_ref"] <= 1.0


def test_segment_win_rates_and_config_errors():
    i, j = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 2, 0])
    pref1 = torch.tensor([1.0, 0.0, 1.0, 1.0])  # 0 beats 1, 2 beats 0, 1 beats 2, 2 beats 0
    torch.testing.assert_close(segment_win_rates(i, j, pref1, 4), torch.tensor([1 / 3, 1 / 2, 2 / 3, 1 / 2]))
    for bad, msg in ((["agent.inner=dpo"], "agent.inner"), (["agent.eta=0"], "agent.eta"), (["agent.inner_updates=-1"], "inner_updates"),
                     (["agent.inner=inpo", "agent.revkl_coef=2"], "must be <= 1")):
        with pytest.raises(UserError, match=msg):
            resolve_config("halfcheetah-cyclic", "comal", bad)
