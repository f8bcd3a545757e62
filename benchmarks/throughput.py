"""Env steps/s of rl-align's PPO vs stable-baselines3 PPO at matched settings, side by side in one run.

Matched: HalfCheetah-v5, 1 env, 2048 steps per rollout, minibatch 64, 10 epochs, 64x64 tanh MLP,
observation normalization in both (SB3: VecNormalize). Runs alternate (ours, SB3, ours, SB3, ...)
so machine noise hits both; the ratio of medians is the figure.

    python benchmarks/throughput.py --steps 20480 --repeats 3
    python benchmarks/throughput.py --agent sail-revkl --n-envs 8   # a preference agent vs SB3 defaults
    python benchmarks/throughput.py --agent sail-revkl --set agent.ref=refs/HalfCheetah-v5-9c38c611f9-s0.pt \
        --against-set agent.diag_every=0 --against-set agent.curvature_every=0   # cost of the diagnostics
    python benchmarks/throughput.py --raw   # plain HalfCheetah-v5 stepping with random actions, the ceiling

``--against-set`` replaces SB3 by the same rl-align agent with those overrides (a ratio of two settings).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def ours(steps: int, agent: str, env: str, sets: list[str]) -> float:
    from rl_align.runs import resolve_config
    from rl_align.runs import build_agent
    from rl_align.train import prepare
    from rl_align.agents.base import EpisodeTracker

    cfg = resolve_config(env, agent, ["run.progress=false", *sets], steps=steps)
    agent_obj, venv = build_agent(cfg)
    prepare(agent_obj, cfg)
    tracker = EpisodeTracker(venv.n_envs)
    obs = venv.reset()
    t = time.perf_counter()
    while agent_obj.env_steps < steps:
        obs = agent_obj.collect(venv, obs, tracker)
        agent_obj.update(tracker.pop())
    return agent_obj.env_steps / (time.perf_counter() - t)


def sb3(steps: int, task: str) -> float:
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv = VecNormalize(DummyVecEnv([lambda: gym.make(task)]), norm_reward=False)
    model = PPO("MlpPolicy", venv, n_steps=2048, batch_size=64, n_epochs=10, seed=0, device="cpu", verbose=0)
    t = time.perf_counter()
    model.learn(total_timesteps=steps)
    return model.num_timesteps / (time.perf_counter() - t)


def raw(steps: int) -> float:
    """Env steps/s of bare ``gymnasium.make("HalfCheetah-v5")`` with random actions (no agent at all)."""
    import gymnasium as gym
    import numpy as np

    env = gym.make("HalfCheetah-v5")
    env.reset(seed=0)
    acts = np.random.default_rng(0).uniform(-1, 1, size=(steps,) + env.action_space.shape)
    t = time.perf_counter()
    for a in acts:
        _, _, te, tr, _ = env.step(a)
        if te or tr:
            env.reset()
    return steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20480)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agent", default="ppo")
    p.add_argument("--env", default="halfcheetah")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--against-set", action="append", default=None, help="compare with the same agent under these overrides instead of SB3")
    p.add_argument("--raw", action="store_true", help="also measure bare HalfCheetah-v5 stepping in each repeat")
    args = p.parse_args()
    torch.set_num_threads(1)
    other = f"rl-align {args.agent} with {' '.join(args.against_set)}" if args.against_set else "SB3 PPO"
    a, b, c = [], [], []
    for r in range(args.repeats):
        a.append(ours(args.steps, args.agent, args.env, args.set))
        torch.set_num_threads(1)
        b.append(ours(args.steps, args.agent, args.env, args.set + args.against_set) if args.against_set else sb3(args.steps, "HalfCheetah-v5"))
        c.append(raw(args.steps) if args.raw else float("nan"))
        print(f"repeat {r}: rl-align {args.agent} {a[-1]:,.0f} steps/s | {other} {b[-1]:,.0f} steps/s | ratio {a[-1] / b[-1]:.3f}"
              + (f" | raw env {c[-1]:,.0f} steps/s, share {a[-1] / c[-1]:.2f}" if args.raw else ""), flush=True)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"median: rl-align {args.agent} {ma:,.0f} steps/s, {other} {mb:,.0f} steps/s, ratio {ma / mb:.3f}x "
          f"({args.steps} steps x {args.repeats} repeats, torch threads 1)"
          + (f"; raw HalfCheetah-v5 {statistics.median(c):,.0f} steps/s, share reached {ma / statistics.median(c):.2f}" if args.raw else ""))


if __name__ == "__main__":
    main()
