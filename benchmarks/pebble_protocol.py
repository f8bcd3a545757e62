"""The off-policy preference protocol: SAC on the true reward, PEBBLE and SAIL-RevKL off-policy on DeepMind
Control tasks, several seeds, run as a resumable queue; then the rliable comparison.

    python benchmarks/pebble_protocol.py run --root /work/bench/protocol --workers 2
    python benchmarks/pebble_protocol.py report --root /work/bench/protocol
    python benchmarks/pebble_protocol.py screen --root /work/bench/screen --workers 2    # the revkl screen
    python benchmarks/pebble_protocol.py report --root /work/bench/screen --screen
    python benchmarks/pebble_protocol.py run --root /work/bench/protocol --workers 2 --screen-best

``run`` works through the jobs seed by seed (every method of seed 0 first, then seed 1, ...), one
``rl-align train`` process per worker, each into ``<root>/<env>/<agent>/s<seed>/``: an interrupted run
continues with ``--resume`` from its last checkpoint (so a stopped queue picks up where it was; one stopped
before its first checkpoint starts again). Each finished run is appended as
one line (final returns, labels, wall-clock, the evaluation curve, the commit) to the record,
``benchmarks/pebble_protocol.jsonl`` by default (``--record``), which is committed: a job already in the
record is skipped, so the queue goes on across sessions and machines even when ``--root`` is gone, and
``report`` reads the record, not the run folders. ``report`` prints, per task, each method's final
stochastic and deterministic return (IQM with 95% stratified-bootstrap interval, mean ± std, per seed), its
share of the true-reward ceiling, the labels it used, reward learning's share of wall-clock, the learned
reward's per-step correlation with the true one late in the run (runs that log ``pref/reward_corr``),
the probability of improvement of SAIL-RevKL over PEBBLE, and draws return against env steps and
against labels (``<root>/protocol.png``). ``screen`` runs ``pebble-revkl`` on cheetah-run at 2 seeds x
100k steps over ``revkl_coef`` (1e-4, the paper's; 1e-3; 1e-2) x direction (reverse, forward) x reference
(lagged, init), each setting in its own method folder ``pebble-revkl<tag>``; ``report --screen`` ranks them
beside the protocol's arms read at 100k steps (figure ``<root>/screen.png``), and ``run --screen-best``
runs the best one at the protocol's steps and seeds (method ``pebble-revkl-best-<setting>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rl_align.stats import fmt, prob_improvement, prob_improvement_ci, summarize  # noqa: E402

TASKS = ("cheetah-run-pref", "walker-walk-pref")
METHODS = ("sac-small", "pebble", "pebble-revkl")
CEILING = "sac-small"


def job_folder(root: Path, env: str, agent: str, seed: int, tag: str = "") -> Path:
    return root / env / (agent + tag) / f"s{seed}"


RECORD = REPO / "benchmarks" / "pebble_protocol.jsonl"


def read_record(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(run_dir: Path) -> dict:
    """One finished run folder as a record line: final returns, labels, wall-clock, evaluation curve, and
    (PEBBLE family) each feedback session's reward-ensemble epochs and labels so far, and the learned reward's
    per-step correlation with the true one over the last 20 logged iterations (``pref/reward_corr``)."""
    s = json.loads((run_dir / "summary.json").read_text())
    curve, labels, feedback_s, epochs, corr = [], 0.0, 0.0, [], []
    with (run_dir / "progress.csv").open() as f:
        for row in csv.DictReader(f):
            labels = float(row.get("train/queries_used") or labels)  # logged on the rows where labels were spent
            feedback_s += float(row.get("time/feedback_s") or 0.0)
            if row.get("pebble/rm_epochs"):  # one per feedback session: the reward ensemble's epochs and labels
                epochs.append((int(float(row["pebble/rm_epochs"])), int(float(row["pebble/labels"]))))
            if row.get("pref/reward_corr"):
                corr.append(float(row["pref/reward_corr"]))
            if row.get("eval/return_stoch"):
                curve.append((float(row["step"]), float(row["eval/return_stoch"]), labels))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"seed": s["seed"], "stoch": s["final"]["eval/return_stoch"], "det": s["final"]["eval/return_det"],
            "labels": s["queries_used"], "steps": s["env_steps"], "wall": s["wall_time_s"], "feedback_s": round(feedback_s, 1),
            "rm_epochs": epochs, "curve": curve, "commit": commit, "host": platform.node(),
            **({"reward_corr_late": round(float(np.nanmean(corr[-20:])), 3)} if corr else {})}


def run_job(root: Path, env: str, agent: str, seed: int, steps: int | None, sets: list[str], tag: str, record: Path) -> str:
    key = {"env": env, "method": agent + tag, "seed": seed}
    if any(all(r.get(k) == v for k, v in key.items()) for r in read_record(record)):
        return f"done   {env} {agent}{tag} s{seed} (in {record.name})"
    out = job_folder(root, env, agent, seed, tag)
    existing = sorted(out.glob("*/*/*/config.yaml"))
    if existing and (existing[-1].parent / "summary.json").exists():
        append_record(record, {**key, "sets": sets, **finished(existing[-1].parent)})
        return f"done   {env} {agent}{tag} s{seed} (recorded)"
    if existing and not (existing[-1].parent / "checkpoints" / "last.pt").exists():
        shutil.rmtree(existing[-1].parent)  # stopped before its first checkpoint: nothing to resume, start it again
        existing = []
    if existing:
        cmd = ["train", "--resume", str(existing[-1].parent)]
    else:
        cmd = ["train", "--env", env, "--agent", agent, "--seed", str(seed), "--set", f"run.out_dir={out}", "--set", "run.progress=false"]
        cmd += ["--steps", str(steps)] if steps else []
        for s in sets:
            cmd += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with (out / "log.txt").open("a") as log:
        r = subprocess.run([sys.executable, "-m", "rl_align.cli", *cmd], stdout=log, stderr=subprocess.STDOUT)
    done = sorted(out.glob("*/*/*/summary.json"))
    if r.returncode == 0 and done:
        append_record(record, {**key, "sets": sets, **finished(done[-1].parent)})
    return f"{'ok' if r.returncode == 0 else f'rc={r.returncode}':6} {env} {agent}{tag} s{seed} ({time.time() - t0:.0f} s)"


def append_record(path: Path, line: dict) -> None:
    with path.open("a") as f:  # one short line per append: the two workers' lines never interleave
        f.write(json.dumps(line) + "\n")


def cmd_run(args) -> None:
    if args.screen_best:  # the screen's best setting at the protocol's steps and seeds, in its own method folder
        coef, direction, ref = SCREEN[screen_methods().index(screen_ranking(args.record)[0])]
        if (coef, direction, ref) == PAPER:
            print("the screen's best setting is the paper's: the protocol's pebble-revkl arm already runs it")
            return
        args.methods, args.tag = ["pebble-revkl"], "-best" + screen_tag(coef, direction, ref)
        args.set = [*screen_sets(coef, direction, ref), *args.set]
    jobs = [(env, agent, seed, args.set, args.tag) for seed in args.seeds for env in args.tasks for agent in args.methods or METHODS]
    run_queue(args, jobs)


def run_queue(args, jobs: list[tuple]) -> None:
    with ThreadPoolExecutor(args.workers) as pool:
        for line in pool.map(lambda j: run_job(args.root, j[0], j[1], j[2], args.steps, j[3], j[4], args.record), jobs):
            print(line, flush=True)


SCREEN_TASK = "cheetah-run-pref"
PAPER = ("1e-4", "forward", "lagged")  # the pebble-revkl preset's revkl_coef, revkl_direction, ref
SCREEN = [(coef, direction, ref) for coef in ("1e-4", "1e-3", "1e-2") for direction in ("reverse", "forward") for ref in ("lagged", "init")]


def screen_tag(coef: str, direction: str, ref: str) -> str:
    return f"-c{coef}-{direction}-{ref}"


def screen_sets(coef: str, direction: str, ref: str) -> list[str]:
    return [f"agent.revkl_coef={coef}", f"agent.revkl_direction={direction}", f"agent.ref={ref}"]


def screen_methods() -> list[str]:
    return ["pebble-revkl" + screen_tag(*s) for s in SCREEN]


def screen_ranking(record: Path) -> list[str]:
    """The screen's settings that have runs in the record, best first by the IQM of their final stochastic return."""
    scores = {m: summarize([r["stoch"] for r in load(record, SCREEN_TASK, m)]) for m in screen_methods()}
    ranked = sorted((m for m in scores if scores[m]["n"]), key=lambda m: -scores[m]["iqm"])
    if not ranked:
        sys.exit(f"no screen runs in {record}: run `pebble_protocol.py screen` first")
    return ranked


