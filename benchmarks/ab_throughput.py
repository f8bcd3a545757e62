"""Env steps/s of the same agent in two source trees (for example a `git worktree` of the commit before a
change, and the working tree), alternating A, B, A, B so machine noise hits both; the ratio of medians
is the figure (``--clock process`` counts the measuring process's CPU seconds instead, for a machine other
jobs share). Each measurement runs ``benchmarks/throughput.py``'s ``ours()`` in a fresh process whose
``PYTHONPATH`` is that tree.

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab_throughput.py /tmp/before . --agent sail-revkl --env halfcheetah-pref \\
        --set agent.ref=refs/HalfCheetah-v5-9c38c611f9-s0.pt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SNIPPET = "import json, sys; import benchmarks.throughput as t; print(json.dumps(t.ours({steps}, {agent!r}, {env!r}, {sets!r})))"
# --clock process: ours() times its loop with the process's CPU seconds instead of the wall clock, so that
# other jobs on a shared machine do not dilute the figure (torch runs single-threaded here, MuJoCo too)
PROCESS_CLOCK = "import time; time.perf_counter = time.process_time; "


def measure(tree: Path, steps: int, agent: str, env: str, sets: list[str], clock: str = "wall") -> float:
    snippet = (PROCESS_CLOCK if clock == "process" else "") + SNIPPET.format(steps=steps, agent=agent, env=env, sets=sets)
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tree,
                         env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr.strip().splitlines()[-1]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="source tree A (the anchor)")
    p.add_argument("b", type=Path, help="source tree B")
    p.add_argument("--agent", default="ppo")
    p.add_argument("--env", default="halfcheetah")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20480)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall: steps per second of the wall clock; process: per CPU second of the measuring process (a shared machine)")
    args = p.parse_args()
    runs: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.repeats):
        for key in ("a", "b"):
            runs[key].append(measure(getattr(args, key).resolve(), args.steps, args.agent, args.env, args.set, args.clock))
        print(f"repeat {r}: A {runs['a'][-1]:,.0f} steps/s | B {runs['b'][-1]:,.0f} steps/s | B/A {runs['b'][-1] / runs['a'][-1]:.3f}", flush=True)
    a, b = statistics.median(runs["a"]), statistics.median(runs["b"])
    pairs = statistics.median(y / x for x, y in zip(runs["a"], runs["b"]))
    print(f"median: A {a:,.0f}, B {b:,.0f} steps/s, B/A {b / a:.3f}; median of the repeats' B/A {pairs:.3f} "
          f"({args.agent}, {args.steps} steps x {args.repeats}, {args.clock} clock)")


if __name__ == "__main__":
    main()
