"""``rl-align report <run folder | sweep folder>``: paper-style PNGs and a ``summary.md`` table.

Reads each run's ``progress.csv`` and ``summary.json`` (no TensorBoard server). Runs are grouped by
setting (a sweep's grid values; a single run is one group); curves show the interquartile mean (IQM)
over seeds with a 95% percentile-bootstrap band, the table IQM [95% CI] beside mean ± std and n
(``rl_align.stats``, rliable's definitions; no t-interval, whose multiplier is 12.7 at two seeds).
``--compare A B`` adds the probability that group A's final metrics beat group B's; ``--normalize REF
CEILING`` adds the final return normalized so the reference scores 0 and the ceiling 1.
A figure whose keys no run logged is skipped and the reason is printed and written down.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rl_align.errors import UserError
from rl_align.stats import fmt, iqm_band, normalize, prob_improvement, prob_improvement_ci, summarize

FINAL_COLUMNS = (  # (summary key, column title)
    ("eval/return_det", "return (det)"), ("eval/return_stoch", "return (stoch)"), ("eval/cost_det", "episode cost"),
    ("eval/violation", "violation"), ("eval/win_rate_vs_ref", "win rate vs ref"), ("eval/kl_to_ref", "KL to ref"),
    ("queries_used", "queries"), ("wall_time_s", "wall time (s)"),
)


@dataclass
class Run:
    folder: Path
    seed: int
    columns: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values) of the rows that logged it
    rows: list[dict[str, float]]
    summary: dict | None
    cost_limit: float | None


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "trial: error" of trials without a result


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_run(folder: Path, seed: int | None = None) -> Run:
    """One run folder's logged scalars; missing files give empty data, not an error."""
    import yaml

    rows: list[dict[str, float]] = []
    path = folder / "progress.csv"
    if path.exists():
        with path.open(newline="") as f:
            rows = [{k: _float(v) for k, v in r.items() if k is not None} for r in csv.DictReader(f)]
    columns = {}
    for key in {k for r in rows for k in r} - {"step"}:
        pts = [(r["step"], r[key]) for r in rows if math.isfinite(r.get(key, math.nan)) and math.isfinite(r.get("step", math.nan))]
        if pts:
            columns[key] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else None
    cost_limit = None
    if (folder / "config.yaml").exists():
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        cost_limit = ((cfg.get("env") or {}).get("cost") or {}).get("limit")
        seed = seed if seed is not None else (cfg.get("run") or {}).get("seed", 0)
    return Run(folder, int(seed or 0), columns, rows, summary, cost_limit)


