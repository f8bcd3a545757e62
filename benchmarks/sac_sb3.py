"""rl-align's SAC against stable-baselines3's SAC at matched settings (256x256 ReLU, batch 256, one update
per env step, lr 3e-4, tau 0.005, learned temperature from 1.0, 100 random steps, buffer 1M), side by side.

    python benchmarks/sac_sb3.py speed --steps 3000 --repeats 3            # env steps/s of both, alternating, same process
    python benchmarks/sac_sb3.py learn --root /work/bench/sb3 --seeds 0 1 2 3 4 --steps 200000   # resumable per seed
    python benchmarks/sac_sb3.py report --root /work/bench/sb3   # or --rows benchmarks/sac_sb3_learn.jsonl; writes a figure

``speed`` times both on HalfCheetah-v5 after their 100 warm-up steps (so updates dominate), in
alternation, and prints each repeat and the median ratio. ``learn`` trains both per seed and continues an
interrupted run where it stopped (rl-align's from its run folder, exactly; SB3's from its model and replay
buffer saved every 20k steps) and writes the final deterministic and stochastic
return over 10 episodes to ``<root>/rows.jsonl``; ``report`` compares them the rliable way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pebble_protocol import read_record, save_figure  # noqa: E402  (benchmarks/ is this script's own folder)
from rl_align.stats import fmt, prob_improvement, prob_improvement_ci, summarize  # noqa: E402

TASK = "HalfCheetah-v5"


def ours(steps: int, seed: int, out: Path, threads: int) -> tuple[float | None, dict | None]:
    """Train rl-align's SAC, or continue this seed's interrupted run folder from its last checkpoint
    (then the env steps/s, which would cover only part of the run, is None)."""
    from rl_align.runs import load_run_config, resolve_config
    from rl_align.train import resume, train

    stopped = [f for f in sorted(out.glob(f"*/sac/*-s{seed}")) if (f / "checkpoints" / "last.pt").exists() and not (f / "summary.json").exists()
               and load_run_config(f).run.steps == steps]  # a run of these steps, so its row's steps are right
    if stopped:
        return None, resume(stopped[-1], quiet=True)[1]
    cfg = resolve_config(TASK, "sac", [f"run.out_dir={out}", "run.progress=false", f"run.torch_threads={threads}", "run.eval_episodes=10"],
                         steps=steps, seed=seed)
    t0 = time.perf_counter()
    _, summary = train(cfg, quiet=True)
    return steps / (time.perf_counter() - t0), summary


class SB3Saver(BaseCallback):
    """Every ``SB3_SAVE_EVERY`` steps, SB3's model and replay buffer into ``<save>/<step>/``, then ``<save>/latest``
    names that folder (written last and atomically, so a kill mid-save leaves the previous one in force)."""

    def __init__(self, save: Path):
        super().__init__()
        self.save = save

    def _on_step(self) -> bool:
        if self.num_timesteps % SB3_SAVE_EVERY == 0:
            at = self.save / str(self.num_timesteps)
            at.mkdir(parents=True, exist_ok=True)
            self.model.save(at / "model.zip")
            self.model.save_replay_buffer(at / "replay_buffer.pkl")
            (self.save / "latest.tmp").write_text(at.name)
            (self.save / "latest.tmp").replace(self.save / "latest")
            for old in self.save.iterdir():
                if old.is_dir() and old != at:
                    shutil.rmtree(old)
        return True


def sb3(steps: int, seed: int, threads: int, evaluate: bool, device: str = "cpu", save: Path | None = None) -> tuple[float | None, dict | None]:
    """Train SB3's SAC; with ``save``, write its model and replay buffer there every ``SB3_SAVE_EVERY`` steps and
    continue from them if they exist (SB3 keeps no RNG state in them, so a continued run is not bit-identical to an
    uninterrupted one; its env steps/s is then None)."""
    import gymnasium as gym
    from stable_baselines3 import SAC

    torch.set_num_threads(threads)
    env = gym.make(TASK)
    latest = save / "latest" if save is not None else None
    resumed = latest is not None and latest.exists()
    if resumed:
        at = save / latest.read_text()
        model = SAC.load(at / "model.zip", env=env, device=device)
        model.load_replay_buffer(at / "replay_buffer.pkl")
    else:
        model = SAC("MlpPolicy", env, seed=seed, verbose=0, device=device)  # its defaults are the matched settings
    t0 = CLOCK()
    model.learn(total_timesteps=steps - model.num_timesteps, callback=None if save is None else SB3Saver(save), reset_num_timesteps=not resumed)
    sps = None if resumed else steps / (CLOCK() - t0)
    if not evaluate:
        return sps, None
    out = {}
    for mode, det in (("det", True), ("stoch", False)):
        rets = []
        for i in range(10):
            e = gym.make(TASK)
            obs, _ = e.reset(seed=seed + 100_000 + i)
            done, ret = False, 0.0
            while not done:
                a, _ = model.predict(obs, deterministic=det)
                obs, r, te, tr, _ = e.step(a)
                ret, done = ret + r, te or tr
            rets.append(ret)
        out[f"eval/return_{mode}"] = float(np.mean(rets))
    return sps, {"final": out}


SB3_SAVE_EVERY = 20_000
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # process: CPU seconds of this process (robust to a busy machine)
CLOCK = CLOCKS["wall"]


def ours_training_speed(steps: int, seed: int, threads: int, device: str = "cpu") -> float:
    """Env steps/s of the training loop's work alone (collect, which holds SAC's updates, and update), no evaluation."""
    from rl_align.agents.base import EpisodeTracker
    from rl_align.runs import build_agent, resolve_config

    cfg = resolve_config(TASK, "sac", [f"run.torch_threads={threads}", f"run.device={device}"], steps=steps, seed=seed)
    agent, env = build_agent(cfg)
    obs, tracker = env.reset(), EpisodeTracker(env.n_envs)
    t0 = CLOCK()
    while agent.env_steps < steps:
        obs = agent.collect(env, obs, tracker)
        agent.update(tracker.pop())
    return agent.env_steps / (CLOCK() - t0)


def cmd_speed(args) -> None:
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    rows = []
    for k in range(args.repeats):
        a = ours_training_speed(args.steps, k, args.threads, args.device)
        b, _ = sb3(args.steps, k, args.threads, evaluate=False, device=args.device)
        rows.append((a, b))
        print(f"repeat {k}: rl-align {a:.1f} env steps/s, SB3 {b:.1f}, ratio {a / b:.2f}", flush=True)
    print(f"median: rl-align {statistics.median(r[0] for r in rows):.1f}, SB3 {statistics.median(r[1] for r in rows):.1f}, "
          f"ratio {statistics.median(r[0] / r[1] for r in rows):.2f} ({args.steps} steps incl. 100 warm-up, {args.threads} thread(s), "
          f"{args.clock} clock, {args.device})")


def finished(root: Path) -> set[tuple[str, int]]:
    """(impl, seed) of the rows already written: read before each run, so queues sharing a root skip each other's."""
    return {(r["impl"], r["seed"]) for r in read_record(root / "rows.jsonl")}


