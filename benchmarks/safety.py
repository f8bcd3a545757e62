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

Stability frontier (issue 15): PD, PID, OPD, OPD dual-only, OPD primal-only over dual step sizes, each
run's cost curve (the per-iteration cost estimate the multiplier sees) split into a slow part (moving
average) and a fast part, the multiplier's peak-to-peak over the second half, the last-10% cost against
the limit and the final return:

    python benchmarks/safety.py --frontier --etas 0.002,0.006,0.02 --seeds 0,1 --steps 100000 --out benchmarks/frontier.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
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


# ---- stability frontier (issue 15) ------------------------------------------------------------------
VARIANTS = {  # name -> overrides of the ppo-lag preset at dual step size eta (PID: all three gains = eta)
    "pd": lambda eta: ["agent.constraint.method=pd", f"agent.constraint.lam_lr={eta}"],
    "pid": lambda eta: ["agent.constraint.method=pid", f"agent.constraint.ki={eta}", f"agent.constraint.kp={eta}", f"agent.constraint.kd={eta}"],
    "opd": lambda eta: ["agent.constraint.method=opd", f"agent.constraint.lam_lr={eta}"],
    "opd-dual-only": lambda eta: ["agent.constraint.method=opd", f"agent.constraint.lam_lr={eta}", "agent.constraint.primal_optimism=false"],
    "opd-primal-only": lambda eta: ["agent.constraint.method=opd", f"agent.constraint.lam_lr={eta}", "agent.constraint.dual_optimism=false"],
}


