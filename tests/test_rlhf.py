"""RLHF baseline: the reward model recovers a known ranking; RLHF raises HalfCheetah's true return from
labels only; the oracle's query budget is never exceeded."""

from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import spearmanr

from rl_align.agents.rlhf import RewardModel
from rl_align.envs.oracles import Oracle, OracleConfig
from rl_align.runs import resolve_config
from rl_align.train import train


def test_reward_model_recovers_the_ranking_of_a_linear_reward():
    rng = np.random.default_rng(0)
    obs_dim, act_dim, H, P = 5, 2, 10, 1500
    w = rng.normal(size=obs_dim + act_dim)
    true_r = lambda o, a: np.concatenate([o, a], -1) @ w  # noqa: E731
    seg = lambda o, a: SimpleNamespace(rewards=true_r(o, a), features=np.zeros(o.shape[:2] + (3,)))  # noqa: E731
    o1, a1, o2, a2 = (rng.normal(size=(P, H, d)) for d in (obs_dim, act_dim, obs_dim, act_dim))
    labels = Oracle(OracleConfig(temperature=1.0), seed=1).label(seg(o1, a1), seg(o2, a2))  # the real noisy BT teacher
    torch.manual_seed(0)
    model = RewardModel(obs_dim, act_dim, [64, 64], members=2)
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    ones = torch.ones(P, H)
    model.fit(torch.optim.Adam(model.parameters(), lr=1e-3), (t(o1), t(a1), ones), (t(o2), t(a2), ones), t(labels), epochs=30, batch=64, rng=rng)
    o, a = rng.normal(size=(500, obs_dim)), rng.normal(size=(500, act_dim))
    with torch.no_grad():
        pred = model(t(o), t(a)).numpy()
    assert spearmanr(pred, true_r(o, a)).correlation > 0.9


def test_rlhf_raises_true_return_and_respects_the_budget(tmp_path):
    cfg = resolve_config("halfcheetah-pref", "rlhf", [f"run.out_dir={tmp_path}", "run.progress=false", "run.eval_episodes=2",
                                                     "env.oracle.budget=1500", "agent.rm_ensemble=1"], steps=40_000, seed=0)
    folder, summary = train(cfg, quiet=True)
    assert summary["queries_used"] == 1500  # spent in full, never exceeded
    assert summary["env_steps"] >= 40_000  # training went on after the budget ran out
    import csv

    rows = list(csv.DictReader(open(folder / "progress.csv")))
    # the true return of the training episodes (the deterministic return of the initial policy is ~0: its
    # mean action is ~0, so it neither moves nor pays control cost; the stochastic policy is what learns)
    ep = [float(r["rollout/ep_return"]) for r in rows if r.get("rollout/ep_return")]
    assert ep[-1] > ep[0] + 50, ep
    rows = [r for r in rows if r.get("rlhf/rm_accuracy")]
    assert float(rows[-1]["rlhf/rm_accuracy"]) > 0.8
    assert max(float(r["train/queries_used"]) for r in rows) <= 1500
