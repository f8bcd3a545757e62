"""How closely a finished PEBBLE-family run's learned reward tracks the true one, read from the replay buffer
in its checkpoint (the ``learned`` column as the last relabel left it, beside the true ``rewards``):
Pearson correlation per step, per ``segment_len`` window (the unit the labels compare) and per episode
return, over the whole buffer and over its most recent ``--recent`` steps.

    python benchmarks/reward_fidelity.py /work/bench/protocol/cheetah-run-pref/pebble-stop-decided/s0/cheetah-run-pref/pebble/*

Each argument is a run folder (``checkpoints/last.pt`` inside it); the run's ``agent.segment_len`` sets the
window. Correlation is invariant to the learned reward's scale and offset, which Bradley-Terry leaves free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl_align.checkpoints import load_checkpoint  # noqa: E402
from rl_align.errors import UserError  # noqa: E402
from rl_align.runs import load_run_config  # noqa: E402


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")


def chronological(replay: dict) -> dict[str, np.ndarray]:
    """The buffer's columns oldest step first, ``[T, N]``."""
    size, pos = int(replay["size"]), int(replay["pos"])
    order = (pos - size + np.arange(size)) % size if size else np.arange(0)
    return {k: replay[k].numpy()[order] for k in ("rewards", "learned", "terminated", "truncated")}


def sums(x: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sums of ``x [T]`` over the spans that end where ``ends [T]`` is true (an unfinished tail dropped)."""
    cut = np.flatnonzero(ends) + 1
    return np.array([p.sum() for p in np.split(x, cut)[: len(cut)]])


def fidelity(cols: dict[str, np.ndarray], segment: int, recent: int) -> dict[str, float]:
    out = {}
    for part, sl in (("all", slice(None)), (f"last {recent:,}", slice(-recent, None))):
        r, lr = cols["rewards"][sl], cols["learned"][sl].astype(np.float64)
        done = (cols["terminated"] | cols["truncated"])[sl]
        T = len(r) - len(r) % segment
        seg_r = r[:T].reshape(-1, segment, r.shape[1]).sum(1).ravel()
        seg_l = lr[:T].reshape(-1, segment, r.shape[1]).sum(1).ravel()
        ep_r = np.concatenate([sums(r[:, n], done[:, n]) for n in range(r.shape[1])])
        ep_l = np.concatenate([sums(lr[:, n], done[:, n]) for n in range(r.shape[1])])
        out.update({f"step ({part})": pearson(r.ravel(), lr.ravel()), f"{segment}-step window ({part})": pearson(seg_r, seg_l),
                    f"episode return ({part}, {len(ep_r)} episodes)": pearson(ep_r, ep_l)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of finished pebble / pebble-revkl runs")
    p.add_argument("--recent", type=int, default=20_000, help="vector steps in the 'recent' part (default 20,000)")
    args = p.parse_args()
    for run in args.runs:
        try:
            cfg = load_run_config(run)
            state = load_checkpoint(run)
        except UserError as e:
            p.exit(2, f"reward_fidelity.py: {e}\n")
        if getattr(cfg.agent, "reward", None) != "preferences":
            p.exit(2, f"reward_fidelity.py: {run} learns from the true reward (agent.reward={getattr(cfg.agent, 'reward', None)}); give a pebble-family run\n")
        print(run)
        for k, v in fidelity(chronological(state["replay"]), cfg.agent.segment_len, args.recent).items():
            print(f"  {k:42} {v:6.3f}")


if __name__ == "__main__":
    main()