def load_groups(folder: Path) -> tuple[list[Group], str]:
    """Groups of runs of a sweep folder (``index.csv``) or of one run folder (``config.yaml``)."""
    folder = Path(folder)
    if (folder / "index.csv").exists():
        with (folder / "index.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            index = list(reader)
        keys = fields[fields.index("seed") + 1: fields.index("status")] if "seed" in fields and "status" in fields else []
        groups: dict[str, Group] = {}
        for r in index:
            label = ", ".join(f"{k}={r[k]}" for k in keys) or "base"
            g = groups.setdefault(label, Group(label))
            run_folder = folder / r["run_folder"] if r.get("run_folder") else None
            if r.get("status") == "finished" and run_folder is not None and run_folder.exists():
                g.runs.append(read_run(run_folder, int(r["seed"])))
            else:
                g.failed.append(f"{r['trial']}: {r.get('status')}{': ' + r['error'] if r.get('error') else ''}")
        return list(groups.values()), f"sweep {folder.name}"
    if (folder / "config.yaml").exists():
        run = read_run(folder)
        cfg_label = folder.parent.name + " on " + folder.parent.parent.name
        return [Group(cfg_label, [run])], f"run {folder}"
    raise UserError(f"{folder} is neither a run folder (config.yaml) nor a sweep folder (index.csv)")


# ---- aggregation over seeds -----------------------------------------------------------------------

def aggregate(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """IQM over seeds on the union of their x values inside the range all seeds cover (linear
    interpolation), and the ``(low, high)`` edges of its 95% bootstrap band (None for a single seed)."""
    series = [(x, y) for x, y in series if len(x)]
    if len(series) == 1:
        return series[0][0], series[0][1], None
    lo, hi = max(x.min() for x, _ in series), min(x.max() for x, _ in series)
    grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in series]))
    if len(grid) == 0:
        return np.array([]), np.array([]), None
    ys = np.stack([np.interp(grid, *_sorted(x, y)) for x, y in series])
    center, band_lo, band_hi = iqm_band(ys)
    return grid, center, (band_lo, band_hi)


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def _paired(run: Run, xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from the rows that logged both keys (e.g. queries used and return)."""
    pts = [(r[xkey], r[ykey]) for r in run.rows if math.isfinite(r.get(xkey, math.nan)) and math.isfinite(r.get(ykey, math.nan))]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


# ---- figures ---------------------------------------------------------------------------------------

def _series(g: Group, key: str, xkey: str) -> list[tuple[np.ndarray, np.ndarray]]:
    if xkey == "step":
        return [r.columns[key] for r in g.runs if key in r.columns]
    return [s for s in (_paired(r, xkey, key) for r in g.runs) if len(s[0])]


def figure(path: Path, title: str, panels: list[tuple[str, str]], groups: list[Group], xkey: str = "step",
           xlabel: str = "env steps", limit_on: tuple[str, ...] = ()) -> bool:
    """One PNG with a panel per key that has data; False (nothing written) when no panel has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in panels if any(_series(g, key, xkey) for g in groups)]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, panels):
        for i, g in enumerate(groups):
            series = _series(g, key, xkey)
            if not series:
                continue
            x, center, band = aggregate(series)
            c = colors[i % len(colors)]
            ax.plot(x, center, color=c, label=f"{g.label} (n={len(series)})", marker="o" if len(x) <= 3 else None, ms=3)
            if band is not None:
                ax.fill_between(x, *band, color=c, alpha=0.2, linewidth=0)
        if key in limit_on:
            limits = sorted({r.cost_limit for g in groups for r in g.runs if r.cost_limit is not None})
            for lim in limits:
                ax.axhline(lim, color="k", ls="--", lw=1, label=f"limit d = {lim:g}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title + "  (IQM over seeds, shaded: 95% bootstrap interval)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4), 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _keys(groups: list[Group], prefix: str, exclude: tuple[str, ...] = ()) -> list[str]:
    found = sorted({k for g in groups for r in g.runs for k in r.columns if k.startswith(prefix) and k not in exclude})
    return found


def figure_specs(groups: list[Group]) -> list[dict]:
    """What the report draws: name, title, panels (key, label), x axis, lines of the cost limit."""
    pl = _keys(groups, "pl/")
    return [
        {"name": "return.png", "title": "True return vs env steps",
         "panels": [("eval/return_det", "evaluation return (deterministic)"), ("eval/return_stoch", "evaluation return (stochastic)"),
                    ("rollout/ep_return", "training episodes' return")]},
        {"name": "cost.png", "title": "Episode cost vs env steps", "limit_on": ("rollout/ep_cost", "eval/cost_det"),
         "panels": [("rollout/ep_cost", "training episodes' cost"), ("eval/cost_det", "evaluation episode cost"),
                    ("eval/violation", "violation max(0, Jc - d)")]},
        {"name": "multiplier.png", "title": "Constraint layer (safety/*) vs env steps", "panels": [(k, k) for k in _keys(groups, "safety/")]},
        {"name": "pl_diagnostics.png", "title": "PL diagnostics (pl/*) vs env steps", "panels": [(k, k) for k in pl]},
        {"name": "kl_to_ref.png", "title": "KL(pi || pi_ref) vs env steps",
         "panels": [("eval/kl_to_ref", "eval/kl_to_ref"), ("train/kl_ref", "train/kl_ref (training batch, per state)")]},
        {"name": "preference_diagnostics.png", "title": "Signal accuracy on labelled pairs (pref/*) vs env steps",
         "panels": [(k, k) for k in _keys(groups, "pref/")]},
        {"name": "gradients.png", "title": "Per-term gradient norms and DPO/shift cosine (grad/*) vs env steps",
         "panels": [(k, k) for k in _keys(groups, "grad/")]},
        {"name": "queries.png", "title": "Preference queries used vs env steps", "panels": [("train/queries_used", "queries used")]},
        {"name": "return_vs_queries.png", "title": "Feedback efficiency: true return vs preference queries",
         "xkey": "train/queries_used", "xlabel": "preference queries used",
         "panels": [("rollout/ep_return", "training episodes' return"), ("eval/return_det", "evaluation return (deterministic)")]},
    ]