def split_oscillation(cost: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``cost = slow + fast``: ``slow`` the centred moving average over ``window`` iterations (the drift
    the multiplier can act on), ``fast`` the rest (mostly the noise of one rollout's estimate)."""
    pad = np.pad(cost, (window // 2, window - 1 - window // 2), mode="edge")
    slow = np.convolve(pad, np.ones(window) / window, mode="valid")
    return slow, cost - slow


def frontier_one(variant: str, eta: float, seed: int, steps: int, env: str, sets: list[str], window: int) -> dict:
    """One run; figures over the second half of the per-iteration cost estimates (last 10% for violation)."""
    from rl_align.runs import resolve_config
    from rl_align.train import train

    cfg = resolve_config(env, "ppo-lag", ["run.progress=false", "run.out_dir=runs/bench-frontier", *sets, *VARIANTS[variant](eta)], steps=steps, seed=seed)
    folder, summary = train(cfg, quiet=True)
    it = [r for r in csv.DictReader(open(folder / "progress.csv")) if r.get("safety/cost_estimate")]
    col = lambda k: np.array([float(r[k]) if r.get(k) else np.nan for r in it])  # noqa: E731
    cost, lam, d = col("safety/cost_estimate"), col("safety/lambda"), cfg.env.cost.limit
    slow, fast = split_oscillation(cost, window)
    half, tail = len(cost) // 2, max(1, len(cost) // 10)
    last = float(cost[-tail:].mean())
    return {"variant": variant, "eta": eta, "seed": seed, "steps": steps, "limit": d, "iterations": len(cost),
            "slow_osc": float(slow[half:].std()), "fast_osc": float(fast[half:].std()), "lam_ptp": float(np.ptp(lam[half:])),
            "last10_cost": last, "last10_violation": max(0.0, last - d), "within_10pct": bool(last <= 1.1 * d),
            "primal_shift": float(np.nanmean(np.abs(col("safety/primal_shift")[half:]))),
            "return_det": summary["final"]["eval/return_det"], "cost_det": summary["final"]["eval/cost_det"],
            "return_rollout": float(np.nanmean(col("rollout/ep_return")[-tail * 2:])), "wall_s": summary["wall_time_s"],
            "folder": str(folder), "curve": {"step": col("step").tolist(), "cost": cost.tolist(), "lam": lam.tolist()}}


def frontier_table(results: list[dict]) -> str:
    """Per variant and step size: mean ± std [min, max] over seeds (n given)."""
    f = lambda xs: f"{np.mean(xs):,.2f} ± {np.std(xs):,.2f} [{np.min(xs):,.2f}, {np.max(xs):,.2f}]"  # noqa: E731
    lines = ["| variant | eta | n | slow osc. | fast osc. | lam peak-to-peak | last-10% cost | within 10% of d | return (det) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        for eta in sorted({r["eta"] for r in results if r["variant"] == variant}):
            rs = [r for r in results if r["variant"] == variant and r["eta"] == eta]
            lines.append(f"| {variant} | {eta:g} | {len(rs)} | {f([r['slow_osc'] for r in rs])} | {f([r['fast_osc'] for r in rs])} | "
                         f"{f([r['lam_ptp'] for r in rs])} | {f([r['last10_cost'] for r in rs])} | {sum(r['within_10pct'] for r in rs)}/{len(rs)} | "
                         f"{f([r['return_det'] for r in rs])} |")
    return "\n".join(lines)


VERSUS_PD = (("slow_osc", "slow osc."), ("last10_cost", "last-10% cost"), ("return_det", "return (det)"), ("return_rollout", "return (rollout)"))


def versus_pd(results: list[dict]) -> str:
    """Each rule against PD at the same step size (or PD's only one, as in the 1M confirmation at each
    rule's best step size): IQM [95% interval] per metric and the probability that the rule is better
    (lower slow oscillation, higher return; the cost column has no better side, only the limit)."""
    from rl_align.stats import fmt, prob_improvement, summarize

    pd_etas = sorted({r["eta"] for r in results if r["variant"] == "pd"})
    lines = ["| variant | eta | vs PD at | " + " | ".join(name for _, name in VERSUS_PD) + " | P(slow osc. < PD) | P(return det > PD) |",
             "|---|---|---|" + "---|" * (len(VERSUS_PD) + 2)]
    for variant in VARIANTS:
        for eta in sorted({r["eta"] for r in results if r["variant"] == variant}):
            base_eta = eta if eta in pd_etas else (pd_etas[0] if len(pd_etas) == 1 else None)
            if base_eta is None:
                continue
            rs = [r for r in results if r["variant"] == variant and r["eta"] == eta]
            base = [r for r in results if r["variant"] == "pd" and r["eta"] == base_eta]
            cells = [fmt(summarize([r[k] for r in rs]), 1) for k, _ in VERSUS_PD]
            if variant == "pd":
                cells += ["–", "–"]
            else:
                cells += [f"{prob_improvement([-r['slow_osc'] for r in rs], [-r['slow_osc'] for r in base]):.2f}",
                          f"{prob_improvement([r['return_det'] for r in rs], [r['return_det'] for r in base]):.2f}"]
            lines.append(f"| {variant} | {eta:g} | {base_eta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_plot(results: list[dict], out: Path, window: int) -> None:
    """Per rule (and step size): the cost estimate's slow part and the multiplier against env steps, one
    line per seed, the limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["variant"], r["eta"]) for r in results))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for k, key in enumerate(keys):
        for i, r in enumerate(r for r in results if (r["variant"], r["eta"]) == key):
            c = r["curve"]
            slow, _ = split_oscillation(np.asarray(c["cost"]), window)
            label = f"{key[0]} eta={key[1]:g}" if i == 0 else None
            ax1.plot(c["step"], slow, color=f"C{k}", alpha=0.7, lw=1, label=label)
            ax2.plot(c["step"], c["lam"], color=f"C{k}", alpha=0.7, lw=1, label=label)
    ax1.axhline(results[0]["limit"], color="k", ls="--", lw=1, label="limit d")
    ax1.set_ylabel(f"episode cost estimate ({window}-iteration moving average)")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("multiplier lambda")
    ax2.set_yscale("symlog", linthresh=1)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("env steps")
    fig.suptitle("Velocity cost and multiplier over training, one line per seed")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def frontier(args: argparse.Namespace) -> None:
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        print(f"safety.py: error: unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        raise SystemExit(2)
    if not args.table_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for eta in (float(e) for e in args.etas.split(",")):
                for variant in args.variants.split(","):
                    r = frontier_one(variant, eta, seed, args.steps, args.env, args.set, args.window)
                    print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
    results = [json.loads(line) for line in open(args.out)]
    print(frontier_table(results))
    print()
    print(versus_pd(results))
    if args.frontier_plot:
        frontier_plot(results, Path(args.frontier_plot), args.window)


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
    p.add_argument("--frontier", action="store_true", help="stability frontier: --variants x --etas x --seeds on the ppo-lag preset")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--etas", default="0.002,0.006,0.02")
    p.add_argument("--frontier-plot", default=None, help="with --frontier: draw the rows' cost and multiplier curves to this PNG")
    p.add_argument("--window", type=int, default=10, help="moving-average window (iterations) of the slow part")
    args = p.parse_args()
    if args.frontier:
        return frontier(args)
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
