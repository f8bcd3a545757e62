"""The Lagrangian layer: multiplier updates against their formulas, OPD with optimism off equals PD,
and a tight velocity limit on real HalfCheetah-v5 lowers the episode cost against unconstrained PPO."""

import csv

import numpy as np
import pytest
import torch

from rl_align.errors import UserError
from rl_align.runs import resolve_config
from rl_align.train import build_agent, train

TINY = ["env.cost.threshold=0.5", "agent.n_envs=2", "agent.n_steps=128", "agent.epochs=2", "env.max_episode_steps=100", "run.progress=false", "run.eval_episodes=1"]


def _layer(method, *extra):
    cfg = resolve_config("halfcheetah", "ppo-lag", TINY + [f"agent.constraint.method={method}", "agent.constraint.lam_lr=0.1", *extra])
    agent, _ = build_agent(cfg)
    return agent.lagrangian


def test_multiplier_rises_over_the_limit_and_is_projected_at_zero():
    lag = _layer("pd")
    assert lag.limit == 25.0  # from the env preset
    lams = [lag.dual_step(125.0) for _ in range(5)]
    assert np.allclose(lams, [10.0, 20.0, 30.0, 40.0, 50.0])  # lam + eta (Jc - d), eta = 0.1
    lams = [lag.dual_step(0.0) for _ in range(40)]
    assert min(lams) == 0.0 and lams[-1] == 0.0 and all(b <= a for a, b in zip(lams, lams[1:]))


def test_opd_dual_update_equals_its_formula():
    lag = _layer("opd")
    costs = [60.0, 10.0, 40.0, 25.0, 0.0, 0.0, 90.0, 30.0]
    lam, g_prev = 0.0, None
    for jc in costs:
        g = jc - 25.0
        step = g if g_prev is None else 2 * g - g_prev  # first step has no g_{k-1}: plain PD
        lam = max(0.0, lam + 0.1 * step)
        g_prev = g
        assert lag.dual_step(jc) == pytest.approx(lam)


def test_pid_integral_has_anti_windup():
    lag = _layer("pid", "agent.constraint.kp=0.0", "agent.constraint.kd=0.0", "agent.constraint.ki=0.1")
    for _ in range(20):
        lag.dual_step(0.0)  # far below the limit: the integral must not wind down below 0
    assert lag.integral == 0.0 and lag.lam == 0.0
    assert lag.dual_step(35.0) == pytest.approx(1.0)  # so it reacts at once when the cost goes over


def _params_after(method, *extra, steps=1024):
    cfg = resolve_config("halfcheetah", "ppo-lag", TINY + [f"agent.constraint.method={method}", "agent.constraint.lam_lr=0.05", "agent.constraint.limit=5",
                                                           "run.out_dir=/tmp/unused", *extra], steps=steps, seed=5)
    agent, env = build_agent(cfg)
    from rl_align.agents.base import EpisodeTracker

    tracker, obs = EpisodeTracker(env.n_envs), env.reset()
    agent.episode_history = []
    while agent.env_steps < steps:
        obs = agent.collect(env, obs, tracker)
        agent.last_episodes = tracker.pop()
        agent.update()
    return torch.nn.utils.parameters_to_vector(agent.policy.parameters()).detach(), agent.lagrangian.lam


def test_opd_without_optimism_is_exactly_pd():
    pd, lam_pd = _params_after("pd")
    opd_off, lam_off = _params_after("opd", "agent.constraint.primal_optimism=false", "agent.constraint.dual_optimism=false")
    opd, lam_opd = _params_after("opd")
    assert lam_pd > 0
    assert torch.equal(pd, opd_off) and lam_pd == lam_off
    assert not torch.equal(pd, opd)  # and optimism does change the iterates


def _episode_costs(method, tmp_path):
    cfg = resolve_config("halfcheetah", "ppo-lag", [f"agent.constraint.method={method}", "agent.constraint.lam_lr=0.01",
                                                    "env.cost.threshold=0.5", f"run.out_dir={tmp_path}", "run.progress=false",
                                                    "run.eval_episodes=1"], steps=30_000, seed=0)
    folder, _ = train(cfg, quiet=True)
    rows = [r for r in csv.DictReader(open(folder / "progress.csv")) if r.get("rollout/ep_cost")]
    return np.array([float(r["rollout/ep_cost"]) for r in rows]), rows


def test_opd_lowers_episode_cost_under_a_tight_velocity_limit(tmp_path):
    free, _ = _episode_costs("none", tmp_path / "ppo")
    opd, rows = _episode_costs("opd", tmp_path / "opd")
    # measured last-3 episode cost, free vs OPD, seeds 0/1/2: 239.1 vs 182.8 (-56), 238.4 vs 171.3 (-67),
    # 219.3 vs 156.4 (-63); final lambda 23.0 / 22.0 / 22.6, cumulative violation > 2000 at each
    assert opd[-3:].mean() < free[-3:].mean() - 30, (free, opd)
    assert float(rows[-1]["safety/lambda"]) > 0 and float(rows[-1]["safety/cum_violation"]) > 0
    assert {"safety/violation", "safety/over_budget_share", "safety/ep_cost"} <= set(rows[-1])


@pytest.mark.parametrize("override, message", [
    ("agent.constraint.method=ppd", "constraint.method"),
    ("agent.constraint.lam_lr=-1", "lam_lr"),
    ("agent.constraint.limit=-5", "limit"),
])
def test_bad_constraint_config(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config("halfcheetah", "ppo-lag", [override])


def test_sail_revkl_opd_runs_with_the_same_layer(tmp_path):
    cfg = resolve_config("halfcheetah-pref", "sail-revkl-opd", ["agent.ref=init", "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=20",
                                                                "env.max_episode_steps=100", "env.cost.threshold=0.5", "agent.constraint.limit=5",
                                                                "agent.constraint.lam_lr=0.05", f"run.out_dir={tmp_path}", "run.progress=false",
                                                                "run.eval_episodes=1", "agent.curvature_every=0"], steps=1200)
    folder, summary = train(cfg, quiet=True)
    rows = [r for r in csv.DictReader(open(folder / "progress.csv")) if r.get("safety/lambda")]
    lams = [float(r["safety/lambda"]) for r in rows]
    # Cost far over a limit of 5, so the multiplier climbs; not at every step: OPD steps on 2 g_k - g_{k-1},
    # negative when the episode cost halves between iterations (seed 0: 3.525 -> 3.4 after cost 23.5 -> 13).
    # Measured lams[0] -> lams[-1] (rising steps of 5), seeds 0/1/2: 0.83 -> 7.18 (4), 1.08 -> 7.23 (5), 2.20 -> 6.90 (5).
    rises = np.diff(lams) > 0
    assert lams[-1] - lams[0] > 3 and rises.mean() >= 0.6, lams
    assert summary["queries_used"] > 0
