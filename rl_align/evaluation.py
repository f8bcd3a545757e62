"""``rl-align eval <run folder>``: evaluate a checkpoint on fresh envs, optionally with a video.

Return, episode cost, violation ``max(0, Jc - d)``, share of episodes over the cost budget, and the
agent's extra metrics (win rate against the reference under the run's oracle, KL to the reference) when
it has them. Videos are rendered offscreen by MuJoCo; with ``MUJOCO_GL`` unset on a headless Linux machine
the backend (EGL, then OSMesa) is chosen by :func:`rl_align.envs.backend.choose_gl`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from rl_align.envs.backend import GL_HINT, choose_gl
from rl_align.errors import UserError

def load_agent(folder: Path):
    """``(config, agent)`` of a run folder, the agent holding the weights of ``checkpoints/last.pt``."""
    from rl_align.runs import load_checkpoint, load_run_config
    from rl_align.train import build_agent

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
    """Metrics of the run's last checkpoint over ``episodes`` fresh episodes (env seeds ``seed + i``)."""
    from rl_align.train import evaluate

    if episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}")
    cfg, agent = load_agent(folder)
    seed = cfg.run.seed + 300_000 if seed is None else seed
    res = evaluate(agent, cfg.env, episodes, seed=seed, deterministic=deterministic)
    limit = float(cfg.env.cost.limit)
    m = {
        "return": float(res["return"].mean()), "return_std": float(res["return"].std()),
        "return_min": float(res["return"].min()), "return_max": float(res["return"].max()),
        "cost": float(res["cost"].mean()), "cost_limit": limit, "violation": max(0.0, float(res["cost"].mean()) - limit),
        "over_budget": float((res["cost"] > limit).mean()), "length": float(res["length"].mean()),
        "episodes": episodes, "seed": seed, "env_steps": agent.env_steps,
    }
    if hasattr(agent, "eval_extra"):
        m.update({k.removeprefix("eval/"): v for k, v in agent.eval_extra(cfg).items()})
    return m


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
    try:
        env = make_env(cfg.env, seed=None, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
    except UserError:
        raise
    except Exception as exc:  # EGL/OSMesa missing or unusable: many exception types, one cause
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot render with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} ({detail}); {GL_HINT}") from None
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


def print_metrics(folder: Path, m: dict, deterministic: bool) -> None:
    mode = "deterministic" if deterministic else "stochastic"
    print(f"eval of {folder} at {m['env_steps']:,} env steps: {m['episodes']} {mode} episodes (env seeds {m['seed']}..{m['seed'] + m['episodes'] - 1})")
    print(f"  return                {m['return']:10.1f} ± {m['return_std']:.1f}  [min {m['return_min']:.1f}, max {m['return_max']:.1f}]")
    print(f"  episode cost          {m['cost']:10.2f}  (limit d = {m['cost_limit']:g})")
    print(f"  violation             {m['violation']:10.2f}  (max(0, cost - d))")
    print(f"  episodes over budget  {m['over_budget']:10.0%}")
    print(f"  episode length        {m['length']:10.1f}")
    for key, label in (("win_rate_vs_ref", "win rate vs reference"), ("kl_to_ref", "KL to reference")):
        if key in m:
            print(f"  {label:<21} {m[key]:10.3f}")


def _eval(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if args.video:
        check_video_target(Path(args.video))
        choose_gl()
    m = evaluate_run(folder, args.episodes, args.deterministic, args.seed)
    print_metrics(folder, m, args.deterministic)
    if args.video:
        n = record_video(folder, Path(args.video), args.deterministic, args.seed)
        print(f"  video                 {args.video} ({n} frames, MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')})")
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
