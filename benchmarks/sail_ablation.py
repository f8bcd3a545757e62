"""SAIL vs SAIL-RevKL (log range of revkl_coef, full and mean-only KL) vs online DPO vs PPO on the true
reward from the same auto reference, on a preference env (default HalfCheetah-v5, Bradley-Terry).

Every preference variant runs the `sail-revkl` preset with overrides, so budgets match: the same env
steps, the same rollout shape and therefore the same number of oracle queries. The PPO ceiling is the
reference's own PPO run continued for the same number of steps (one PPO run of ref_steps + steps with
the reference's preset and seed: its first ref_steps are the reference, bit for bit, at a constant lr).
Each finished run is appended to a JSON-lines file at once, so a cut-short benchmark keeps what it
measured; `--table` prints the markdown table from that file.

    python benchmarks/sail_ablation.py --seeds 0 --steps 50000
    python benchmarks/sail_ablation.py --overhead          # PL diagnostics cost per update
    python benchmarks/sail_ablation.py --table

``--table`` prints the runs, then per variant IQM [95% bootstrap interval] · mean ± sample std (n seeds)
(``rl_align.stats``), the share of the reference-to-PPO gap closed per seed (normalized return: the
seed's reference 0, the seed's PPO-from-the-reference run 1) and the probability of improvement of the
key pairs.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

# name -> overrides of the sail-revkl preset (None: the PPO ceiling); run in this order (priority first)
VARIANTS: dict[str, list[str] | None] = {
    "sail": ["agent.revkl_coef=0"],
    "revkl-0.01": ["agent.revkl_coef=0.01"],
    "online-dpo": ["agent.revkl_coef=0", "agent.shift_coef=0"],
    "ppo-from-ref": None,
    "revkl-0.01-mean": ["agent.revkl_coef=0.01", "agent.revkl_std=false"],
    "revkl-0.001": ["agent.revkl_coef=0.001"],
    "revkl-0.1": ["agent.revkl_coef=0.1"],
    "revkl-0.1-mean": ["agent.revkl_coef=0.1", "agent.revkl_std=false"],
    "revkl-0.001-mean": ["agent.revkl_coef=0.001", "agent.revkl_std=false"],
}


def run_one(variant: str, env: str, seed: int, steps: int, eval_episodes: int, out_dir: str) -> dict:
    from rl_align.runs import resolve_config
    from rl_align.train import train

    common = ["run.progress=false", f"run.out_dir={out_dir}", f"run.eval_episodes={eval_episodes}", "run.eval_every=0"]
    sets = VARIANTS[variant]
    if sets is None:
        from rl_align.train import auto_reference

        sail_cfg = resolve_config(env, "sail-revkl", common, steps=steps, seed=seed)
        ref_summary = json.load(open(auto_reference(sail_cfg) / "summary.json"))["final"]
        cfg = resolve_config(env, sail_cfg.agent.ref_agent, common, steps=sail_cfg.agent.ref_steps + steps, seed=seed)
    else:
        cfg = resolve_config(env, "sail-revkl", common + sets, steps=steps, seed=seed)
    t0 = time.perf_counter()
    folder, summary = train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    last = lambda key: next((float(r[key]) for r in reversed(rows) if r.get(key)), float("nan"))  # noqa: E731
    lmax = [float(r["pl/lambda_max"]) for r in rows if r.get("pl/lambda_max")]
    fin, ini = summary["final"], (ref_summary if sets is None else summary["initial"])
    return {
        "variant": variant, "env": env, "seed": seed, "steps": steps, "folder": str(folder), "wall_s": wall,
        "ref_return_det": ini["eval/return_det"], "ref_return_stoch": ini["eval/return_stoch"],
        "return_det": fin["eval/return_det"], "return_stoch": fin["eval/return_stoch"],
        "win_rate_vs_ref": fin.get("eval/win_rate_vs_ref", float("nan")), "kl_to_ref": fin.get("eval/kl_to_ref", float("nan")),
        "pl_ratio_min": last("pl/ratio_min"), "lambda_max_pos_share": float(np.mean(np.array(lmax) > 0)) if lmax else float("nan"),
        "lambda_max_last": lmax[-1] if lmax else float("nan"), "log_std": last("train/log_std"), "queries_used": summary.get("queries_used", 0),
    }


def overhead(repeats: int) -> None:
    """Seconds per SAIL-RevKL update (preset shape: 8 envs x 250 steps, 780 pairs, 10 epochs) without
    diagnostics, and the extra seconds of one PL measurement without and with the Lanczos curvature."""
    import torch

    from rl_align.agents.base import EpisodeTracker
    from rl_align.runs import resolve_config
    from rl_align.runs import build_agent
    from rl_align.train import prepare

    torch.set_num_threads(1)
    cfg = resolve_config("halfcheetah-pref", "sail-revkl", ["agent.ref=init", "agent.diag_every=0", "run.progress=false"], seed=0)
    agent, env = build_agent(cfg)
    prepare(agent, cfg)
    obs, tracker = env.reset(), EpisodeTracker(env.n_envs)
    times = {"update": [], "pl": [], "pl+curvature": []}
    for _ in range(repeats):
        obs = agent.collect(env, obs, tracker)
        t0 = time.perf_counter()
        agent.update(tracker.pop())
        times["update"].append(time.perf_counter() - t0)
        b = agent._batch()
        idx = torch.arange(min(b.n_pairs, agent.config.diag_pairs))
        f = agent.objective.fixed_batch_objective(agent.ref_policy, b, idx)
        for key, every in (("pl", 0), ("pl+curvature", 1)):
            agent.diagnostics.config.curvature_every = every
            agent.diagnostics.measurements = 0
            t0 = time.perf_counter()
            agent.diagnostics.measure(f, agent.policy)
            times[key].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    default = SAILdefaults()
    per_update = (med["pl"] * (default["curvature_every"] - 1) + med["pl+curvature"]) / default["curvature_every"] / default["diag_every"]
    print(json.dumps({"median_s": med, "repeats": repeats, "default_interval": default,
                      "overhead_share_at_default": per_update / med["update"]}, indent=1))


def SAILdefaults() -> dict:
    from rl_align.agents.sail import SAILConfig

    c = SAILConfig()
    return {"diag_every": c.diag_every, "curvature_every": c.curvature_every}


PAIRS = (("revkl-0.01", "sail"), ("revkl-0.03", "sail"), ("revkl-0.01", "online-dpo"), ("sail", "online-dpo"),
         ("revkl-0.01-mean", "revkl-0.01"))


def table(path: Path) -> None:
    from rl_align.stats import fmt, normalize, prob_improvement, prob_improvement_ci, summarize

    rows = [json.loads(line) for line in open(path)]
    print("| variant | seed | steps | ref det / stoch | final det / stoch | win rate vs ref | KL to ref | min PL ratio | lambda_max > 0 (share) | log-std | queries | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['steps']:,} | {r['ref_return_det']:.0f} / {r['ref_return_stoch']:.0f} | "
              f"{r['return_det']:.0f} / {r['return_stoch']:.0f} | {r['win_rate_vs_ref']:.3f} | {r['kl_to_ref']:.3f} | "
              f"{r['pl_ratio_min']:.3g} | {r['lambda_max_pos_share']:.2f} | {r['log_std']:.3f} | {r['queries_used']:,} | {r['wall_s']:.0f} |")

    ceiling = {(r["env"], r["seed"]): r for r in rows if r["variant"] == "ppo-from-ref"}

    def gap(r: dict, kind: str) -> float:
        """Share of the reference-to-PPO gap closed by this run (same env and seed), ``kind`` det or stoch."""
        c = ceiling.get((r["env"], r["seed"]))
        return float(normalize(r[f"return_{kind}"], r[f"ref_return_{kind}"], c[f"return_{kind}"])) if c else float("nan")

    def values(variant: str, key: str) -> dict[int, float]:
        out = {r["seed"]: (gap(r, key[4:]) if key.startswith("gap_") else r[key]) for r in rows if r["variant"] == variant}
        return {s: v for s, v in out.items() if v == v}

    metrics = (("return_det", "final return det", 0), ("return_stoch", "final return stoch", 0), ("gap_det", "gap closed (det)", 2),
               ("gap_stoch", "gap closed (stoch)", 2), ("win_rate_vs_ref", "win rate vs ref", 2), ("kl_to_ref", "KL to ref", 2))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print("\nPer variant, IQM [95% bootstrap CI] · mean ± sample std (n seeds); gap closed: (return - ref) / (PPO - ref) per seed:\n")
    print("| variant | " + " | ".join(name for _, name, _ in metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for v in variants:
        print(f"| {v} | " + " | ".join(fmt(summarize(list(values(v, k).values())), d) for k, _, d in metrics) + " |")

    pairs = [(x, y) for x, y in PAIRS if x in variants and y in variants]
    if pairs:
        print("\nProbability of improvement P(X > Y) over seeds (ties 1/2), 95% bootstrap interval:\n")
        print("| X vs Y | " + " | ".join(name for _, name, _ in metrics[:5]) + " |")
        print("|---|" + "---|" * 5)
        for x, y in pairs:
            cells = []
            for k, _, _ in metrics[:5]:
                a, b = list(values(x, k).values()), list(values(y, k).values())
                if not a or not b:
                    cells.append("n/a")
                    continue
                lo, hi = prob_improvement_ci(a, b)
                ci = f" [{lo:.2f}, {hi:.2f}]" if lo == lo else ""
                cells.append(f"{prob_improvement(a, b):.2f}{ci} (n={len(a)}/{len(b)})")
            print(f"| {x} vs {y} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="halfcheetah-pref")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out-dir", default="runs", help="runs/ keeps the cached auto reference shared with other runs")
    p.add_argument("--results", default="benchmarks/sail_ablation.jsonl")
    p.add_argument("--overhead", type=int, nargs="?", const=5, default=0, help="time the PL diagnostics over N updates instead")
    p.add_argument("--table", action="store_true")
    a = p.parse_args()
    if a.table:
        return table(Path(a.results))
    if a.overhead:
        return overhead(a.overhead)
    variants = a.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    for seed in (int(s) for s in a.seeds.split(",")):
        for v in variants:
            r = run_one(v, a.env, seed, a.steps, a.eval_episodes, a.out_dir)
            with open(a.results, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
