"""The headline preference-learning table: PPO on the true reward (ceiling), classical RLHF, online
DPO, SAIL and SAIL-RevKL at equal env-step and query budgets, plus return-vs-queries curves.

Fairness: every agent starts from the same cached auto reference of its env and seed (a PPO run on the
true reward, the "SFT" policy): the SAIL family through ``agent.ref=auto``, ``ppo`` and ``rlhf`` through
``agent.init=<that folder>``. Every preference agent gets the oracle budget ``--queries`` and spends it
evenly over the run: SAIL variants label ``pairs_per_batch = queries / rollouts`` random pairs of each
rollout's segments, ``rlhf`` adds ``queries_per_update = queries / iterations`` pairs to its dataset each
iteration. The win rate against the reference is measured the same way for every agent after training
(matched 50-step segments of stochastic rollouts on the same env seeds, scored by the env's oracle).
"Return at half the query budget" is the deterministic evaluation return linearly interpolated at
``queries_used = queries / 2`` (for PPO, which asks none, at half the env steps).
Each finished run is appended to the JSON-lines file at once, so a cut-short benchmark keeps its runs.

    python benchmarks/headline.py --env halfcheetah-pref --seeds 0,1,2 --steps 100000 --queries 10000
    python benchmarks/headline.py --table            # markdown tables from benchmarks/headline.jsonl

The tables give every cell as IQM [95% stratified bootstrap interval] · mean ± sample std (n seeds)
(``rl_align.stats``), the deterministic return normalized per task (reference 0, PPO on the true reward
1) and aggregated across tasks, and the probability of improvement of the key pairs.
    python benchmarks/headline.py --plot docs/headline  # return-vs-queries and return-vs-steps PNGs
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

AGENTS = ("ppo", "rlhf", "online-dpo", "sail", "sail-revkl")
PAIRS = (("sail-revkl", "sail"), ("sail-revkl", "rlhf"), ("sail", "online-dpo"), ("sail-revkl", "online-dpo"), ("rlhf", "sail"))
WIN_EPISODES = 16  # episodes per side for the post-hoc win rate against the reference (Hopper: few 50-step windows per episode)


def agent_overrides(env: str, agent: str, steps: int, queries: int, ref: Path, revkl_coef: float) -> list[str]:
    """Overrides that give ``agent`` the reference start and an evenly spent query budget."""
    from rl_align.runs import resolve_config

    if agent == "ppo":
        return [f"agent.init={ref}"]
    cfg = resolve_config(env, agent, [])  # only the rollout shape is read here
    per_rollout = cfg.agent.n_envs * cfg.agent.n_steps
    rollouts = max(1, steps // per_rollout)
    per_update = max(1, math.ceil(queries / rollouts))
    budget = [f"env.oracle.budget={queries}"]
    if agent == "rlhf":
        return budget + [f"agent.init={ref}", f"agent.queries_per_update={per_update}"]
    extra = [f"agent.revkl_coef={revkl_coef}"] if agent == "sail-revkl" else []
    return budget + extra + [f"agent.pairs_per_batch={per_update}"]


def curve(rows: list[dict], x_key: str) -> list[tuple[float, float]]:
    """``(x, deterministic eval return)`` of every evaluation row of a progress.csv."""
    out, x_last = [], 0.0
    for r in rows:
        if r.get(x_key):
            x_last = float(r[x_key])
        if r.get("eval/return_det"):
            out.append((x_last, float(r["eval/return_det"])))
    return out


def run_one(env: str, agent: str, seed: int, steps: int, queries: int, eval_every: int, out_dir: str, revkl_coef: float) -> dict:
    from rl_align.train import auto_reference
    from rl_align.runs import resolve_config
    from rl_align.train import train

    common = ["run.progress=false", f"run.out_dir={out_dir}", "run.eval_episodes=5", f"run.eval_every={eval_every}"]
    ref = auto_reference(resolve_config(env, "sail-revkl", common, steps=steps, seed=seed))
    cfg_overrides = agent_overrides(env, agent, steps, queries, ref, revkl_coef)
    cfg = resolve_config(env, agent, common + cfg_overrides, steps=steps, seed=seed)
    t0 = time.perf_counter()
    folder, summary = train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    by_steps = [(0.0, summary["initial"]["eval/return_det"])] + curve(rows, "step")
    by_queries = [(0.0, summary["initial"]["eval/return_det"])] + curve(rows, "train/queries_used")
    if agent == "ppo":
        half = float(np.interp(steps / 2, *zip(*by_steps)))
    else:
        half = float(np.interp(queries / 2, *zip(*by_queries)))
    wr = win_rate_vs_ref(folder, ref, cfg, seed)
    fin = summary["final"]
    return {"env": env, "agent": agent, "seed": seed, "steps": steps, "queries_budget": queries if agent != "ppo" else 0,
            "queries_used": summary.get("queries_used", 0), "overrides": cfg_overrides, "ref_return_det": summary["initial"]["eval/return_det"],
            "return_det": fin["eval/return_det"], "return_stoch": fin["eval/return_stoch"], "return_half_queries": half,
            "win_rate_vs_ref": wr, "win_episodes": WIN_EPISODES, "ref": str(ref), "wall_s": wall, "folder": str(folder), "curve_steps": by_steps, "curve_queries": by_queries}


def win_rate_vs_ref(folder, ref, cfg, seed: int) -> float:
    """The same measurement for every agent: the env's oracle (no budget, no query spent) on matched
    50-step windows of stochastic rollouts of the policy and the reference on the same env seeds."""
    from rl_align.envs.oracles import Oracle
    from rl_align.evaluation import load_agent
    from rl_align.evaluation import win_rate

    _, trained = load_agent(folder)
    _, ref_agent = load_agent(ref)
    oracle = Oracle(dataclasses.replace(cfg.env.oracle, budget=None), seed=seed)
    return win_rate(trained, ref_agent, cfg.env, oracle, WIN_EPISODES, 50, seed=seed + 500_000)


def rescore(path: Path) -> None:
    """Recompute every row's win rate with the current WIN_EPISODES (the run folders are kept)."""
    from rl_align.runs import load_run_config

    rows = load(path)
    for r in rows:
        r["win_rate_vs_ref"] = win_rate_vs_ref(r["folder"], r["ref"], load_run_config(Path(r["folder"])), r["seed"])
        r["win_episodes"] = WIN_EPISODES
        print(r["env"], r["agent"], r["seed"], round(r["win_rate_vs_ref"], 3), flush=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def table(rows: list[dict]) -> None:
    """Per env and agent: IQM [95% CI] · mean ± std (n); then normalized scores across tasks and the
    probability of improvement of the key pairs."""
    from rl_align.stats import fmt, iqm, iqm_ci, normalize, prob_improvement, prob_improvement_ci, summarize

    cell = lambda v, digits=0: fmt(summarize([x for x in v if x == x]), digits)  # noqa: E731  (NaN: a seed without the value)
    envs = list(dict.fromkeys(r["env"] for r in rows))
    print("| env | agent | start (ref, det) | final return det | final return stoch | det return at half queries "
          "| win rate vs ref | queries used | wall-clock (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for env in envs:
        for agent in AGENTS:
            g = [r for r in rows if r["env"] == env and r["agent"] == agent]
            if not g:
                continue
            col = lambda k: [r[k] for r in g]  # noqa: E731
            print(f"| {env} | {agent} | {cell(col('ref_return_det'))} | {cell(col('return_det'))} | {cell(col('return_stoch'))} | "
                  f"{cell(col('return_half_queries'))} | {cell(col('win_rate_vs_ref'), 2)} | {np.mean(col('queries_used')):,.0f} | "
                  f"{np.mean(col('wall_s')):.0f} |")

    def matrix(agent: str, key: str, norm: bool = False) -> np.ndarray:
        """``[seeds, envs]`` of ``key`` (seeds every env has), normalized per env by the mean reference
        return and the mean return of PPO on the true reward over that env's seeds."""
        seeds = sorted(set.intersection(*({r["seed"] for r in rows if r["env"] == e and r["agent"] == agent} for e in envs)))
        m = np.array([[next(r[key] for r in rows if r["env"] == e and r["agent"] == agent and r["seed"] == s) for e in envs] for s in seeds])
        if norm and len(m):
            ref = [np.mean([r["ref_return_det"] for r in rows if r["env"] == e]) for e in envs]
            ceiling = [np.mean([r["return_det"] for r in rows if r["env"] == e and r["agent"] == "ppo"]) for e in envs]
            m = normalize(m, ref, ceiling)
        return m.reshape(len(m), len(envs))

    print(f"\nNormalized deterministic return, (return - mean ref) / (mean PPO - mean ref) per env; across {len(envs)} envs "
          "the IQM with a stratified bootstrap (seeds resampled within each env):\n")
    print("| agent | " + " | ".join(envs) + " | all envs: IQM [95% CI] | all envs: mean |")
    print("|---|" + "---|" * (len(envs) + 2))
    for agent in AGENTS:
        m = matrix(agent, "return_det", norm=True)
        if not m.size:
            continue
        lo, hi = iqm_ci(m)
        print(f"| {agent} | " + " | ".join(fmt(summarize(m[:, j]), 2) for j in range(len(envs))) +
              f" | {iqm(m):.2f} [{lo:.2f}, {hi:.2f}] | {m.mean():.2f} |")

    print("\nProbability of improvement P(X > Y) over seeds (ties 1/2); per env the point value, across envs "
          "the mean over envs with its 95% stratified bootstrap interval:\n")
    metrics = (("return_det", "det return"), ("return_stoch", "stoch return"), ("win_rate_vs_ref", "win rate vs ref"))
    print("| X vs Y | metric | " + " | ".join(envs) + " | all envs [95% CI] |")
    print("|---|---|" + "---|" * (len(envs) + 1))
    for x, y in PAIRS:
        for key, name in metrics:
            per_env = []
            for e in envs:
                a = [r[key] for r in rows if r["env"] == e and r["agent"] == x and r[key] == r[key]]
                b = [r[key] for r in rows if r["env"] == e and r["agent"] == y and r[key] == r[key]]
                per_env.append(f"{prob_improvement(a, b):.2f} (n={len(a)}/{len(b)})" if a and b else "n/a")
            mx, my = matrix(x, key), matrix(y, key)
            mx, my = mx[np.isfinite(mx).all(1)], my[np.isfinite(my).all(1)]
            if len(mx) and len(my):
                lo, hi = prob_improvement_ci(mx, my)
                agg = f"{prob_improvement(mx, my):.2f} [{lo:.2f}, {hi:.2f}]"
            else:
                agg = "n/a"
            print(f"| {x} vs {y} | {name} | " + " | ".join(per_env) + f" | {agg} |")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    envs = list(dict.fromkeys(r["env"] for r in rows))
    for key, xlabel, name in (("curve_queries", "oracle queries used", "return_vs_queries.png"),
                              ("curve_steps", "env steps", "return_vs_steps.png")):
        fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.8), squeeze=False)
        for ax, env in zip(axes[0], envs):
            for agent in AGENTS:
                g = [r for r in rows if r["env"] == env and r["agent"] == agent]
                if not g:
                    continue
                if key == "curve_queries" and agent == "ppo":
                    ax.axhline(np.mean([r["return_det"] for r in g]), color="k", ls="--", lw=1, label="ppo on true reward (final)")
                    continue
                xmax = min(max(x for x, _ in r[key]) for r in g)
                grid = np.linspace(0, xmax, 50)
                ys = np.array([np.interp(grid, *zip(*r[key])) for r in g])
                m = ys.mean(0)
                ax.plot(grid, m, label=agent)
                if len(g) > 1:
                    half = 1.96 * ys.std(0, ddof=1) / np.sqrt(len(g))
                    ax.fill_between(grid, m - half, m + half, alpha=0.2)
            ax.set_title(f"{env} ({len({r['seed'] for r in rows if r['env'] == env})} seeds, mean, 95% CI)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("deterministic return (true reward)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        print(out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="halfcheetah-pref")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000, help="oracle budget of every preference agent")
    p.add_argument("--revkl-coef", type=float, default=0.03,
                   help="SAIL-RevKL's lambda: 0.03, the best mean of the reverse-KL sweep in docs/revkl-ablation (not separable there)")
    p.add_argument("--eval-every", type=int, default=20_000)
    p.add_argument("--agents", default=",".join(AGENTS))
    p.add_argument("--out-dir", default="runs", help="runs/ keeps the cached auto references shared with other runs")
    p.add_argument("--results", default="benchmarks/headline.jsonl")
    p.add_argument("--table", action="store_true")
    p.add_argument("--rescore", action="store_true", help="recompute the win rates of the rows in --results")
    p.add_argument("--plot", type=Path)
    a = p.parse_args()
    if a.rescore:
        return rescore(Path(a.results))
    if a.table or a.plot:
        rows = load(Path(a.results))
        if a.table:
            table(rows)
        if a.plot:
            plot(rows, a.plot)
        return
    agents = a.agents.split(",")
    unknown = sorted(set(agents) - set(AGENTS))
    if unknown:
        raise SystemExit(f"unknown agents {unknown}; valid: {', '.join(AGENTS)}")
    import torch

    torch.set_num_threads(1)
    for seed in (int(s) for s in a.seeds.split(",")):
        for agent in agents:
            r = run_one(a.env, agent, seed, a.steps, a.queries, a.eval_every, a.out_dir, a.revkl_coef)
            with open(a.results, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("curve")}), flush=True)


if __name__ == "__main__":
    main()