# ---- table -----------------------------------------------------------------------------------------

def _digits(key: str) -> int:
    return 0 if key in ("queries_used", "wall_time_s") else (3 if "kl" in key or "win" in key else 1)


def _value(run: Run, key: str) -> float | None:
    s = run.summary or {}
    v = s.get("final", {}).get(key, s.get(key))
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _finals(g: Group, key: str) -> list[float]:
    return [v for v in (_value(r, key) for r in g.runs if r.summary is not None) if v is not None]


def summary_table(groups: list[Group], normalize_by: tuple[float, float] | None = None) -> str:
    """Markdown table: one row per setting, final metrics as IQM [95% bootstrap CI] · mean ± sample std
    (n) over the seeds that finished; with ``normalize_by = (ref, ceiling)`` a column of the final
    deterministic return normalized so the reference scores 0 and the ceiling 1."""
    cols = [(k, t) for k, t in FINAL_COLUMNS if any(_value(r, k) not in (None, 0.0) for g in groups for r in g.runs)
            or (k.startswith("eval/") and any(_value(r, k) is not None for g in groups for r in g.runs))]
    titles = [t for _, t in cols] + (["normalized return (det)"] if normalize_by else [])
    lines = ["| setting | seeds | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for g in groups:
        done = [r for r in g.runs if r.summary is not None]
        cells = [fmt(summarize(_finals(g, k)), _digits(k)) for k, _ in cols]
        if normalize_by:
            cells.append(fmt(summarize(normalize(_finals(g, "eval/return_det"), *normalize_by)), 2))
        lines.append(f"| {g.label} | {len(done)}/{len(done) + len(g.failed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COMPARE_KEYS = ("eval/return_det", "eval/return_stoch", "eval/win_rate_vs_ref")


def comparison(groups: list[Group], a: str, b: str) -> list[str]:
    """Markdown lines: P(A > B) (rliable's probability of improvement, ties 1/2) with its bootstrap
    interval on each final metric both groups logged; lower cost or violation is better, so for those
    the line says P(A's is lower)."""
    by_label = {g.label: g for g in groups}
    missing = [x for x in (a, b) if x not in by_label]
    if missing:
        raise UserError(f"--compare: no group {missing[0]!r}; groups: {', '.join(repr(g.label) for g in groups)}")
    lines = [f"Probability of improvement, {a} over {b} (final metrics, 95% bootstrap interval over seeds):", ""]
    for key in COMPARE_KEYS + ("eval/cost_det", "eval/violation"):
        xa, xb = _finals(by_label[a], key), _finals(by_label[b], key)
        if not xa or not xb:
            continue
        lower = key in ("eval/cost_det", "eval/violation")
        xa, xb = (np.negative(xa), np.negative(xb)) if lower else (xa, xb)
        lo, hi = prob_improvement_ci(xa, xb)
        ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else " (no interval: one seed)"
        lines.append(f"- {key}{' (lower is better)' if lower else ''}: P = {prob_improvement(xa, xb):.2f}{ci}, n = {len(xa)} vs {len(xb)}")
    return lines + [""]


def make_report(folder: Path, out: Path | None = None, log=print, compare: tuple[str, str] | None = None,
                normalize_by: tuple[float, float] | None = None) -> tuple[Path, list[Path], list[str]]:
    """Write the figures and ``summary.md`` into ``out`` (default ``<folder>/report``); returns
    ``(out, written PNGs, skipped-figure notes)``. ``compare = (A, B)``: group labels whose probability
    of improvement is added; ``normalize_by = (ref, ceiling)``: a normalized-return column."""
    from rl_align.checkpoints import write_text_atomic

    groups, what = load_groups(Path(folder))
    if not any(g.runs for g in groups):
        raise UserError(f"{folder}: no finished or logged run to report on (index.csv lists only failed or pending trials)")
    if normalize_by is not None and normalize_by[0] == normalize_by[1]:
        raise UserError(f"--normalize {normalize_by[0]:g} {normalize_by[1]:g}: the reference and the ceiling must differ")
    comparison_lines = comparison(groups, *compare) if compare else []
    out = Path(out) if out is not None else Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for spec in figure_specs(groups):
        path = out / spec["name"]
        if figure(path, spec["title"], spec["panels"], groups, xkey=spec.get("xkey", "step"), xlabel=spec.get("xlabel", "env steps"),
                  limit_on=spec.get("limit_on", ())):
            written.append(path)
        else:
            keys = " or ".join(k for k, _ in spec["panels"]) or {"multiplier.png": "safety/*", "pl_diagnostics.png": "pl/*"}.get(spec["name"], "")
            if spec.get("xkey", "step") != "step":
                keys = f"{spec['xkey']} together with {keys}"
            skipped.append(f"{spec['name']}: no run logged {keys}")
    text = [f"# Report: {what}", "", "Final evaluation over seeds: IQM [95% stratified bootstrap interval] · mean ± sample std (n); "
            "one value when one seed finished (no interval from one seed; at 2-3 seeds the interval spans about the observed range).", "",
            summary_table(groups, normalize_by), ""]
    if normalize_by:
        text += [f"Normalized return = (return_det - {normalize_by[0]:g}) / ({normalize_by[1]:g} - {normalize_by[0]:g}): reference 0, ceiling 1.", ""]
    text += comparison_lines
    failed = [f for g in groups for f in g.failed]
    if failed:
        text += ["Trials without a result:", ""] + [f"- {f}" for f in failed] + [""]
    text += ["Figures:", ""] + [f"![{p.stem}]({p.name})" for p in written] + [""]
    if skipped:
        text += ["Skipped (no data):", ""] + [f"- {s}" for s in skipped] + [""]
    write_text_atomic(out / "summary.md", "\n".join(text))
    for p in written:
        log(f"wrote {p}")
    for s in skipped:
        log(f"skipped {s}")
    log(f"wrote {out / 'summary.md'}")
    return out, written, skipped


def _report(args: argparse.Namespace) -> int:
    make_report(Path(args.folder), Path(args.out) if args.out else None, compare=tuple(args.compare) if args.compare else None,
                normalize_by=tuple(args.normalize) if args.normalize else None)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="figures and a table from a run or sweep folder",
                       description="PNG figures (return, cost with the limit, multiplier, PL diagnostics, KL to the reference, "
                                   "queries, return vs queries) and summary.md with final metrics as IQM [95% bootstrap CI] and "
                                   "mean ± std over seeds.")
    p.add_argument("folder", help="a run folder (runs/<env>/<agent>/<stamp>) or a sweep folder (runs/sweeps/<name>)")
    p.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    p.add_argument("--compare", nargs=2, metavar=("GROUP_A", "GROUP_B"),
                   help="add the probability that A's final metrics beat B's (group labels as in the table, e.g. agent.lr=1e-3)")
    p.add_argument("--normalize", nargs=2, type=float, metavar=("REF", "CEILING"),
                   help="add the final deterministic return normalized: REF scores 0, CEILING (e.g. PPO on the true reward) 1")
    p.set_defaults(func=_report)
