"""How closely a finished PEBBLE-family run's learned reward tracks the true one, read from the replay buffer
in its checkpoint (the ``learned`` column as the last relabel left it, beside the true ``rewards``):
Pearson correlation per step, per ``segment_len`` window (the unit the labels compare) and per episode
return, over the whole buffer and over its most recent ``--recent`` steps; over those recent steps also the
correlation among the steps of the upper half of the true reward (does it rank the gaits the policy ends
on?) and the share of steps in the top tenth of the learned reward's range (a member squashed by its tanh
piles up there).

    python benchmarks/reward_fidelity.py runs/cheetah-run-pref/pebble/<run> [more runs]
    python benchmarks/reward_fidelity.py runs/cheetah-run-pref/pebble/<run> --refit tanh linear

``--refit`` replays the run's reward learning offline on its own labels: a fresh ensemble of the run's
sizes takes the stored pairs in the order they arrived, ``queries_per_feedback`` per session, each session a
warm-started fit under the run's ``rm_epochs`` / ``rm_stop_accuracy`` as the agent does, with the output
given (``tanh``, B-Pref's, or ``linear``); then the same figures for that ensemble over the recent steps.
Correlation is invariant to the learned reward's scale and offset, which Bradley-Terry leaves free.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl_align.agents.pebble import RewardEnsemble  # noqa: E402
from rl_align.checkpoints import load_checkpoint  # noqa: E402
from rl_align.errors import UserError  # noqa: E402
from rl_align.runs import load_run_config  # noqa: E402


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")


def chronological(replay: dict) -> dict[str, np.ndarray]:
    """The buffer's columns oldest step first, ``[T, N, ...]``."""
    size, pos = int(replay["size"]), int(replay["pos"])
    order = (pos - size + np.arange(size)) % size if size else np.arange(0)
    return {k: replay[k].numpy()[order] for k in ("obs", "actions", "rewards", "learned", "terminated", "truncated")}


def sums(x: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sums of ``x [T]`` over the spans that end where ``ends [T]`` is true (an unfinished tail dropped)."""
    cut = np.flatnonzero(ends) + 1
    return np.array([p.sum() for p in np.split(x, cut)[: len(cut)]])


def top_of_range(true: np.ndarray, learned: np.ndarray) -> dict[str, float]:
    """Over one stretch of steps: the correlation among the steps of the upper half of the true reward, and
    the share of steps whose learned reward lies in the top tenth of its range."""
    upper = true >= np.median(true)
    lo, hi = learned.min(), learned.max()
    return {"step, upper half of the true reward": pearson(true[upper], learned[upper]),
            "share in the top tenth of its range": float((learned > hi - 0.1 * (hi - lo)).mean()) if hi > lo else float("nan")}


def by_quarter(true: np.ndarray, learned: np.ndarray) -> str:
    """The mean learned reward in each quarter of the true reward's distribution, low to high."""
    edges = np.quantile(true, [0, 0.25, 0.5, 0.75, 1])
    return "  ".join(f"{learned[(true >= a) & (true <= b)].mean():+.2f}" for a, b in zip(edges[:-1], edges[1:]))


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
    out.update({f"{k} (last {recent:,})": v for k, v in top_of_range(cols["rewards"][-recent:].ravel(), cols["learned"][-recent:].ravel()).items()})
    return out


def refit(agent, pairs: dict[str, torch.Tensor], output: str, seed: int = 0) -> tuple[RewardEnsemble, int, int]:
    """The run's reward learning replayed on its stored pairs, session by session; ``(ensemble, sessions, epochs)``."""
    torch.manual_seed(seed)
    obs_dim, act_dim = pairs["obs1"].shape[-1], pairs["act1"].shape[-1]
    rm = RewardEnsemble(obs_dim, act_dim, agent.rm_hidden, agent.rm_ensemble, agent.rm_lr, output)
    rng, n, epochs, sessions = np.random.default_rng(seed), len(pairs["label"]), 0, 0
    for s in range(agent.queries_per_feedback, n + agent.queries_per_feedback, agent.queries_per_feedback):
        rm.pairs = {k: v[:s] for k, v in pairs.items()}
        epochs += int(rm.fit(agent.rm_epochs, agent.rm_batch, agent.rm_stop_accuracy, rng)["pebble/rm_epochs"])
        sessions += 1
    return rm, sessions, epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of finished pebble / pebble-revkl runs")
    p.add_argument("--recent", type=int, default=20_000, help="vector steps in the 'recent' part (default 20,000)")
    p.add_argument("--refit", nargs="+", choices=("tanh", "linear"), default=[], help="replay the run's reward learning with this output")
    args = p.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        try:
            cfg = load_run_config(run)
            state = load_checkpoint(run)
        except UserError as e:
            p.exit(2, f"reward_fidelity.py: {e}\n")
        agent = cfg.agent
        if getattr(agent, "reward", None) != "preferences":
            p.exit(2, f"reward_fidelity.py: {run} learns from the true reward (agent.reward={getattr(agent, 'reward', None)}); give a pebble-family run\n")
        if args.refit and agent.normalize_obs:
            p.exit(2, f"reward_fidelity.py: --refit reads raw observations and {run} normalizes them (agent.normalize_obs); leave out --refit\n")
        cols = chronological(state["replay"])
        print(f"{run}\n  the learned reward as the run left it (output {getattr(agent, 'rm_output', 'tanh')}):")
        for k, v in fidelity(cols, agent.segment_len, args.recent).items():
            print(f"    {k:52} {v:6.3f}")
        true = cols["rewards"][-args.recent:].ravel()
        print(f"    {'mean by quarter of the true reward (last ' + f'{args.recent:,})':52} {by_quarter(true, cols['learned'][-args.recent:].ravel())}")
        obs, act = cols["obs"][-args.recent:].reshape(-1, cols["obs"].shape[-1]), cols["actions"][-args.recent:].reshape(-1, cols["actions"].shape[-1])
        for output in args.refit:
            t0 = time.perf_counter()
            rm, sessions, epochs = refit(agent, state["reward_model"]["pairs"], output)
            pred = rm.predict(obs, act)
            print(f"  refit, {output} output ({sessions} sessions, {epochs} epochs, {time.perf_counter() - t0:.0f} s):")
            for k, v in {f"step (last {args.recent:,})": pearson(true, pred), **{f"{k} (last {args.recent:,})": v for k, v in top_of_range(true, pred).items()}}.items():
                print(f"    {k:52} {v:6.3f}")
            print(f"    {'mean by quarter of the true reward (last ' + f'{args.recent:,})':52} {by_quarter(true, pred)}")


if __name__ == "__main__":
    main()
