"""Same seed, same numbers: run a list of short fixed-seed trainings in one source tree, then compare two
sets of runs' ``progress.csv`` value by value, as text (``time/`` columns excluded: they measure the machine).

    git worktree add /tmp/base30 bd9ce74                       # the tree before a change
    python benchmarks/identity.py run /tmp/base30 /tmp/id-before
    python benchmarks/identity.py run . /tmp/id-after
    python benchmarks/identity.py diff /tmp/id-before /tmp/id-after

``run`` starts each training in a fresh process whose ``PYTHONPATH`` is the tree (and checks that
``rl_align`` is imported from there); ``diff`` prints, per run, the values compared, the differences and
the columns only one side has, and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

COMMON = ["--seed", "3", "--set", "run.eval_every=5000", "--set", "run.eval_episodes=2", "--set", "run.progress=false"]
RUNS = {  # name -> (env, agent, extra --set)
    "ppo": ("halfcheetah", "ppo", []),
    "sail-revkl": ("halfcheetah-pref", "sail-revkl", ["agent.diag_every=1", "agent.curvature_every=1"]),
    "rlhf": ("halfcheetah-pref", "rlhf", []),
    "ppo-lag": ("halfcheetah", "ppo-lag", []),
    "ppo-pid": ("halfcheetah", "ppo-pid", []),
    "ppo-opd": ("halfcheetah", "ppo-opd", []),
    "sail-revkl-opd": ("halfcheetah", "sail-revkl-opd", []),
    "comal": ("halfcheetah-cyclic", "comal", ["agent.inner_updates=2"]),
}


def tree_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def check_import(tree: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import rl_align; print(rl_align.__file__)"], cwd=tree, env=tree_env(tree),
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"rl_align imports from {out}, not from {tree}: is another copy installed without PYTHONPATH taking precedence?")
    print(f"rl_align from {out}", flush=True)


def run(tree: Path, out: Path, steps: int, names: list[str]) -> None:
    tree = tree.resolve()
    check_import(tree)
    for name in names:
        env, agent, sets = RUNS[name]
        cmd = [sys.executable, "-m", "rl_align.cli", "train", "--env", env, "--agent", agent, "--steps", str(steps), *COMMON,
               "--set", f"run.out_dir={out.resolve() / name}"]
        for s in sets:
            cmd += ["--set", s]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=tree, env=tree_env(tree), check=True, stdout=subprocess.DEVNULL)


def progress(folder: Path) -> list[dict[str, str]]:
    paths = [p for p in folder.rglob("progress.csv") if "_refs" not in p.parts]
    if len(paths) != 1:
        raise SystemExit(f"{folder}: expected one progress.csv, found {len(paths)}")
    with paths[0].open() as f:
        return list(csv.DictReader(f))


def diff(a: Path, b: Path, names: list[str]) -> int:
    bad = 0
    print("| run | rows | values compared | differences | columns only in A | columns only in B |")
    print("|---|---|---|---|---|---|")
    for name in names:
        ra, rb = progress(a / name), progress(b / name)
        ka, kb = set(ra[0]) if ra else set(), set(rb[0]) if rb else set()
        keys = sorted(k for k in ka & kb if not k.startswith("time/"))
        n = diffs = 0
        for x, y in zip(ra, rb):
            for k in keys:
                n += 1
                if x[k] != y[k]:
                    diffs += 1
                    if diffs <= 3:
                        print(f"  {name} step {x.get('step', '?')}: {k} {x[k]} != {y[k]}", file=sys.stderr)
        diffs += abs(len(ra) - len(rb))
        only_a = sorted(k for k in ka - kb if not k.startswith("time/"))
        only_b = sorted(k for k in kb - ka if not k.startswith("time/"))
        print(f"| {name} | {len(ra)} / {len(rb)} | {n} | {diffs} | {', '.join(only_a) or '-'} | {', '.join(only_b) or '-'} |")
        bad += diffs
    return 1 if bad else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every run of the list with the source tree TREE, into OUT/<run>")
    r.add_argument("tree", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--steps", type=int, default=10_000)
    d = sub.add_parser("diff", help="compare the progress.csv of OUT_A/<run> and OUT_B/<run> as text")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    for q in (r, d):
        q.add_argument("--only", default=",".join(RUNS), help=f"comma-separated runs of {', '.join(RUNS)}")
    args = p.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"identity: unknown run {unknown[0]}; runs: {', '.join(RUNS)}", file=sys.stderr)
        sys.exit(2)
    if args.cmd == "run":
        run(args.tree, args.out, args.steps, names)
    else:
        sys.exit(diff(args.a, args.b, names))


if __name__ == "__main__":
    main()
