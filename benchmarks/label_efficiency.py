"""Label efficiency across the lab: on-policy SAIL-RevKL, RLHF (PPO + reward model), PEBBLE and SAIL-RevKL
off-policy at 1,000 and 10,000 labels, the same env steps, each as a fraction of its own true-reward
ceiling (PPO from the same reference for the on-policy agents, SAC at the same sizes for the off-policy
ones), on HalfCheetah-v5 and DMC cheetah-run.

    python benchmarks/label_efficiency.py run --root /work/bench/labels --workers 2
    python benchmarks/label_efficiency.py report --root /work/bench/labels [--sac-rows /work/bench/sb3/rows.jsonl]

Runs go through the protocol's resumable queue (``benchmarks/pebble_protocol.py``), seed by seed, and land
in its record (``benchmarks/pebble_protocol.jsonl``), which ``report`` reads. The off-policy agents ask 20
labels every 2,000 steps for the 1,000 budget and 200 every 2,000 steps for the 10,000 budget, so both
budgets are spent by about step 100k and differ only in labels per session; the on-policy agents spend
theirs as they go (SAIL-RevKL labels all pairs of each rollout, RLHF ``queries_per_update`` per iteration).
``report`` prints one table and draws return against labels (``<root>/label_efficiency.png``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from pebble_protocol import RECORD, load, read_record, run_queue, save_figure  # noqa: E402

from rl_align.stats import fmt, summarize  # noqa: E402

TASKS = ("halfcheetah-pref", "cheetah-run-pref")
STEPS = 200_000
METHODS = {  # method -> (agent preset, its ceiling's method)
    "sail-revkl": ("sail-revkl", "ppo-ceiling"),
    "rlhf": ("rlhf", "ppo-ceiling"),
    "pebble": ("pebble", "sac-small"),
    "pebble-revkl": ("pebble-revkl", "sac-small"),
}
OFF_POLICY_FEEDBACK = {1000: ["agent.queries_per_feedback=20", "agent.feedback_every=2000"],
                       10000: ["agent.queries_per_feedback=200", "agent.feedback_every=2000"]}


def reference(root: Path, env: str, seed: int) -> str:
    """The on-policy agents' pi_ref (and PPO's start): HalfCheetah's shipped reference of this seed; for
    other tasks a 50k-step PPO run on the true reward, trained here once into ``<root>/_refs``."""
    if env == "halfcheetah-pref":
        return str(next(REPO.glob(f"refs/HalfCheetah-v5-*-s{seed}.pt")))
    out = root / "_refs" / f"{env}-s{seed}"
    found = sorted(out.glob("*/*/*/summary.json"))
    if not found:
        subprocess.run([sys.executable, "-m", "rl_align.cli", "train", "--env", env, "--agent", "ppo", "--steps", "50000", "--seed", str(seed),
                        "--set", f"run.out_dir={out}", "--set", "run.progress=false"], check=True, capture_output=True)
        found = sorted(out.glob("*/*/*/summary.json"))
    return str(found[-1].parent)


REF = "{ref}"  # a job's stand-in for its task and seed's reference, filled in once the queue is chosen


def jobs(seeds: list[int], budgets: list[int]) -> list[tuple]:
    out = []
    for seed in seeds:
        for env in TASKS:
            out.append((env, "sac-small", seed, ["env.oracle.budget=null"], ""))
            out.append((env, "ppo", seed, [f"agent.init={REF}", "env.oracle.budget=null"], "-ceiling"))
            for budget in budgets:
                for method, (preset, _) in METHODS.items():
                    sets = [f"env.oracle.budget={budget}"]
                    sets += OFF_POLICY_FEEDBACK[budget] if preset.startswith("pebble") else [f"agent.{'ref' if preset == 'sail-revkl' else 'init'}={REF}"]
                    out.append((env, preset, seed, sets, f"-{budget}"))
    return out


def with_references(root: Path, todo: list[tuple], workers: int) -> list[tuple]:
    """Fill in the references of the on-policy jobs kept, training the missing ones first, in parallel (an
    off-policy queue trains none)."""
    need = sorted({(env, seed) for env, _, seed, sets, _ in todo if any(REF in s for s in sets)})
    with ThreadPoolExecutor(workers) as pool:
        refs = dict(zip(need, pool.map(lambda es: reference(root, *es), need)))
    return [(env, preset, seed, [s.replace(REF, refs[env, seed]) if REF in s else s for s in sets], tag)
            for env, preset, seed, sets, tag in todo]


COST = {"sac-small": 4, "pebble": 5, "pebble-revkl": 5, "rlhf": 2, "sail-revkl": 1, "ppo": 0}  # rough order of a run's wall-clock


def cmd_run(args) -> None:
    args.steps = STEPS
    todo = [j for j in jobs(args.seeds, args.budgets)
            if (not args.only or j[1] in args.only or j[1] + j[4] in args.only)  # a preset (every budget) or one method folder
            and j[0] in args.tasks]
    todo = with_references(args.root, todo, args.workers)
    if args.longest_first:  # many workers: start the long runs first so that none is left alone at the end
        todo.sort(key=lambda j: (-COST[j[1]], -int(j[4][1:]) if j[4][1:].isdigit() else 0))
    run_queue(args, todo)


def sb3_sized_sac(rows: Path | None) -> dict[int, float]:
    """Seed -> final stochastic return of rl-align's `sac` (SB3's sizes) on HalfCheetah-v5, from `sac_sb3.py learn`'s rows."""
    if rows is None:
        return {}
    return {r["seed"]: r["eval/return_stoch"] for r in read_record(rows) if r["impl"] == "rl-align" and r["steps"] == STEPS}  # at the same env steps


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4), squeeze=False)
    sac = sb3_sized_sac(args.sac_rows)
    print(f"{'task':<18} {'method':<14} {'labels':>7}  stochastic return as a fraction of its ceiling (per seed) | the return | "
          "its ceiling's, same seeds")
    for k, env in enumerate(TASKS):
        ceilings = {m: {r["seed"]: r["stoch"] for r in load(args.record, env, m)} for m in ("ppo-ceiling", "sac-small")}
        for m, (method, (preset, ceiling)) in enumerate(METHODS.items()):
            xs, ys = [], []
            of_sac = sac if ceiling == "sac-small" and env == "halfcheetah-pref" else {}  # there `sac` at SB3's sizes is the ceiling
            for budget in args.budgets:
                rs = load(args.record, env, f"{preset}-{budget}")
                frac = [r["stoch"] / ceilings[ceiling][r["seed"]] for r in rs if r["seed"] in ceilings[ceiling]]
                if not frac:  # a cell of the table without a finished seed (and its ceiling) says so
                    print(f"{env:<18} {method:<14} {budget:>7,}  not run: no finished seed with its {ceiling} in {args.record}")
                    continue
                labels = max(r["labels"] for r in rs)
                own = [r["stoch"] for r in rs if r["seed"] in ceilings[ceiling]]
                top = [ceilings[ceiling][r["seed"]] for r in rs if r["seed"] in ceilings[ceiling]]
                print(f"{env:<18} {method:<14} {labels:>7,}  {fmt(summarize(frac), 2)} | {fmt(summarize(own))} | "
                      f"{ceiling} {fmt(summarize(top))}")
                shared = [r for r in rs if r["seed"] in of_sac]
                if shared:  # the figure plots against it
                    frac = [r["stoch"] / of_sac[r["seed"]] for r in shared]
                    print(f"{'':<41} of `sac` at SB3's sizes (seeds {[r['seed'] for r in shared]}): "
                          f"{fmt(summarize(frac), 2)} | `sac` {fmt(summarize([of_sac[r['seed']] for r in shared]))}")
                xs.append(labels), ys.append(np.mean(frac))
                axes[0, k].plot([labels] * len(frac), frac, ".", color=f"C{m}", alpha=0.4)  # each seed
            if xs:
                of = "PPO" if ceiling == "ppo-ceiling" else "sac, SB3's sizes" if of_sac else ceiling
                axes[0, k].plot(xs, ys, "o-", color=f"C{m}", label=f"{method} (mean; of {of})")
        axes[0, k].axhline(1.0, ls="--", color="gray", lw=1)  # each agent's own true-reward ceiling
        axes[0, k].set(title=env, xscale="log", xlabel="labels used", ylabel="fraction of its true-reward ceiling (dots: seeds)", ylim=(0, None))
        if axes[0, k].get_legend_handles_labels()[0]:
            axes[0, k].legend(fontsize=8)
    save_figure(fig, args.root / "label_efficiency.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report"):
        q = sub.add_parser(name)
        q.add_argument("--root", type=Path, required=True)
        q.add_argument("--record", type=Path, default=RECORD, help="the JSONL of finished runs, shared with the protocol (its "
                       "sac-small runs are this table's off-policy ceiling): %(default)s")
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        q.add_argument("--budgets", type=int, nargs="+", default=[1000, 10000])
    sub.choices["report"].add_argument("--sac-rows", type=Path, default=None, help="rows.jsonl of `sac_sb3.py learn`: its rl-align "
                                       "runs (`sac` at SB3's sizes, HalfCheetah-v5) as a second off-policy ceiling there")
    sub.choices["run"].add_argument("--workers", type=int, default=2)
    sub.choices["run"].add_argument("--only", nargs="+", default=None, help="these methods only (e.g. ppo-ceiling rlhf sail-revkl "
                                    "sac-small), each at every budget")
    sub.choices["run"].add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="these tasks only (so that two "
                                    "queues sharing a record never run the same cell)")
    sub.choices["run"].add_argument("--longest-first", action="store_true", help="order the queue by expected run time, not "
                                    "seed by seed (for many workers)")
    args = p.parse_args()
    if getattr(args, "sac_rows", None) and not args.sac_rows.is_file():
        p.error(f"--sac-rows {args.sac_rows}: no such file; give the rows.jsonl that `sac_sb3.py learn` writes in its --root")
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
