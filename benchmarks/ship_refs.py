"""Write the shipped reference policies in ``refs/``: the auto reference (PPO on the true reward, the
``ref: auto`` key of rl_align.agents.sail.auto_reference) of each ``*-pref`` env and seed, reduced to the
policy and its observation normalizer, so every machine starts preference runs from the same weights.

    python benchmarks/ship_refs.py --envs halfcheetah-pref hopper-pref walker2d-pref --seeds 0 1 2 3 4

Each reference is trained (once, cached in runs/_refs) exactly as ``ref: auto`` would train it, i.e. as
``rl-align train --env <env> --agent ppo --steps 50000 --seed <seed>``; refs/README.md records the command,
the key and the reference's evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from rl_align.train import auto_reference
    from rl_align.checkpoints import load_checkpoint
    from rl_align.runs import resolve_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["halfcheetah-pref", "hopper-pref", "walker2d-pref"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    args = p.parse_args()
    out = ROOT / "refs"
    out.mkdir(exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for env in args.envs:
        for seed in args.seeds:
            cfg = resolve_config(env, "sail-revkl", ["run.progress=false"], seed=seed)
            folder = auto_reference(cfg)
            if folder.suffix == ".pt":
                print(f"{env} seed {seed}: already shipped as {folder.name}")
                continue
            state = load_checkpoint(folder)
            torch.save({"policy": state["policy"], "obs_rms": state["obs_rms"]}, out / f"{folder.name}.pt")
            final = json.loads((folder / "summary.json").read_text())["final"]
            index[folder.name] = {"env": env, "task": cfg.env.task, "seed": seed, "command":
                                  f"rl-align train --env {env} --agent ppo --steps {cfg.agent.ref_steps} --seed {seed}",
                                  "return_det": final["eval/return_det"], "return_stoch": final["eval/return_stoch"]}
            index_path.write_text(json.dumps(index, indent=1, sort_keys=True))
            print(f"{env} seed {seed}: {folder.name}.pt  det {final['eval/return_det']:.1f}  stoch {final['eval/return_stoch']:.1f}", flush=True)


if __name__ == "__main__":
    main()
