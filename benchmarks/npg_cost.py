"""What one SAC gradient step costs with the natural-gradient actor step (``agent.actor_step=npg``) against
Adam, side by side in one process, at the batch the lab samples uniformly and at the npg script's newest
transitions (``agent.recent_batch``). The agent is the ``pebble-revkl-npg`` preset's on an env preset; its
replay buffer is filled with random transitions (the step's cost does not depend on what they hold).

    python benchmarks/npg_cost.py                                   # cheetah-run-pref, 128x128 nets
    python benchmarks/npg_cost.py --env walker-walk-pref --steps 20 --recent 0 4096

Prints the CPU milliseconds of one gradient step (process time, one thread, mean over ``--steps`` after
three warm-up steps) for each actor step and batch, and the ratio to Adam at the uniform batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl_align.runs import build_agent, resolve_config  # noqa: E402


def step_ms(env: str, sets: list[str], steps: int, fill: int = 5000) -> float:
    agent, vec = build_agent(resolve_config(env, "pebble-revkl-npg", [*sets, "agent.unsup_steps=0", "agent.learning_starts=0"],
                                            steps=max(fill, 10_000), seed=0))
    vec.close()
    rng = np.random.default_rng(0)
    for _ in range(fill):
        o = rng.standard_normal((1, agent.obs_dim)).astype(np.float32)
        agent.replay.add(o, o, rng.uniform(-1, 1, (1, agent.act_dim)), np.ones(1), np.zeros(1), np.zeros((1, 3)),
                         np.zeros(1, bool), np.zeros(1, bool), learned=0.5)
    agent.env_steps = fill  # past the unsupervised phase: the recent batch applies
    for _ in range(3):
        agent.gradient_step()
    t = time.process_time()
    for _ in range(steps):
        agent.gradient_step()
    return (time.process_time() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="cheetah-run-pref")
    ap.add_argument("--steps", type=int, default=10, help="timed gradient steps per setting")
    ap.add_argument("--recent", type=int, nargs="+", default=[0, 1024, 4096], help="recent_batch values (0: uniform batch)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = step_ms(args.env, ["agent.actor_step=adam", "agent.recent_batch=0"], args.steps)
    print(f"{'actor step':>10} {'batch':>14} {'ms / step':>10} {'x adam@uniform':>15}")
    print(f"{'adam':>10} {'uniform':>14} {base:10.1f} {1.0:15.2f}", flush=True)
    for recent in args.recent:
        for step in ("npg", "adam") if recent else ("npg",):
            ms = step_ms(args.env, [f"agent.actor_step={step}", f"agent.recent_batch={recent}"], args.steps)
            print(f"{step:>10} {f'newest {recent}' if recent else 'uniform':>14} {ms:10.1f} {ms / base:15.2f}", flush=True)


if __name__ == "__main__":
    main()
