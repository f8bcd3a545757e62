"""COMAL vs iterative preference optimizers on an intransitive oracle, then a stochastic tournament.

Every agent trains on the same env preset (default ``halfcheetah-cyclic``), seed and env-step budget,
from the same shipped/cached auto reference (a PPO run on the true reward: the "SFT" policy). Agents
(``NAME=PRESET[,key=value...]`` on the command line; the defaults):

  online-dpo     SAIL's DPO part alone (shift_coef = 0), fixed reference
  sail           SAIL (revkl_coef = 0), fixed reference
  sail-revkl     SAIL-RevKL, fixed reference
  inpo           COMAL's inner solver alone (INPO, Algorithm 3), the same tau as COMAL, fixed reference
  inpo-drift     the same inner solver with a smaller tau chosen so it ends near COMAL's KL to the initial
                 reference (the matched-drift comparison; ``--drift-tau``)
  comal          COMAL (Algorithm 1): INPO inner solver, reference reset on the plateau rule

Stage 1 (``train``, the default): trains the agents one after another and writes one
``<out>/runs/<name>.json`` per agent as it finishes (curves of the win rate against the initial
reference, KL to the initial and to the current reference, resets), so several invocations with
different ``--agents`` can share one ``--out``. Stage 2 (``--tournament``): the stochastic tournament
of every finished agent of ``<out>`` and the reference (common action-noise seed; the policies as
trained and as the oracle saw them), with each agent's KL to its initial reference, into
``<out>/tournament-stoch/`` and ``<out>/results.json`` (per-episode cell values kept for the bootstrap).
Stage 3 (``--table OUT...``): over seeds, each COMAL-row cell with a hierarchical bootstrap interval
(seeds resampled, then episodes within each seed), each row's minimum, and per-seed cells.

    nice -n 10 python benchmarks/comal.py --steps 300000 --seed 0 --out runs/bench-comal-300k-s0
    nice -n 10 python benchmarks/comal.py --tournament --out runs/bench-comal-300k-s0
    python benchmarks/comal.py --table runs/bench-comal-300k-s0 runs/bench-comal-300k-s1 runs/bench-comal-300k-s2
    python benchmarks/comal.py --curves runs/bench-comal-300k-s0 ... --curves-out docs/comal/curves_300k.png
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

import numpy as np

AGENTS = ("online-dpo=online-dpo", "sail=sail", "sail-revkl=sail-revkl", "inpo=inpo", "inpo-drift=inpo", "comal=comal")
CURVES = ("eval/win_rate_vs_ref", "eval/kl_to_ref", "eval/kl_to_current_ref", "eval/return_stoch", "comal/resets")


def parse_agent(spec: str, drift_tau: float) -> tuple[str, str, list[str]]:
    """``NAME=PRESET[,key=value...]`` -> (name, preset, overrides); ``inpo-drift`` gets ``--drift-tau``."""
    name, _, rest = spec.partition("=")
    preset, *sets = (rest or name).split(",")
    overrides = [s if s.startswith(("agent.", "run.", "env.")) else f"agent.{s}" for s in sets]
    if name == "inpo-drift" and not any(s.startswith("agent.revkl_coef=") for s in overrides):
        overrides.append(f"agent.revkl_coef={drift_tau}")
    return name, preset, overrides


def train_agent(env: str, spec: str, steps: int, seed: int, out: Path, eval_every: int, extra: list[str], drift_tau: float) -> dict:
    from rl_align.runs import resolve_config
    from rl_align.train import train

    name, preset, sets = parse_agent(spec, drift_tau)
    overrides = ["run.progress=false", f"run.out_dir={out}", f"run.eval_every={eval_every}", "run.eval_episodes=2",
                 "agent.diag_every=0", *sets, *extra]
    t = time.perf_counter()
    folder, summary = train(resolve_config(env, preset, overrides, steps=steps, seed=seed), quiet=True)
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    curves = {k: [(int(float(r["step"])), float(r[k])) for r in rows if r.get(k) and r.get("eval/win_rate_vs_ref")] for k in CURVES}
    resets = [int(float(r["step"])) for r in rows if r.get("comal/reset") and float(r["comal/reset"]) > 0]
    res = {"agent": name, "preset": preset, "overrides": sets + list(extra), "folder": str(folder), "wall_s": round(time.perf_counter() - t, 1),
           "env_steps": summary["env_steps"], "final": {k: summary["final"].get(k) for k in CURVES}, "curves": curves,
           "reset_steps": resets, "queries": summary["queries_used"]}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(res, indent=2))
    return res


def run_tournament(out: Path, env: str, seed: int, episodes: int) -> dict:
    """Stochastic tournament of every finished agent of ``out`` and the reference it started from."""
    from rl_align.tournament import print_table, tournament, write_outputs

    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    order = {n.split("=")[0]: k for k, n in enumerate(AGENTS)}
    runs.sort(key=lambda r: order.get(r["agent"], len(order)))
    ref = ref_folder(next(r["folder"] for r in runs if r["agent"] == "sail-revkl"), env, seed)
    t = time.perf_counter()
    res = tournament([r["folder"] for r in runs] + [str(ref)], env, episodes=episodes, segment_len=50, deterministic=False)
    names = [r["agent"] for r in runs] + ["reference"]
    res.names = names
    print_table(res)
    write_outputs(res, out / "tournament-stoch")
    summary = {"env": env, "seed": seed, "episodes": episodes, "runs": runs, "tournament": {
        "names": names, "win": res.win.tolist(), "half_width": res.half_width.tolist(), "row_average": res.row_average().tolist(),
        "kl_init_ref": res.kl_init_ref.tolist(), "per_episode": res.per_episode.tolist(), "wall_s": round(time.perf_counter() - t, 1)}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def ref_folder(run_folder: str, env: str, seed: int) -> Path:
    """A run folder that plays the reference a fixed-reference run started from: the run's config and a
    checkpoint whose policy is its ``ref_policy`` (so its KL to the initial reference is 0 exactly)."""
    import shutil

    from rl_align.checkpoints import load_checkpoint, save_checkpoint

    src, dst = Path(run_folder), Path(run_folder).parent.parent / "reference" / f"from-{Path(run_folder).name}"
    if not (dst / "checkpoints" / "last.pt").exists():
        (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "config.yaml", dst / "config.yaml")
        state = load_checkpoint(src)
        state["policy"] = state["ref_policy"]
        save_checkpoint(dst / "checkpoints" / "last.pt", state)
    return dst


def hier_bootstrap(per_seed: list[np.ndarray], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over seeds of the per-seed episode means, resampling seeds and
    then episodes within each drawn seed (both levels of variability)."""
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    for r in range(reps):
        draw = rng.integers(len(per_seed), size=len(per_seed))
        stats[r] = np.mean([rng.choice(per_seed[s], size=len(per_seed[s])).mean() for s in draw])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def table(outs: list[Path]) -> None:
    data = [json.loads((Path(o) / "results.json").read_text()) for o in outs]
    names = data[0]["tournament"]["names"]
    for d in data:
        if d["tournament"]["names"] != names:
            raise SystemExit(f"seed {d['seed']} has players {d['tournament']['names']}, seed {data[0]['seed']} has {names}")
    K, seeds = len(names), [d["seed"] for d in data]
    win = np.array([d["tournament"]["win"] for d in data])  # [S, K, K]
    ep = [np.array(d["tournament"]["per_episode"]) for d in data]  # S x [K, K, E]
    kl = np.array([d["tournament"]["kl_init_ref"] for d in data], dtype=float)  # [S, K]
    print(f"Stochastic tournament over seeds {seeds}: cell = mean over seeds of the win rate of row over column (%), "
          "[95% hierarchical bootstrap: seeds, then episodes]\n")
    print("| row > column | " + " | ".join(names) + " | row min | row avg | KL to initial ref |")
    print("|---|" + "---|" * (K + 3))
    for i, a in enumerate(names):
        cells = []
        for j in range(K):
            if i == j:
                cells.append("–")
                continue
            lo, hi = hier_bootstrap([e[i, j] for e in ep], seed=i * K + j)
            cells.append(f"{100 * win[:, i, j].mean():.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        off = [j for j in range(K) if j != i]
        kl_txt = "–" if np.isnan(kl[:, i]).all() else " / ".join(f"{v:.3g}" for v in kl[:, i])
        print(f"| {a} | " + " | ".join(cells) + f" | {100 * win[:, i, off].mean(0).min():.1f} | {100 * win[:, i, off].mean():.1f} | {kl_txt} |")
    if "comal" not in names:
        return
    c = names.index("comal")
    print("\nCOMAL's row per seed (%), 95% t-interval over episodes:\n")
    print("| seed | " + " | ".join(n for n in names if n != "comal") + " | row min |")
    print("|---|" + "---|" * K)
    for s, d in enumerate(data):
        hw = np.array(d["tournament"]["half_width"])
        cells = [f"{100 * win[s, c, j]:.1f} ± {100 * hw[c, j]:.1f}" for j in range(K) if j != c]
        print(f"| {d['seed']} | " + " | ".join(cells) + f" | {100 * min(win[s, c, j] for j in range(K) if j != c):.1f} |")
    mins = {a: win[:, i, [j for j in range(K) if j != i]].mean(0).min() for i, a in enumerate(names)}
    best = max(mins, key=mins.get)
    print(f"\nrow minimum over seed-mean cells: " + ", ".join(f"{a} {100 * m:.1f}" for a, m in mins.items()) + f"; highest: {best}")


def plot_curves(outs: list[Path], path: Path) -> None:
    """Win rate against the initial reference and KL to it over training, one column per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(outs), figsize=(5 * len(outs), 7), squeeze=False)
    for col, out in enumerate(outs):
        runs = [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("*.json"))]
        for r in runs:
            for row, key in enumerate(("eval/win_rate_vs_ref", "eval/kl_to_ref")):
                pts = r["curves"].get(key) or []
                if pts:
                    x, y = zip(*pts)
                    axes[row][col].plot(x, y, marker=".", label=r["agent"])
            for x in r.get("reset_steps", []) if r["agent"] == "comal" else []:
                axes[0][col].axvline(x, color="grey", lw=0.5, alpha=0.5)
        axes[0][col].set_title(f"{Path(out).name} (grey: COMAL resets)")
        axes[0][col].axhline(0.5, color="k", lw=0.8, ls=":")
        axes[0][col].set_ylabel("win rate vs initial reference")
        axes[1][col].set_ylabel("KL(pi || initial reference) per state")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("env steps")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="halfcheetah-cyclic")
    p.add_argument("--agents", nargs="+", default=list(AGENTS), help="NAME=PRESET[,key=value...] (default: all six)")
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=30_000)
    p.add_argument("--drift-tau", type=float, default=0.01, help="tau of inpo-drift (matched to COMAL's final KL to the initial reference)")
    p.add_argument("--episodes", type=int, default=8, help="tournament episodes per policy")
    p.add_argument("--set", action="append", default=[], help="override for every agent, e.g. agent.lr=1e-3")
    p.add_argument("--out", default="runs/bench-comal")
    p.add_argument("--tournament", action="store_true", help="only play the tournament of the finished agents in --out")
    p.add_argument("--table", nargs="+", type=Path, metavar="OUT", help="only print the tables over these --out folders (one per seed)")
    p.add_argument("--curves", nargs="+", type=Path, metavar="OUT", help="only plot the curves of these --out folders into --curves-out")
    p.add_argument("--curves-out", type=Path, default=Path("docs/comal/curves_300k.png"))
    args = p.parse_args()
    if args.table:
        return table(args.table)
    if args.curves:
        return plot_curves(args.curves, args.curves_out)
    out = Path(args.out)
    if args.tournament:
        run_tournament(out, args.env, args.seed, args.episodes)
        return
    for spec in args.agents:
        res = train_agent(args.env, spec, args.steps, args.seed, out, args.eval_every, args.set, args.drift_tau)
        print(json.dumps({k: res[k] for k in ("agent", "folder", "wall_s", "final", "reset_steps")}), flush=True)


if __name__ == "__main__":
    main()
