"""The reward ensemble's early stop, before and after it left ties out: from the same saved state (a PEBBLE
run's last checkpoint: its ensemble and every label so far), one feedback session's fit under each rule,
at the run's own cap, batch and stop accuracy, timed.

    python benchmarks/rm_stop.py /work/bench/protocol/cheetah-run-pref/pebble-1000-stop-decided/s0/*/*/*/

"Before" is ``RewardEnsemble.fit`` as it was at 6546b79 (a tie counted as ranked right only when the
ensemble put the first segment at or below the second), read from git; "after" is this tree's. Both start
from the same weights, optimizer state and shuffle seed. Prints, per run, the labels, the ties among them,
and for each rule the epochs, seconds and the decided labels' accuracy at the end.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rl_align.agents.pebble import RewardEnsemble  # noqa: E402
from rl_align.agents.preferences import pair_accuracy  # noqa: E402
from rl_align.checkpoints import load_checkpoint  # noqa: E402
from rl_align.errors import UserError  # noqa: E402

BEFORE = "6546b79"  # the last commit whose fit counted ties in the stop


def fit_before() -> type:
    """``RewardEnsemble`` from the commit before the change, loaded from git as its own module."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:rl_align/agents/pebble.py"], capture_output=True, text=True, check=True).stdout
    path = Path("/tmp") / f"pebble_{BEFORE}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"pebble_{BEFORE}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.RewardEnsemble


def decided_accuracy(rm: RewardEnsemble) -> float:
    """Share of the stored decided labels whose preferred segment the ensemble-mean return ranks higher."""
    p = rm.pairs
    R1, R2 = (rm.segment_returns(SimpleNamespace(obs=p[f"obs{i}"], actions=p[f"act{i}"], mask=p[f"mask{i}"])).mean(0) for i in (1, 2))
    return pair_accuracy(R1, R2, p["label"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="PEBBLE run folders (their checkpoints/last.pt)")
    ap.add_argument("--seed", type=int, default=0, help="the shuffles' seed, the same for both rules")
    args = ap.parse_args()
    Before = fit_before()
    for run in args.runs:
        if not (run / "config.yaml").is_file():
            ap.error(f"{run} is not a run folder (no config.yaml)")
        a = yaml.safe_load((run / "config.yaml").read_text())["agent"]
        try:
            state = load_checkpoint(run).get("reward_model")  # its own one-line error when last.pt is missing or corrupt
        except UserError as exc:
            ap.error(str(exc))
        if state is None or not state["pairs"]:
            ap.error(f"{run} has no reward ensemble with labels: give a PEBBLE-family run past its first feedback session")
        obs_dim, act_dim = state["pairs"]["obs1"].shape[-1], state["pairs"]["act1"].shape[-1]
        labels = state["pairs"]["label"]
        print(f"{run}: {len(labels)} labels, {int((labels == 0.5).sum())} ties; cap {a['rm_epochs']} epochs, stop at {a['rm_stop_accuracy']}")
        for name, cls in (("before (ties counted)", Before), ("after (decided only)", RewardEnsemble)):
            rm = cls(obs_dim, act_dim, a["rm_hidden"], a["rm_ensemble"], a["rm_lr"])
            rm.load_state_dict(copy.deepcopy(state))
            t0 = time.perf_counter()
            m = rm.fit(a["rm_epochs"], a["rm_batch"], a["rm_stop_accuracy"], np.random.default_rng(args.seed))
            dt = time.perf_counter() - t0
            with torch.no_grad():
                acc = decided_accuracy(rm)
            print(f"  {name:22} {int(m['pebble/rm_epochs']):3d} epochs {dt:7.1f} s  decided labels ranked right {acc:.3f}")


if __name__ == "__main__":
    main()