def cmd_screen(args) -> None:
    jobs = [(SCREEN_TASK, "pebble-revkl", seed, screen_sets(*s), screen_tag(*s)) for seed in args.seeds for s in SCREEN]
    run_queue(args, jobs)


def load(record: Path, env: str, method: str) -> list[dict]:
    """Per finished seed of one method on one task, from the record: final returns, labels, the curve.
    ``method@step`` reads a longer run at ``step`` of its evaluation curve (the screen's 100k against the
    protocol's 200k runs); its deterministic return, only evaluated at the end, is then nan."""
    name, _, step = method.partition("@")
    rs = sorted((r for r in read_record(record) if r["env"] == env and r["method"] == name), key=lambda r: r["seed"])
    return [t for t in (at_step(r, float(step)) for r in rs) if t] if step else rs


def at_step(r: dict, step: float) -> dict | None:
    point = next((c for c in r["curve"] if c[0] == step), None)
    if point is None:
        return None
    return {**r, "stoch": point[1], "det": float("nan"), "labels": point[2], "steps": int(step), "wall": float("nan"),
            "feedback_s": 0.0, "curve": [c for c in r["curve"] if c[0] <= step]}


def cmd_report(args) -> None:
    screen = screen_methods()
    if args.screen:  # the settings ranked by return, under the protocol's arms read at the screen's 100k steps
        args.tasks, args.methods = [SCREEN_TASK], [*screen_ranking(args.record), *(f"{m}@100000" for m in METHODS)]
    elif args.methods is None:
        args.methods = [*METHODS, *sorted({r["method"] for r in read_record(args.record)} - set(METHODS) - set(screen))]
    lines = []
    for env in args.tasks:
        results = {m: load(args.record, env, m) for m in args.methods}
        if args.screen:  # the protocol's arms at the seeds the screen ran
            seeds = {r["seed"] for m in screen for r in results.get(m, [])}
            results = {m: [r for r in rs if r["seed"] in seeds] for m, rs in results.items()}
        ceiling = {(r["seed"], step): ret for r in load(args.record, env, CEILING) for step, ret, _ in r["curve"]}  # at every evaluation
        lines.append(f"\n{env}")
        width = max(map(len, results))
        for m, rs in results.items():
            if not rs:
                continue
            st, de = summarize([r["stoch"] for r in rs]), summarize([r["det"] for r in rs])
            share = [r["stoch"] / ceiling[r["seed"], r["steps"]] for r in rs if (r["seed"], r["steps"]) in ceiling]
            wall = np.mean([r["wall"] for r in rs]) / 60
            lines.append(f"  {m:<{width}} stoch {fmt(st)} | det {fmt(de)} | of ceiling {fmt(summarize(share), 2)} | "
                         f"labels {max(r['labels'] for r in rs):.0f} | steps {rs[0]['steps']:,}"
                         + (f" | {wall:.0f} min/run" if np.isfinite(wall) else "")
                         + (f" | reward learning {100 * sum(r['feedback_s'] for r in rs) / sum(r['wall'] for r in rs):.1f}% of it"
                            if any(r["feedback_s"] for r in rs) else "")
                         + (f" | learned-reward corr, last 20 iterations {np.mean([r['reward_corr_late'] for r in rs]):.2f}"
                            if all("reward_corr_late" in r for r in rs) else ""))
            lines.append("    per seed (stoch / det): " + ", ".join(f"s{r['seed']} {r['stoch']:.1f} / {r['det']:.1f}" for r in rs))
        best = [m for m in results if m.startswith("pebble-revkl-best")]
        for a, b in dict.fromkeys(map(tuple, [*args.pairs, *([m, "pebble"] for m in best)])):  # each pair once, in order
            x, y = [r["stoch"] for r in results.get(a, [])], [r["stoch"] for r in results.get(b, [])]
            if len(x) >= 2 and len(y) >= 2:
                lo, hi = prob_improvement_ci(x, y)
                lines.append(f"  P({a} > {b}) = {prob_improvement(x, y):.2f} [{lo:.2f}, {hi:.2f}] (n={len(x)}, {len(y)})")
    print("\n".join(lines))
    plot_screen(args, results) if args.screen else plot(args)


