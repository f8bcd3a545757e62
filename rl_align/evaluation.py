"""Evaluation, in one place: episodes on fresh envs, matched-window win rates, the ``eval/`` metrics of
training-time evaluation and of ``rl-align eval <run folder>`` (one vocabulary, one printer), and videos.

``eval/`` metrics, per mode (``det``: the mean action, ``stoch``: sampled actions): ``return_<mode>`` with
``_std`` (std over the episodes), ``_min``, ``_max``; ``cost_<mode>``, ``over_budget_<mode>`` (share of
episodes over the cost limit); then ``violation`` = ``max(0, cost - d)`` of the first mode evaluated,
``length``, ``episodes``; and, for an agent with a reference (``agent.reference()``), the win rate of its
segments against the reference's matched segments under the run's oracle (``win_rate_vs_ref``) and the
per-state ``KL(pi || pi_ref)`` on the states of those stochastic evaluation rollouts (``kl_to_ref``; and
``kl_to_current_ref`` to a reference that moves, COMAL's prox centre). Videos are rendered offscreen by
MuJoCo; with ``MUJOCO_GL`` unset on a headless Linux machine the backend (EGL, then OSMesa) is chosen by
:func:`rl_align.envs.backend.choose_gl`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from rl_align.agents.base import Agent
from rl_align.buffer import Segments
from rl_align.checkpoints import load_checkpoint
from rl_align.envs import EnvConfig, Oracle, make_vec_env
from rl_align.envs.backend import choose_gl, gl_errors
from rl_align.errors import UserError
from rl_align.nets import policy_kl
from rl_align.runs import RunConfig, build_agent, load_run_config

MODES = {"det": True, "stoch": False}  # mode -> deterministic


def evaluate(agent: Agent, env_config: EnvConfig, episodes: int, seed: int, deterministic: bool = True) -> dict[str, np.ndarray]:
    """Run ``episodes`` full episodes on fresh envs (seeds ``seed + i``), batched; per-episode
    ``return``, ``cost``, ``length`` arrays. The agent's normalizer is used frozen and its action-noise
    stream is copied, never advanced (evaluation does not shift training)."""
    out = {"return": [], "cost": [], "length": []}
    done_eps = 0
    while done_eps < episodes:
        n = min(16, episodes - done_eps)
        env = make_vec_env(env_config, n, seed=seed + done_eps)
        obs = env.reset()
        alive = np.ones(n, bool)
        ret, cost, length = np.zeros(n), np.zeros(n), np.zeros(n, int)
        rng, actor = copy.deepcopy(agent.act_rng), agent.actor()
        while alive.any():
            step = env.step(agent.act(obs, deterministic=deterministic, actor=actor, rng=rng))
            ret += step.rewards * alive
            cost += step.costs * alive
            length += alive
            alive &= ~(step.terminated | step.truncated)
            obs = step.obs
        env.close()
        out["return"] += list(ret)
        out["cost"] += list(cost)
        out["length"] += list(length)
        done_eps += n
    return {k: np.asarray(v) for k, v in out.items()}


def rollout_segments(agent: Agent, env_config: EnvConfig, episodes: int, H: int, seed: int, deterministic: bool = False,
                     policy: torch.nn.Module | None = None) -> dict[tuple[int, int], dict]:
    """Windows of ``H`` steps from ``episodes`` fresh episodes (env seeds ``seed + i``) of ``policy``
    (default: the agent's own) acting through the agent's normalizer and a copy of its action-noise
    stream, keyed by ``(episode, window)`` so two policies' segments can be matched; windows end before
    termination. Each value holds ``obs`` (raw), ``actions``, ``rewards``, ``costs``, ``features``."""
    env = make_vec_env(env_config, episodes, seed=seed)
    obs = env.reset()
    alive = np.ones(episodes, bool)
    rec = {k: [] for k in ("obs", "actions", "rewards", "costs", "features")}
    steps = np.zeros(episodes, int)
    rng, actor = copy.deepcopy(agent.act_rng), agent.actor(policy)
    while alive.any():
        action = agent.act(obs, deterministic=deterministic, actor=actor, rng=rng)
        step = env.step(action)
        for k, v in (("obs", obs), ("actions", action), ("rewards", step.rewards), ("costs", step.costs), ("features", step.features)):
            rec[k].append(np.asarray(v))
        steps += alive
        alive &= ~(step.terminated | step.truncated)
        obs = step.obs
    env.close()
    arr = {k: np.stack(v, axis=1) for k, v in rec.items()}  # [episodes, T, ...]
    return {(e, w): {k: a[e, w * H:(w + 1) * H] for k, a in arr.items()} for e in range(episodes) for w in range(steps[e] // H)}


def matched_preferences(a: dict, b: dict, oracle: Oracle) -> tuple[np.ndarray, np.ndarray]:
    """``P(segment of a > matched segment of b)`` per window both have (no label noise, no query spent),
    and each window's episode (the independent unit: windows of one episode are correlated)."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return np.zeros(0), np.zeros(0, int)
    def stack(segs: dict) -> Segments:  # windows end before termination: every step real (mask all True)
        arrays = {k: np.stack([segs[key][k] for key in keys]) for k in segs[keys[0]]}
        return Segments.of(raw_obs=arrays.pop("obs"), env=np.array([key[0] for key in keys]),
                           start=np.array([key[1] for key in keys]) * len(arrays["rewards"][0]), **arrays)

    return oracle.preference_prob(stack(a), stack(b)), np.array([key[0] for key in keys])


def win_rate(agent: Agent, against: torch.nn.Module | Agent, env_config: EnvConfig, oracle: Oracle, episodes: int, H: int, seed: int,
             deterministic: bool = False, mine: dict | None = None) -> float:
    """Mean ``P(segment of the agent > matched segment of against)`` under ``oracle`` on the same env seeds.
    ``against`` is a policy (pi_ref) acting through the agent's normalizer and action noise, or another
    agent with its own; ``mine``: the agent's segments of those episodes, when already rolled out."""
    mine = rollout_segments(agent, env_config, episodes, H, seed, deterministic) if mine is None else mine
    if isinstance(against, Agent):
        theirs = rollout_segments(against, env_config, episodes, H, seed, deterministic)
    else:
        theirs = rollout_segments(agent, env_config, episodes, H, seed, deterministic, policy=against)
    p, _ = matched_preferences(mine, theirs, oracle)
    return float(p.mean()) if len(p) else float("nan")


def eval_metrics(agent: Agent, cfg: RunConfig, episodes: int | None = None, seed: int | None = None,
                 modes: tuple[str, ...] = ("det", "stoch")) -> dict[str, float]:
    """The ``eval/`` metrics (module docstring) over ``episodes`` (default ``run.eval_episodes``) episodes
    with distinct reset seeds from ``seed`` (default ``run.seed + 100000``)."""
    episodes = cfg.run.eval_episodes if episodes is None else episodes
    seed = cfg.run.seed + 100_000 if seed is None else seed
    if episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}")
    limit = float(cfg.env.cost.limit)
    m: dict[str, float] = {"eval/episodes": float(episodes)}
    for mode in modes:
        res = evaluate(agent, cfg.env, episodes, seed=seed, deterministic=MODES[mode])
        r = res["return"]
        m.update({f"eval/return_{mode}": float(r.mean()), f"eval/return_{mode}_std": float(r.std()),
                  f"eval/return_{mode}_min": float(r.min()), f"eval/return_{mode}_max": float(r.max()),
                  f"eval/cost_{mode}": float(res["cost"].mean()), f"eval/over_budget_{mode}": float((res["cost"] > limit).mean())})
    m["eval/violation"] = max(0.0, m[f"eval/cost_{modes[0]}"] - limit)
    m["eval/length"] = float(res["length"].mean())
    ref = agent.reference()
    if ref is not None:
        judge = Oracle(dataclasses.replace(cfg.env.oracle, budget=None), seed=cfg.run.seed + 31)  # no training query is spent
        c, seed = agent.config, cfg.run.seed + 200_000
        mine = rollout_segments(agent, cfg.env, c.win_rate_episodes, c.segment_len, seed)
        m["eval/win_rate_vs_ref"] = win_rate(agent, ref, cfg.env, judge, c.win_rate_episodes, c.segment_len, seed, mine=mine)
        obs = torch.as_tensor(agent.normalize(np.concatenate([s["obs"] for s in mine.values()])), device=agent.device) if mine else None
        # per state, on the states of the agent's evaluation windows (fresh, unlike train/kl_ref's)
        for key, other in (("eval/kl_to_ref", ref), ("eval/kl_to_current_ref", agent.moving_reference())):
            if other is not None:
                m[key] = policy_kl(agent.policy, other, obs) if mine else float("nan")
    return m


