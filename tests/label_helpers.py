"""Shared by the label-store and labelling-page tests: stores filled from a real policy's rollouts."""

import numpy as np

from rl_align.labels.collect import collect_from_agent
from rl_align.labels.store import LabelStore
from rl_align.runs import build_agent, resolve_config
from rl_align.train import prepare

SMALL = ["agent.ref=init", "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=20", "run.progress=false",
         "agent.curvature_every=0", "agent.diag_every=0", "run.eval_episodes=1", "agent.win_rate_episodes=1"]


def agent_for(overrides, env="halfcheetah-pref", agent="sail-revkl", seed=0, steps=2_000):
    cfg = resolve_config(env, agent, overrides, steps=steps, seed=seed)
    a, venv = build_agent(cfg)
    venv.close()
    prepare(a, cfg)
    return cfg, a


def small_store(path, n_pairs, seed=0, overrides=()):
    """A store of ``n_pairs`` pairs of 20-step HalfCheetah segments from a random initial policy."""
    cfg, agent = agent_for(SMALL + list(overrides), seed=seed)
    store = LabelStore.create(path, cfg.env.task, "Prefer forward running.", cfg.agent.segment_len, 20.0)
    collect_from_agent(agent, cfg.env, store, n_pairs, seed=seed + 400_000, segment_len=cfg.agent.segment_len)
    return store


def forward_choice(store, pair) -> str:
    """What the forward-progress oracle answers: the segment with more summed x-velocity."""
    v1, v2 = (float((store.segment(pair[k])["features"][:, 0] * store.segment(pair[k])["mask"]).sum()) for k in ("seg1", "seg2"))
    return "left" if v1 > v2 else "right" if v2 > v1 else "equal"


def x_velocities(folder) -> np.ndarray:
    import csv

    rows = [r for r in csv.DictReader(open(folder / "progress.csv")) if r.get("rollout/x_velocity")]
    return np.array([float(r["rollout/x_velocity"]) for r in rows])