def plot_screen(args, results: dict[str, list[dict]]) -> None:
    """The screen's settings, best first: each seed's final stochastic return as a dot, the mean as a bar,
    the protocol's arms at the same steps and seeds as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [m for m in args.methods if "@" not in m and results.get(m)]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(settings) + 1.5))
    for i, m in enumerate(settings):
        x = [r["stoch"] for r in results[m]]
        ax.plot(x, [i] * len(x), "o", color="C0", ms=5)
        ax.plot([np.mean(x)] * 2, [i - 0.3, i + 0.3], color="C0", lw=2)
    for k, m in enumerate(m for m in args.methods if "@" in m and results.get(m)):
        ax.axvline(np.mean([r["stoch"] for r in results[m]]), ls="--", color=f"C{k + 1}", label=f"{m} (mean of the same seeds)")
    ax.set_yticks(range(len(settings)), [m.removeprefix("pebble-revkl-") for m in settings])
    ax.invert_yaxis()
    ax.set(xlabel=f"stochastic return at {results[settings[0]][0]['steps']:,} steps (dots: seeds, bar: mean)",
           title=f"{SCREEN_TASK}: pebble-revkl, revkl_coef x direction x reference")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, args.root / "screen.png")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.tasks), figsize=(5 * len(args.tasks), 7), squeeze=False)
    for k, env in enumerate(args.tasks):
        for i, m in enumerate(args.methods):
            rs, color = load(args.record, env, m), f"C{i % 10}"  # one colour per method in both rows
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            steps = np.array([c[0] for c in rs[0]["curve"][:n]])
            ret = np.array([[c[1] for c in r["curve"][:n]] for r in rs])
            labels = np.array([[c[2] for c in r["curve"][:n]] for r in rs]).max(0)
            axes[0, k].plot(steps, ret.mean(0), color=color, label=f"{m} (n={len(rs)})")
            axes[0, k].fill_between(steps, ret.min(0), ret.max(0), color=color, alpha=0.15)
            if labels.max() > 0:
                axes[1, k].plot(labels, ret.mean(0), "o-", ms=3, color=color, label=m)
            else:  # a true-reward ceiling: its final return as a line
                axes[1, k].axhline(ret.mean(0)[-1], ls="--", color=color, label=f"{m} at {steps[-1]:,.0f} steps")
        axes[0, k].set(title=env, xlabel="env steps", ylabel="stochastic return (mean, min-max)")
        axes[1, k].set(xlabel="labels used", ylabel="stochastic return")
        axes[0, k].ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
        for ax in axes[:, k]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    save_figure(fig, args.root / "protocol.png")


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "screen"):
        q = sub.add_parser(name)
        q.add_argument("--root", type=Path, required=True, help="where the runs go (outside the checkout for long queues)")
        q.add_argument("--record", type=Path, default=RECORD, help="the JSONL of finished runs (default: %(default)s)")
        q.add_argument("--tasks", nargs="+", default=list(TASKS))
        q.add_argument("--methods", nargs="+", default=None, help="default: the protocol's three (report: and every other"
                       " arm in the record, e.g. a --tag run, screen settings aside)")
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    for name, steps in (("run", None), ("screen", 100_000)):
        run = sub.choices[name]
        run.add_argument("--workers", type=int, default=2)
        run.add_argument("--steps", type=int, default=steps, help="env steps per run (default: the preset's)")
        run.add_argument("--set", action="append", default=[], help="override for every run (as for rl-align train)")
        run.add_argument("--tag", default="", type=lambda t: "-" + t.lstrip("-") if t else "",
                         help="suffix of the method folder for runs with --set overrides: --tag 1000-rm10 runs pebble-1000-rm10 "
                         "(a leading dash is added, so the value need not start with one, which argparse would read as an option)")
    sub.choices["run"].add_argument("--screen-best", action="store_true", help="run pebble-revkl at the screen's best setting "
                                    "(ranked as report --screen ranks), as method pebble-revkl-best-<setting>")
    sub.choices["screen"].set_defaults(seeds=[0, 1])
    sub.choices["report"].add_argument("--screen", action="store_true", help="rank the settings of the screen")
    sub.choices["report"].add_argument("--pairs", nargs=2, action="append", default=[["pebble-revkl", "pebble"]], metavar=("A", "B"))
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report, "screen": cmd_screen}[args.cmd](args)


if __name__ == "__main__":
    main()
