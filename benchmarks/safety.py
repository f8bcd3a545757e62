"""Constraint violation over training: ppo, ppo-lag, ppo-pid, ppo-opd (or the SAIL-RevKL family) on
HalfCheetah-v5 with the Safety-Gymnasium velocity cost (threshold 3.2096, limit 25 per 1000-step episode).

Per agent and seed: final return (deterministic eval), final episode cost (mean of the last 5
iterations' finished episodes), cumulative violation sum_k max(0, Jc_k - d), oscillation amplitude
(std of the per-iteration episode cost over the second half of training); a plot of cost and the
multiplier against env steps with the limit drawn. Results are appended to a JSON-lines file as each
run ends, so a cut-short benchmark keeps what it measured.

    python benchmarks/safety.py --agents ppo-lag,ppo-pid,ppo-opd --seeds 0,1,2 --steps 200000
    python benchmarks/safety.py --table --out benchmarks/safety_500k.jsonl   # only the tables, no run, no plot

Table cells are IQM [95% bootstrap interval] · mean ± sample std (n seeds) (``rl_align.stats``); the
probability-of-improvement table compares each constrained agent with PPO-Lag (lower cost, violation and
oscillation count as better).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def run_one(agent: str, seed: int, steps: int, env: str, sets: list[str]) -> dict:
    from rl_align.runs import resolve_config
    from rl_align.train import train

    extra = ["agent.constraint.method=none"] if agent == "ppo" else []
    preset = "ppo-lag" if agent == "ppo" else agent  # unconstrained PPO: same hyperparameters, no layer
    cfg = resolve_config(env, preset, ["run.progress=false", "run.out_dir=runs/bench-safety", *extra, *sets], steps=steps, seed=seed)
    folder, summary = train(cfg, quiet=True)
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    it = [r for r in rows if r.get("rollout/ep_cost")]
    step = np.array([float(r["step"]) for r in it])
    cost = np.array([float(r["rollout/ep_cost"]) for r in it])
    lam = np.array([float(r.get("safety/lambda") or 0.0) for r in it])
    d = cfg.env.cost.limit
    half = cost[len(cost) // 2:]
    return {"agent": agent, "seed": seed, "steps": steps, "final_return": summary["final"]["eval/return_det"],
            "final_return_stoch": summary["final"]["eval/return_stoch"], "final_ep_cost": float(cost[-5:].mean()),
            "cum_violation": float(np.maximum(cost - d, 0).sum()), "oscillation": float(half.std()), "limit": d,
            "wall_s": summary["wall_time_s"], "folder": str(folder), "curve": {"step": step.tolist(), "cost": cost.tolist(), "lam": lam.tolist()}}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = sorted({r["agent"] for r in results})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for k, agent in enumerate(agents):
        for r in (r for r in results if r["agent"] == agent):
            c = r["curve"]
            label = agent if r["seed"] == min(x["seed"] for x in results if x["agent"] == agent) else None
            ax1.plot(c["step"], c["cost"], color=f"C{k}", alpha=0.7, lw=1, label=label)
            ax2.plot(c["step"], c["lam"], color=f"C{k}", alpha=0.7, lw=1, label=label)
    ax1.axhline(results[0]["limit"], color="k", ls="--", lw=1, label="limit d")
    ax1.set_ylabel("episode cost")
    ax1.set_yscale("symlog", linthresh=10)
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.set_ylabel("multiplier lambda")
    ax2.set_xlabel("env steps")
    fig.suptitle("HalfCheetah-v5 velocity cost: cost and multiplier over training (one line per seed)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


METRICS = (("final_return", "final return", False), ("final_ep_cost", "final episode cost", True),
           ("cum_violation", "cumulative violation", True), ("oscillation", "oscillation (std, 2nd half)", True),
           ("lam_std", "multiplier std, 2nd half", True))


def _value(r: dict, key: str) -> float:
    if key == "lam_std":  # how much the multiplier swings once training has settled
        lam = np.asarray(r["curve"]["lam"])
        return float(lam[len(lam) // 2:].std())
    return float(r[key])


def table(results: list[dict]) -> str:
    from rl_align.stats import fmt, prob_improvement, prob_improvement_ci, summarize

    agents = list(dict.fromkeys(r["agent"] for r in results))
    layered = {a for a in agents if any(np.any(r["curve"]["lam"]) for r in results if r["agent"] == a)}  # has a multiplier
    shown = lambda a, k: k != "lam_std" or a in layered  # noqa: E731
    lines = ["| agent | " + " | ".join(name for _, name, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for agent in agents:
        rs = [r for r in results if r["agent"] == agent]
        lines.append(f"| {agent} | " + " | ".join(fmt(summarize([_value(r, k) for r in rs]), 3 if k == "lam_std" else 1) if shown(agent, k) else "–"
                                               for k, _, _ in METRICS) + " |")
    base = next((a for a in agents if a.endswith("-lag")), None)
    if base is None:
        return "\n".join(lines)
    lines += ["", f"Probability that X beats {base} (ties 1/2; lower is better for cost, violation, oscillation, multiplier swing), "
              "95% bootstrap interval:", "", "| X vs " + base + " | " + " | ".join(name for _, name, _ in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for agent in (a for a in agents if a != base):
        cells = []
        for k, _, lower in METRICS:
            if not (shown(agent, k) and shown(base, k)):
                cells.append("–")
                continue
            sign = -1.0 if lower else 1.0
            a = [sign * _value(r, k) for r in results if r["agent"] == agent]
            b = [sign * _value(r, k) for r in results if r["agent"] == base]
            lo, hi = prob_improvement_ci(a, b)
            cells.append(f"{prob_improvement(a, b):.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo == lo else ""))
        lines.append(f"| {agent} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="ppo,ppo-lag,ppo-pid,ppo-opd")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--env", default="halfcheetah")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="benchmarks/safety.jsonl")
    p.add_argument("--plot", default="docs/safety/cost_lambda.png")
    p.add_argument("--table-only", action="store_true", help="only redraw the plot and table from --out")
    p.add_argument("--table", action="store_true", help="only print the tables from --out (no run, no plot)")
    args = p.parse_args()
    if args.table:
        print(table([json.loads(line) for line in open(args.out)]))
        return
    if not args.table_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for agent in args.agents.split(","):
                r = run_one(agent, seed, args.steps, args.env, args.set)
                print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
    results = [json.loads(line) for line in open(args.out)]
    plot(results, Path(args.plot))
    print(table(results))


if __name__ == "__main__":
    main()
