"""Shared by the label-store and labelling-page tests (and the label-sharing benchmark): stores filled from a
real policy's rollouts, and stores of random segments with stand-in clips."""

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


def rebuild_frames(out_dir) -> None:
    """Run in a subprocess (a GL context made in the test process would bind PyOpenGL's platform for every
    later test): a short HalfCheetah segment's frames rebuilt from observations and x-velocities, the frames
    of the simulator's own states (root x shifted to start at 0), saved to ``frames.npz``; its clip to ``c.webm``."""
    from pathlib import Path

    from rl_align.envs import make_env
    from rl_align.labels.render import ClipRenderer

    env = make_env("HalfCheetah-v5")
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    seg, qpos = {"obs": [], "features": []}, []
    for _ in range(6):
        seg["obs"].append(obs)
        qpos.append(env.unwrapped.data.qpos.copy())
        obs, _, _, _, info = env.step(rng.uniform(-1, 1, 6))
        seg["features"].append(info["features"])
    seg = {k: np.asarray(v) for k, v in seg.items()}
    seg["mask"] = np.ones(6, bool)
    r = ClipRenderer("HalfCheetah-v5", 96, 72)
    rebuilt = np.stack(r.frames(seg))
    truth = []
    for q in qpos:
        q = q.copy()
        q[0] -= qpos[0][0]
        r.u.set_state(q, np.zeros(r.u.model.nv))
        truth.append(r.env.render())
    np.savez(Path(out_dir) / "frames.npz", rebuilt=rebuilt, truth=np.stack(truth))
    r.write(seg, Path(out_dir) / "c.webm")
    r.close()


def clipped_store(path, n_pairs, H=5):
    """A store of ``n_pairs`` pairs of random ``H``-step segments whose clips are (stand-in) files already, so
    the server renders nothing and what is measured is the server and the store."""
    rng = np.random.default_rng(0)
    M = n_pairs + 1
    segs = {"obs": rng.normal(size=(M, H, 17)).astype(np.float32), "actions": rng.normal(size=(M, H, 6)).astype(np.float32),
            "mask": np.ones((M, H), bool), "logp": np.zeros((M, H), np.float32), "ref_logp": np.zeros((M, H), np.float32),
            "rewards": rng.normal(size=(M, H)).astype(np.float32), "features": rng.normal(size=(M, H, 3)).astype(np.float32)}
    store = LabelStore.create(path, "HalfCheetah-v5", "Prefer forward running.", H, 20.0)
    store.add_pairs(segs, np.arange(n_pairs), np.arange(1, n_pairs + 1), source="test")
    store.clip_dir.mkdir()
    for seg in range(1, M + 1):
        (store.clip_dir / f"{seg}.webm").write_bytes(b"\x1a\x45\xdf\xa3 stand-in clip")
        store.set_clip(seg, f"{store.clip_dir.name}/{seg}.webm")
    return store