def load_agent(folder: Path):
    """``(config, agent)`` of a run folder, the agent holding the weights of ``checkpoints/last.pt``."""
    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        raise UserError(f"{folder} is not a run folder (no config.yaml); give a folder written by rl-align train")
    cfg = load_run_config(folder)
    state = load_checkpoint(folder)
    agent, env = build_agent(cfg)
    env.close()
    agent.load_state_dict(state)
    return cfg, agent


def evaluate_run(folder: Path, episodes: int = 10, deterministic: bool = True, seed: int | None = None) -> dict[str, float]:
    """``eval/`` metrics of the run's last checkpoint in one mode over ``episodes`` fresh episodes (env
    seeds ``seed + i``, default the run's seed + 300000, unseen in training), plus ``seed``, ``env_steps``."""
    cfg, agent = load_agent(folder)
    seed = cfg.run.seed + 300_000 if seed is None else seed
    m = eval_metrics(agent, cfg, episodes, seed, modes=("det",) if deterministic else ("stoch",))
    return {**m, "eval/cost_limit": float(cfg.env.cost.limit), "seed": seed, "env_steps": agent.env_steps}


# label, key, kind: "pm" prints mean ± std over the episodes, "%" a share, else the value
ROWS = (("return (stochastic)", "eval/return_stoch", "pm"), ("return (deterministic)", "eval/return_det", "pm"),
        ("episode cost (det)", "eval/cost_det", ""), ("episode cost (stoch)", "eval/cost_stoch", ""),
        ("violation", "eval/violation", ""), ("over budget (det)", "eval/over_budget_det", "%"),
        ("over budget (stoch)", "eval/over_budget_stoch", "%"), ("episode length", "eval/length", "1"),
        ("win rate vs reference", "eval/win_rate_vs_ref", "3"), ("KL to reference", "eval/kl_to_ref", "3"))


