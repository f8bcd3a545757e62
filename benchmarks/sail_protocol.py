"""The preference-learning protocol of the SAIL-RevKL issue: agents from the shipped references, equal env
steps, several seeds, the PPO-on-the-true-reward ceiling from the same reference, rliable statistics.

Each row of the output (.jsonl, one per finished run, written as runs finish) holds the run's start and
end stochastic / deterministic return (``run.eval_episodes`` episodes each), win rate and KL against the
reference, queries, wall time and the held-out accuracy of the signal that drives it (mean over the second
half of training). ``--table`` prints, per env and variant: the final stochastic return (IQM [95%
bootstrap CI], mean ± std), the share of the reference-to-PPO gap it closes (paired by seed), held-out
accuracy, and the probability of improvement of each variant over ``--versus``.

    python benchmarks/sail_protocol.py --envs halfcheetah-pref --seeds 0 1 2 3 4 --steps 100000 \\
        --variant sail-revkl --variant sail --variant ppo --jobs 2 --out benchmarks/sail_protocol.jsonl
    python benchmarks/sail_protocol.py --table benchmarks/sail_protocol.jsonl --versus sail
    python benchmarks/sail_protocol.py --table benchmarks/sail_protocol_500k.jsonl --curves docs/sail-500k/curves.png \
        --only sail-revkl center-tkl

``--curves PNG`` draws, per env, the training curves of the rows' run folders (IQM over seeds with a
bootstrap band, ``rl_align.report``): rollout return, log-std, per-update approx KL, KL to the reference,
held-out accuracy and the DPO part's gradient norm; rows whose folder is gone are skipped and counted.

A variant is ``NAME`` (an agent preset) or ``LABEL=PRESET:key=value,key=value`` (agent overrides), e.g.
``--variant revkl-0.3=sail-revkl:revkl_coef=0.3``. ``ppo`` starts PPO from the same reference.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    label, _, rest = text.partition("=") if "=" in text.split(":")[0] else (text, "", text)
    preset, _, sets = rest.partition(":")
    return label, preset, [f"agent.{kv}" for kv in sets.split(",") if kv]


def run_one(env: str, seed: int, variant: str, steps: int, out_dir: str, extra: list[str]) -> dict:
    import torch

    from rl_align.train import auto_reference
    from rl_align.runs import resolve_config
    from rl_align.train import train

    torch.set_num_threads(1)
    label, preset, sets = parse_variant(variant)
    common = [f"run.out_dir={out_dir}", "run.progress=false", *extra]
    ref = auto_reference(resolve_config(env, "sail-revkl", common, seed=seed))
    if preset in ("ppo", "rlhf") or preset.startswith("rlhf"):
        sets = [f"agent.init={ref}", *sets]
    else:
        sets = [f"agent.ref={ref}", *sets]
    cfg = resolve_config(env, preset, common + sets, steps=steps, seed=seed)
    t = time.perf_counter()
    folder, summary = train(cfg, quiet=True)
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    second = [r for r in rows if float(r["step"]) > steps / 2]
    acc = [float(r["pref/heldout_accuracy"]) for r in second if r.get("pref/heldout_accuracy")]
    ratio = [float(r["grad/revkl_over_dpo"]) for r in rows if r.get("grad/revkl_over_dpo")]
    halves = {k: [float(r[f"grad/{k}"]) for r in rows if r.get(f"grad/{k}") not in (None, "", "nan")] for k in ("dpo_halves_cos", "pg_halves_cos")}
    xvel = [float(r["rollout/x_velocity"]) for r in rows if r.get("rollout/x_velocity")]
    i, f = summary["initial"], summary["final"]
    return {"env": env, "seed": seed, "variant": label, "preset": preset, "sets": sets[1:], "steps": summary["env_steps"],
            "ref": str(ref), "folder": str(folder), "wall_s": time.perf_counter() - t, "queries": summary["queries_used"],
            "episodes": summary["eval_episodes"],
            "stoch_start": i["eval/return_stoch"], "stoch_end": f["eval/return_stoch"],
            "det_start": i["eval/return_det"], "det_end": f["eval/return_det"],
            "win_rate": f.get("eval/win_rate_vs_ref"), "kl_ref": f.get("eval/kl_to_ref"),
            "heldout_acc_2nd_half": float(np.mean(acc)) if acc else None,
            "revkl_over_dpo_median": float(np.median(ratio)) if ratio else None, "extra": extra,
            "xvel_start": xvel[0] if xvel else None, "xvel_end": float(np.mean(xvel[-8:])) if xvel else None,
            **{f"{k}_median": float(np.median(v)) if v else None for k, v in halves.items()}}


def table(path: Path, versus: str | None) -> None:
    from rl_align.stats import iqm, iqm_ci, prob_improvement

    rows = [json.loads(line) for line in open(path) if line.strip()]
    for env in sorted({r["env"] for r in rows}):
        er = [r for r in rows if r["env"] == env]
        ppo = {r["seed"]: r["stoch_end"] for r in er if r["preset"] == "ppo"}
        print(f"\n{env}  (final stochastic return over {er[0]['episodes']} episodes per run; gap closed = (end - ref) / (PPO end - ref), paired by seed)")
        print(f"{'variant':<26}{'n':>3}  {'IQM [95% CI]':>24}  {'mean ± std':>16}  {'gain IQM':>9}  {'gap closed IQM [CI]':>24}  {'det end':>8}  {'acc 2nd half':>12}  {'P(>' + str(versus) + ')':>9}")
        by = {}
        for r in er:
            by.setdefault(r["variant"], []).append(r)
        for name, rs in sorted(by.items()):
            rs = sorted(rs, key=lambda r: r["seed"])
            end = np.array([r["stoch_end"] for r in rs])
            gain = end - np.array([r["stoch_start"] for r in rs])
            closed = np.array([(r["stoch_end"] - r["stoch_start"]) / (ppo[r["seed"]] - r["stoch_start"]) for r in rs if r["seed"] in ppo])
            lo, hi = iqm_ci(end)
            acc = [r["heldout_acc_2nd_half"] for r in rs if r.get("heldout_acc_2nd_half") is not None]
            gap = f"{iqm(closed):6.0%} [{iqm_ci(closed)[0]:.0%}, {iqm_ci(closed)[1]:.0%}]" if len(closed) else "-"
            pi = "-"
            if versus and versus in by and name != versus:
                other = {r["seed"]: r["stoch_end"] for r in by[versus]}
                pi = f"{prob_improvement(end, np.array(list(other.values()))):.2f}"
            print(f"{name:<26}{len(rs):>3}  {iqm(end):8.0f} [{lo:6.0f}, {hi:6.0f}]  {end.mean():7.0f} ± {end.std(ddof=1) if len(end) > 1 else 0:<6.0f}  "
                  f"{iqm(gain):9.0f}  {gap:>24}  {np.mean([r['det_end'] for r in rs]):8.0f}  {np.mean(acc) if acc else float('nan'):12.3f}  {pi:>9}")


CURVE_PANELS = [("rollout/ep_return", "rollout return (stochastic, true reward)"), ("train/log_std", "policy log-std (mean over dims)"),
                ("train/approx_kl", "approx KL to the behaviour policy per update"), ("train/kl_ref", "KL(pi || pi_ref) per state"),
                ("pref/heldout_accuracy", "held-out accuracy of h (fresh pairs)"), ("grad/dpo", "DPO part's gradient norm")]


def curves(path: Path, out: Path, variants: list[str]) -> None:
    """One PNG per env (``out`` with the env in its name) of the rows' training curves, grouped by variant."""
    from rl_align.report import Group, figure, read_run

    rows = [json.loads(line) for line in open(path) if line.strip()]
    for env in sorted({r["env"] for r in rows}):
        groups, missing = {}, 0
        for r in rows:
            if r["env"] != env or (variants and r["variant"] not in variants):
                continue
            if not Path(r["folder"], "progress.csv").exists():
                missing += 1
                continue
            groups.setdefault(r["variant"], Group(r["variant"])).runs.append(read_run(Path(r["folder"]), r["seed"]))
        target = out.with_name(f"{out.stem}-{env}{out.suffix}")
        if groups and figure(target, f"{env}, {path.name}", CURVE_PANELS, list(groups.values())):
            print(f"{target}: {sum(len(g.runs) for g in groups.values())} runs ({missing} rows without their run folder)")
        else:
            print(f"{env}: no run folder of these rows exists here ({missing} rows): nothing drawn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["halfcheetah-pref"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=500_000)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run (e.g. run.eval_episodes=10)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "sail_protocol.jsonl")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--versus", default=None)
    p.add_argument("--curves", type=Path, default=None, help="with --table: training curves of the rows' run folders, one PNG per env")
    p.add_argument("--only", nargs="+", default=[], help="with --curves: these variants only")
    args = p.parse_args()
    if args.curves and not args.table:  # without rows to read, --curves would start a whole protocol run instead
        p.error("--curves draws the runs of a results file: give it with --table FILE")
    if args.table and args.curves:
        curves(args.table, args.curves, args.only)
        return
    if args.table:
        table(args.table, args.versus)
        return
    jobs = [(e, s, v) for e in args.envs for s in args.seeds for v in (args.variant or ["sail-revkl"])]
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = {pool.submit(run_one, e, s, v, args.steps, args.runs_dir, args.set): (e, s, v) for e, s, v in jobs}
        for fut in as_completed(futs):
            try:
                row = fut.result()
            except Exception as exc:  # a run that fails is reported, the others go on
                print(f"{futs[fut]}: failed: {exc}", flush=True)
                continue
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['env']} s{row['seed']} {row['variant']}: stoch {row['stoch_start']:.0f} -> {row['stoch_end']:.0f}, "
                  f"det {row['det_start']:.0f} -> {row['det_end']:.0f}, acc {row['heldout_acc_2nd_half']}, {row['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