def cmd_learn(args) -> None:
    args.root.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for impl in args.impl:
            if (impl, seed) in finished(args.root):
                continue
            sps, s = ours(args.steps, seed, args.root / "rl-align", 1) if impl == "rl-align" else \
                sb3(args.steps, seed, 1, evaluate=True, save=args.root / "sb3" / f"s{seed}")
            row = {"impl": impl, "seed": seed, "steps": args.steps, "sps": sps, **s["final"]}
            with (args.root / "rows.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)


NAMES = {"det": "deterministic", "stoch": "stochastic"}


def cmd_report(args) -> None:
    """IQM [95% CI] of each side's final return, P(rl-align > SB3) with its interval, and a figure of every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = args.steps
    rows = [r for r in args.record if r["steps"] == steps]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharey=True)
    for ax, mode in zip(axes, ("det", "stoch")):
        by = {impl: {r["seed"]: r[f"eval/return_{mode}"] for r in rows if r["impl"] == impl} for impl in ("rl-align", "sb3")}
        for k, (impl, v) in enumerate(by.items()):
            sm = summarize(list(v.values()))
            print(f"{mode:5} {impl:9} {fmt(sm)}  seeds {sorted(v)}")
            if v:
                ax.plot([k] * len(v), list(v.values()), "o", color=f"C{k}", alpha=0.6)
                lo, hi = (sm["ci_lo"], sm["ci_hi"]) if sm["n"] > 1 else (sm["iqm"], sm["iqm"])
                ax.errorbar([k + 0.15], [sm["iqm"]], yerr=[[sm["iqm"] - lo], [hi - sm["iqm"]]], fmt="s", color="k", capsize=4)
        if min(len(v) for v in by.values()) >= 2:
            a, b = list(by["rl-align"].values()), list(by["sb3"].values())
            lo, hi = prob_improvement_ci(a, b)
            p = prob_improvement(a, b)
            print(f"{mode:5} P(rl-align > SB3) = {p:.2f} [{lo:.2f}, {hi:.2f}]")
            ax.set_title(f"{NAMES[mode]}: P(rl-align > SB3) = {p:.2f} [{lo:.2f}, {hi:.2f}]", fontsize=9)
        else:
            ax.set_title(NAMES[mode], fontsize=9)
        ax.set_xticks([0, 1], [f"rl-align (n={len(by['rl-align'])})", f"SB3 (n={len(by['sb3'])})"])
        ax.set_xlim(-0.5, 1.6)
    axes[0].set_ylabel("return, 10 episodes")
    fig.suptitle(f"SAC at matched settings, {TASK}, {steps:,} steps (dots: seeds; squares: IQM, 95% CI)", fontsize=9)
    save_figure(fig, args.figure or args.rows.parent / "sac_sb3_learn.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall seconds, or CPU seconds of this process")
    s.add_argument("--device", default="cpu", help="torch device of both (cpu, cuda)")
    ln = sub.add_parser("learn")
    ln.add_argument("--root", type=Path, required=True)
    ln.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ln.add_argument("--steps", type=int, default=200_000)
    ln.add_argument("--impl", nargs="+", default=["rl-align", "sb3"])
    r = sub.add_parser("report")
    r.add_argument("--root", type=Path, default=None, help="the root `learn` wrote to (reads <root>/rows.jsonl)")
    r.add_argument("--rows", type=Path, default=None, help="a rows file instead, e.g. benchmarks/sac_sb3_learn.jsonl")
    r.add_argument("--figure", type=Path, default=None, help="PNG to write (default: sac_sb3_learn.png beside the rows)")
    r.add_argument("--steps", type=int, default=None, help="the run length to report when the rows hold several")
    args = p.parse_args()
    if args.cmd == "report":
        args.rows = args.rows or (args.root / "rows.jsonl" if args.root else None)
        if args.rows is None or not args.rows.is_file():
            p.error(f"no rows file {args.rows}: give --root of a `learn` run or --rows <rows.jsonl>")
        args.record = read_record(args.rows)
        lengths = sorted({r["steps"] for r in args.record})  # one run length per report
        if not lengths:
            p.error(f"{args.rows} holds no runs yet: let `learn` finish one")
        if args.steps is None and len(lengths) > 1 or args.steps not in (None, *lengths):
            p.error(f"{args.rows} holds runs of {', '.join(f'{n:,}' for n in lengths)} steps; choose one with --steps N")
        args.steps = args.steps or lengths[0]
    {"speed": cmd_speed, "learn": cmd_learn, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
