"""How much of one SAIL update's direction do the labels fix? The split-half agreement of the DPO part at
the shipped reference policies, per setting.

For each setting and seed, the SAIL-RevKL agent starts from the seed's shipped reference, rolls out
``--rollouts`` batches (the policy stays the reference: no update) and measures ``grad/dpo_halves_cos``
on each: the cosine between the DPO part's gradients on two disjoint halves of the rollout's segments, in the
mean network's weights. Near 0, an update's direction is the sampling noise of the actions; the training
runs log the same quantity (``grad/dpo_halves_cos``) and PPO's anchor (``grad/pg_halves_cos``).

    python benchmarks/gradient_agreement.py --seeds 0 1 2 --rollouts 8 \\
        --setting preset= --setting anti8-seg10=shared_start=8,antithetic=true,segment_len=10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(env_name: str, seed: int, sets: list[str], rollouts: int, runs_dir: str) -> list[float]:
    import torch

    from rl_align.agents.base import EpisodeTracker
    from rl_align.agents.sail_objective import dpo_halves_cosine
    from rl_align.runs import build_agent, resolve_config
    from rl_align.train import auto_reference, prepare

    torch.set_num_threads(1)
    common = ["run.progress=false", f"run.out_dir={runs_dir}"]
    ref = auto_reference(resolve_config(env_name, "sail-revkl", common, seed=seed))
    cfg = resolve_config(env_name, "sail-revkl", common + [f"agent.ref={ref}"] + sets, seed=seed)
    agent, env = build_agent(cfg)
    prepare(agent, cfg)
    obs, tracker, out = env.reset(), EpisodeTracker(env.n_envs), []
    for _ in range(rollouts):
        obs = agent.collect(env, obs, tracker)
        fresh = agent._batch()
        if fresh is not None:
            out.append(dpo_halves_cosine(agent.policy, agent.ref_policy, agent._with_replay(fresh), agent.objective.coef))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="halfcheetah-pref")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--setting", action="append", default=[], help="LABEL=key=value,key=value (agent overrides; LABEL= for the preset)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gradient_agreement.jsonl")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    args = p.parse_args()
    for setting in args.setting or ["preset="]:
        label, _, rest = setting.partition("=")
        sets = [f"agent.{kv}" for kv in rest.split(",") if kv]
        cos = [c for s in args.seeds for c in measure(args.env, s, sets, args.rollouts, args.runs_dir)]
        row = {"env": args.env, "setting": label, "sets": sets, "seeds": args.seeds, "rollouts": args.rollouts, "cos": cos,
               "mean": float(np.mean(cos)), "se": float(np.std(cos, ddof=1) / np.sqrt(len(cos))), "median": float(np.median(cos))}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{label:<20} n={len(cos):>3}  mean {row['mean']:+.3f} ± {row['se']:.3f} (SE)  median {row['median']:+.3f}", flush=True)


if __name__ == "__main__":
    main()
