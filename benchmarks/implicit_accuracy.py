"""Does the implicit reward of a policy that learned rank fresh pairs? The held-out accuracy of issue 14.

For each run folder (a protocol row: the policy after training and the shipped reference it started
from), the policy acts for ``--rollouts`` rollouts of 8 envs x 250 steps (as SAIL-RevKL's preset trains),
the rollouts are cut into 50-step segments, every pair is labelled by the env's oracle, and three signals
rank the pairs:

- ``h``: the implicit reward ``sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)]`` (``beta`` does not change a
  ranking), what ``pref/heldout_accuracy`` measures for the SAIL family;
- ``h_centred``: ``h`` minus ``sum_t KL(pi || pi_ref)(s_t)``, its expectation over the actions at the
  segment's own states (``center_h``);
- ``return``: the segment's true return, the ceiling any signal can reach under the oracle's label noise.

Each policy sees states through its own normalizer (PPO's moves during training; SAIL's stays the
reference's). Run on PPO folders (trained on the true reward) it says whether the implicit reward of a
policy that closed the whole gap ranks fresh pairs; on SAIL-RevKL folders, what the agent logs.

    python benchmarks/implicit_accuracy.py --rows benchmarks/sail_protocol.jsonl --env halfcheetah-pref \
        --variant ppo --variant sail-revkl --out benchmarks/implicit_accuracy.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl_align.agents.base import EpisodeTracker  # noqa: E402
from rl_align.agents.preferences import label_pairs, pair_accuracy  # noqa: E402
from rl_align.buffer import RolloutBuffer  # noqa: E402
from rl_align.checkpoints import load_checkpoint  # noqa: E402
from rl_align.envs import Oracle, make_vec_env  # noqa: E402
from rl_align.evaluation import load_agent  # noqa: E402
from rl_align.nets import gaussian_kl  # noqa: E402

N_ENVS, N_STEPS, H = 8, 250, 50


def accuracies(folder: str, ref: str, rollouts: int, seed: int) -> dict:
    cfg, agent = load_agent(Path(folder))
    ref_agent = copy.deepcopy(agent)
    ref_agent.load_start(load_checkpoint(Path(ref)), ref)
    env = make_vec_env(cfg.env, N_ENVS, seed=seed)
    oracle = Oracle(cfg.env.oracle, seed=seed)
    rng = np.random.default_rng(seed)
    # the agent's own rollout loop, on a buffer of the preset's shape, its normalizer held fixed
    agent.buffer = RolloutBuffer(N_STEPS, N_ENVS, *agent.buffer.obs.shape[2:], agent.buffer.actions.shape[-1])
    agent.freeze_obs_rms, agent.act_rng = True, np.random.default_rng(seed + 1)
    raw, tracker = env.reset(), EpisodeTracker(N_ENVS)
    acc = {"h": [], "h_centred": [], "return": []}
    for _ in range(rollouts):
        raw = agent.collect(env, raw, tracker)
        lp = label_pairs(agent.buffer, H, None, rng, oracle)
        seg = lp.seg
        with torch.no_grad():
            a = torch.as_tensor(seg.actions.reshape(-1, seg.actions.shape[-1]))
            s = seg.raw_obs.reshape(-1, seg.raw_obs.shape[-1])
            mine, theirs = torch.as_tensor(agent.normalize(s)), torch.as_tensor(ref_agent.normalize(s))
            ratio = agent.policy.log_prob(mine, a) - ref_agent.policy.log_prob(theirs, a)
            kl = gaussian_kl(agent.policy.mean(mine), agent.policy.log_std, ref_agent.policy.mean(theirs), ref_agent.policy.log_std)
            mask = torch.as_tensor(seg.mask.reshape(-1), dtype=torch.float32)
            h = (ratio * mask).reshape(seg.mask.shape).sum(-1)
            h_c = h - (kl * mask).reshape(seg.mask.shape).sum(-1)
        i, j = torch.as_tensor(lp.i), torch.as_tensor(lp.j)
        keep = torch.as_tensor((lp.labels == 0.0) | (lp.labels == 1.0))
        i, j, pref1 = i[keep], j[keep], torch.as_tensor(lp.labels[keep.numpy()], dtype=torch.float32)
        ret = torch.as_tensor(oracle.returns(seg), dtype=torch.float32)
        for k, sig in (("h", h), ("h_centred", h_c), ("return", ret)):
            acc[k].append(pair_accuracy(sig[i], sig[j], pref1))
    env.close()
    return {k: float(np.mean(v)) for k, v in acc.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", required=True, help="a sail_protocol.py jsonl")
    ap.add_argument("--env", default="halfcheetah-pref")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.rows)]
    for r in rows:
        if r["env"] != args.env or r["variant"] not in args.variant:
            continue
        if not Path(r["folder"]).exists():
            print(f"skipped {r['variant']} seed {r['seed']}: {r['folder']} is gone", file=sys.stderr)
            continue
        res = {"env": r["env"], "variant": r["variant"], "seed": r["seed"], "steps": r["steps"], "rows": args.rows,
               "folder": r["folder"], "rollouts": args.rollouts, **accuracies(r["folder"], r["ref"], args.rollouts, 700_000 + r["seed"])}
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k not in ("folder", "rows")}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