SUMMARY = ("eval/return_stoch", "eval/return_det", "eval/cost_det", "eval/win_rate_vs_ref", "eval/kl_to_ref")


def print_metrics(columns: dict[str, dict], keys: tuple[str, ...] | None = None) -> None:
    """The one printer of ``eval/`` metrics: a row per metric (all, or ``keys``), a column per named
    metric set (for example ``{"start": ..., "end": ...}``); a metric missing from every column is left out."""
    print(f"  {'':<24}" + "".join(f"{name:^18}" for name in columns))
    for label, key, kind in ROWS:
        if keys is not None and key not in keys or not any(key in m for m in columns.values()):
            continue
        cells = []
        for m in columns.values():
            v = m.get(key)
            if v is None:
                cells.append(f"{'':>18}")
            elif kind == "pm":
                cells.append(f"{v:>10.1f} ± {m.get(key + '_std', float('nan')):<5.1f}")
            elif kind == "%":
                cells.append(f"{v:>10.0%}{'':8}")
            else:
                cells.append(f"{v:>10.{ {'3': 3, '1': 1}.get(kind, 2) }f}{'':8}")
        print(f"  {label:<24}" + "".join(cells))


def check_video_target(path: Path) -> None:
    """A .mp4 or .gif name, and the writer it needs installed (checked before any work is done)."""
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise UserError(f"--video {path}: use a .mp4 or .gif file name")
    try:
        import imageio.v2  # noqa: F401
        if path.suffix.lower() == ".mp4":
            import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise UserError(f"writing {path.suffix} needs imageio{' and imageio-ffmpeg' if path.suffix.lower() == '.mp4' else ''}: "
                        "pip install 'rl-align[video]'") from None


def record_video(folder: Path, path: Path, deterministic: bool = True, seed: int | None = None) -> int:
    """Render one episode of the run's policy offscreen into ``path`` (.mp4 or .gif); returns frames."""
    from rl_align.envs import make_env

    path = Path(path)
    check_video_target(path)
    import imageio.v2 as imageio

    cfg, agent = load_agent(folder)
    seed = cfg.run.seed + 300_000 if seed is None else seed
    with gl_errors("render"):
        env = make_env(cfg.env, seed=None, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
    done = False
    while not done:
        action = agent.act(np.asarray(obs, dtype=np.float32)[None], deterministic=deterministic)[0]
        obs, _, terminated, truncated, _ = env.step(action)
        frames.append(env.render())
        done = terminated or truncated
    fps = int(round(env.metadata.get("render_fps") or 1.0 / env.unwrapped.dt))
    env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    if path.suffix.lower() == ".gif":
        imageio.mimsave(tmp, frames[::2], duration=2000 / fps, loop=0)  # every other frame keeps GIFs small
    else:
        imageio.mimsave(tmp, frames, fps=fps, macro_block_size=1)
    os.replace(tmp, path)
    return len(frames)


def _eval(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if args.video:
        check_video_target(Path(args.video))
        choose_gl()
    m = evaluate_run(folder, args.episodes, args.deterministic, args.seed)
    mode = "deterministic" if args.deterministic else "stochastic"
    n = int(m["eval/episodes"])
    print(f"eval of {folder} at {m['env_steps']:,} env steps: {n} {mode} episodes (env seeds {m['seed']}..{m['seed'] + n - 1})")
    print_metrics({"mean ± std": m})
    print(f"  episode cost per episode (limit d = {m['eval/cost_limit']:g}); violation = max(0, cost - d)")
    if args.video:
        frames = record_video(folder, Path(args.video), args.deterministic, args.seed)
        print(f"  video                 {args.video} ({frames} frames, MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on fresh envs (optionally record a video)",
                       description="Evaluate checkpoints/last.pt of a run folder: return, episode cost, violation, win rate vs "
                                   "the reference; --video renders one episode offscreen (EGL or OSMesa, chosen when MUJOCO_GL is unset).")
    p.add_argument("folder", help="a run folder (runs/<env>/<agent>/<stamp>)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to evaluate (default 10)")
    p.add_argument("--seed", type=int, default=None, help="first env seed (default: the run's seed + 300000, unseen in training)")
    p.add_argument("--video", default=None, metavar="FILE", help="write one episode as .mp4 (needs imageio-ffmpeg) or .gif")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true", default=True, help="mean action (default)")
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", help="sample actions")
    p.set_defaults(func=_eval)
