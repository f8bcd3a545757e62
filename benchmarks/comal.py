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
"""

from __future__ import annotations

import argparse
import csv
import json
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
    args = p.parse_args()
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
