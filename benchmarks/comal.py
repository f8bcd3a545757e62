"""COMAL vs iterative preference optimizers on an intransitive oracle, then a tournament of the finals.

Every agent trains on the same env preset (default ``halfcheetah-cyclic``), seed and env-step budget,
from the same cached auto reference (a PPO run on the true reward: the "SFT" policy). Agents:
  online-dpo   SAIL's DPO part alone (shift_coef = 0), fixed reference
  sail         SAIL (revkl_coef = 0), fixed reference
  sail-revkl   SAIL-RevKL, fixed reference
  inpo         INPO-style regression (COMAL Algorithm 3; eta 10, tau 0.05), fixed reference
  comal        SAIL-RevKL (tau = revkl_coef = 0.01) with the reference reset every K = 10 updates (Algorithm 1)
The INPO-style solver with the reset is ``--agents comal --set agent.inner=inpo --set agent.eta=10
--set agent.revkl_coef=0.05`` (``--set`` applies to every agent of that invocation).
The win rate against the initial reference is logged every ``--eval-every`` steps (cycling shows as
oscillation); then ``rl-align tournament`` plays the final policies against each other and the
reference. Results go to ``<out>/results.json`` and the tournament files to ``<out>/tournament/``.

    nice -n 10 python benchmarks/comal.py --steps 20000 --seed 0
    python benchmarks/comal.py --curves runs/bench-comal/results.json   # win rate vs reference over training
    python benchmarks/comal.py --table benchmarks/comal_100k_s0.json benchmarks/comal_100k_s1.json

``--table`` aggregates one results.json per seed: per agent IQM [95% bootstrap CI] · mean ± sample std
(n seeds) (``rl_align.stats``) of the final return, the final win rate against the reference and the
tournament row averages (deterministic, from the JSON; stochastic, from ``<stem>_tournament_stoch.csv``
beside the JSON or ``tournament-stoch/tournament.csv`` in its folder, when present), then the
probability that COMAL beats each other agent.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

AGENTS = ("online-dpo", "sail", "sail-revkl", "inpo", "comal")


def train_agent(env: str, agent: str, steps: int, seed: int, out: Path, eval_every: int, extra: list[str]) -> dict:
    from rl_align.runs import resolve_config
    from rl_align.train import train

    overrides = ["run.progress=false", f"run.out_dir={out}", f"run.eval_every={eval_every}", "run.eval_episodes=2",
                 "agent.diag_every=0", *extra]
    t = time.perf_counter()
    folder, summary = train(resolve_config(env, agent, overrides, steps=steps, seed=seed), quiet=True)
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    curve = [(int(float(r["step"])), float(r["eval/win_rate_vs_ref"])) for r in rows if r.get("eval/win_rate_vs_ref")]
    return {"agent": agent, "folder": str(folder), "wall_s": round(time.perf_counter() - t, 1), "env_steps": summary["env_steps"],
            "return_det": summary["final"]["eval/return_det"], "win_rate_vs_ref": summary["final"].get("eval/win_rate_vs_ref"),
            "win_rate_curve": curve, "queries": summary["queries_used"]}


def plot_curves(results: list[Path], out: Path) -> None:
    """Win rate against the reference over training, one panel per results.json (seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, path in zip(axes[0], results):
        data = json.loads(Path(path).read_text())
        for r in data["runs"]:
            x, y = zip(*r["win_rate_curve"])
            ax.plot(x, y, marker=".", label=r["agent"])
        ax.axhline(0.5, color="k", lw=0.8, ls=":")
        ax.set_title(f"{data['args']['env']}, seed {data['args']['seed']}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("win rate vs reference (stochastic)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(out)


def _stoch_rows(path: Path) -> dict[str, float] | None:
    """Row averages of the stochastic tournament saved beside a results.json, by agent name."""
    for csv_path in (path.with_name(path.stem + "_tournament_stoch.csv"), path.parent / "tournament-stoch" / "tournament.csv"):
        if csv_path.exists():
            with csv_path.open(newline="") as f:
                return {re.sub(r"-s\d+$", "", r["row_vs_column"]): float(r["row_average"]) for r in csv.DictReader(f)}
    return None


def table(results: list[Path]) -> None:
    from rl_align.stats import fmt, prob_improvement, prob_improvement_ci, summarize

    per_agent: dict[str, dict[str, list[float]]] = {}
    for path in results:
        data = json.loads(Path(path).read_text())
        det_rows = {re.sub(r"-s\d+$", "", n): a for n, a in zip(data["tournament"]["names"], data["tournament"]["row_average"])} \
            if "tournament" in data else {}
        stoch = _stoch_rows(Path(path)) or {}
        for r in data["runs"] + [{"agent": "ref-ppo"}]:
            m = per_agent.setdefault(r["agent"], {k: [] for k in ("return_det", "win_rate_vs_ref", "row_det", "row_stoch")})
            for key, v in (("return_det", r.get("return_det")), ("win_rate_vs_ref", r.get("win_rate_vs_ref")),
                           ("row_det", det_rows.get(r["agent"])), ("row_stoch", stoch.get(r["agent"]))):
                if v is not None:
                    m[key].append(float(v))
    cols = (("return_det", "final return (det)", 0), ("win_rate_vs_ref", "final win rate vs ref", 2),
            ("row_det", "tournament row average (det)", 2), ("row_stoch", "tournament row average (stoch)", 2))
    print("| agent | " + " | ".join(t for _, t, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for agent, m in per_agent.items():
        print(f"| {agent} | " + " | ".join(fmt(summarize(m[k]), d) for k, _, d in cols) + " |")
    if "comal" not in per_agent:
        return
    print("\nProbability that COMAL beats X over seeds (ties 1/2), 95% bootstrap interval:\n")
    print("| COMAL vs | " + " | ".join(t for _, t, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for agent, m in per_agent.items():
        if agent == "comal":
            continue
        cells = []
        for k, _, _ in cols:
            a, b = per_agent["comal"][k], m[k]
            if not a or not b:
                cells.append("–")
                continue
            lo, hi = prob_improvement_ci(a, b)
            cells.append(f"{prob_improvement(a, b):.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo == lo else "") + f" (n={len(a)}/{len(b)})")
        print(f"| {agent} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="halfcheetah-cyclic")
    p.add_argument("--agents", nargs="+", default=list(AGENTS))
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=4_000)
    p.add_argument("--episodes", type=int, default=8, help="tournament episodes per policy")
    p.add_argument("--set", action="append", default=[], help="override for every agent, e.g. agent.ref_steps=20000")
    p.add_argument("--out", default="runs/bench-comal")
    p.add_argument("--curves", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="only plot the win-rate curves of these results.json files into --curves-out")
    p.add_argument("--curves-out", type=Path, default=Path("docs/comal/win_rate_curves.png"))
    p.add_argument("--table", nargs="+", type=Path, metavar="RESULTS_JSON", help="only print the tables over these results.json files (one per seed)")
    args = p.parse_args()
    if args.table:
        return table(args.table)
    if args.curves:
        return plot_curves(args.curves, args.curves_out)
    out = Path(args.out)
    results = []
    for agent in args.agents:
        results.append(train_agent(args.env, agent, args.steps, args.seed, out, args.eval_every, args.set))
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    from rl_align.tournament import print_table, tournament, write_outputs

    ref = sorted((out / "_refs").glob(f"{args.env}-*-s{args.seed}"))
    folders = [r["folder"] for r in results] + [str(f) for f in ref[-1:]]  # the reference plays too
    t = time.perf_counter()
    res = tournament(folders, args.env, episodes=args.episodes, segment_len=50, deterministic=True)
    print_table(res)
    write_outputs(res, out / "tournament")
    summary = {"args": vars(args), "runs": results, "tournament": {"names": res.names, "win": res.win.tolist(),
               "half_width": res.half_width.tolist(), "row_average": res.row_average().tolist(), "wall_s": round(time.perf_counter() - t, 1)}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
