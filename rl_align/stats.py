"""Statistics over seeds that hold at few seeds (rliable: Agarwal et al. 2021, "Deep RL at the Edge of
the Statistical Precipice"): the interquartile mean (IQM) with a stratified bootstrap 95% interval,
mean ± std beside it, the probability of improvement of method X over Y, and normalized scores
(reference = 0, PPO on the true reward from it = 1) to aggregate across tasks.

Scores are a 1-D array over runs (seeds) of one task, or a ``[runs, tasks]`` matrix. The bootstrap is
``scipy.stats.bootstrap`` with ``method='percentile'`` (rliable's default). Stratification: each task's
column is passed to scipy as a *separate sample*; scipy resamples every sample independently with
replacement (``paired=False``), i.e. runs are resampled within each task, and the statistic sees the
resampled columns together. That is rliable's ``StratifiedBootstrap``. No t-interval anywhere: at
n <= 3 its multiplier (12.7 at n = 2, 4.3 at n = 3) says more about the formula than the runs.

At n = 1 there is no interval: ``iqm_ci`` returns ``(nan, nan)``. At n = 2-3 the percentile interval is
coarse: resamples can only take a handful of distinct values, so it spans roughly the observed range.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
REPS = 2000


def _matrix(x) -> np.ndarray:
    """Scores as ``[runs, tasks]`` (a 1-D array is one task)."""
    a = np.asarray(x, dtype=float)
    if a.ndim == 0:
        a = a.reshape(1)
    return a[:, None] if a.ndim == 1 else a.reshape(a.shape[0], -1)


def iqm(x) -> float:
    """Interquartile mean of all scores: the mean of the middle 50% (``trim_mean(x, 0.25)`` flattened)."""
    a = np.asarray(x, dtype=float).ravel()
    return float(stats.trim_mean(a, 0.25)) if a.size else math.nan


def _bootstrap(samples: list[np.ndarray], statistic, confidence: float, reps: int, seed: int) -> tuple[float, float]:
    """Percentile interval of ``statistic(*samples, axis=-1)`` resampling each sample independently."""
    if all(np.ptp(s) == 0 for s in samples):  # every resample is the data itself: the interval is a point
        v = float(statistic(*[s[None] for s in samples], axis=-1)[0])
        return v, v
    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    res = stats.bootstrap(samples, statistic, n_resamples=reps, vectorized=True, paired=False, axis=-1,
                          confidence_level=confidence, method="percentile", **{key: np.random.default_rng(seed)})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _iqm_of_columns(*cols: np.ndarray, axis: int = -1) -> np.ndarray:
    return stats.trim_mean(np.concatenate(cols, axis=axis), 0.25, axis=axis)


def iqm_ci(x, confidence: float = CONFIDENCE, reps: int = REPS, seed: int = 0) -> tuple[float, float]:
    """Stratified bootstrap interval of the IQM over runs (runs resampled within each task of a
    ``[runs, tasks]`` matrix); ``(nan, nan)`` with fewer than 2 runs."""
    m = _matrix(x)
    if m.shape[0] < 2:
        return math.nan, math.nan
    return _bootstrap([m[:, t] for t in range(m.shape[1])], _iqm_of_columns, confidence, reps, seed)


def iqm_band(ys, confidence: float = CONFIDENCE, reps: int = REPS, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Curves over seeds: ``ys`` is ``[runs, points]``; returns the IQM at each point and the bootstrap
    interval's low and high edges (one scipy call, runs resampled at every point; None with one run)."""
    ys = np.asarray(ys, dtype=float)
    center = stats.trim_mean(ys, 0.25, axis=0)
    if ys.shape[0] < 2:
        return center, None, None
    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    res = stats.bootstrap((ys.T,), lambda s, axis: stats.trim_mean(s, 0.25, axis=axis), n_resamples=reps, vectorized=True,
                          axis=-1, confidence_level=confidence, method="percentile", **{key: np.random.default_rng(seed)})
    return center, np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


def _u_share(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of pairs (x_i, y_j) with x_i > y_j, ties counting 1/2 (Mann-Whitney U / (n m)), along the last axis."""
    gt = (x[..., :, None] > y[..., None, :]).mean(axis=(-2, -1))
    eq = (x[..., :, None] == y[..., None, :]).mean(axis=(-2, -1))
    return gt + 0.5 * eq


def prob_improvement(x, y) -> float:
    """P(X > Y): over tasks, the mean of the Mann-Whitney U statistic of X's runs against Y's runs
    divided by n m (rliable's definition; ties count 1/2). ``x``: ``[n, tasks]``, ``y``: ``[m, tasks]``."""
    a, b = _matrix(x), _matrix(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x has {a.shape[1]} tasks and y {b.shape[1]}: probability of improvement compares the same tasks")
    per_task = [stats.mannwhitneyu(a[:, t], b[:, t], alternative="greater").statistic / (len(a) * len(b)) for t in range(a.shape[1])]
    return float(np.mean(per_task))


def prob_improvement_ci(x, y, confidence: float = CONFIDENCE, reps: int = REPS, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of ``prob_improvement``: X's and Y's runs resampled independently within each
    task (rliable's ``StratifiedIndependentBootstrap``); ``(nan, nan)`` when either has fewer than 2 runs."""
    a, b = _matrix(x), _matrix(y)
    if min(len(a), len(b)) < 2:
        return math.nan, math.nan
    k = a.shape[1]

    def statistic(*cols, axis=-1):
        return np.mean([_u_share(cols[t], cols[k + t]) for t in range(k)], axis=0)

    return _bootstrap([a[:, t] for t in range(k)] + [b[:, t] for t in range(k)], statistic, confidence, reps, seed)


def normalize(score, ref, ceiling):
    """``(score - ref) / (ceiling - ref)``: the reference scores 0, the ceiling (PPO on the true reward
    from the same reference) 1. Broadcasts (per-seed references and ceilings)."""
    score, ref, ceiling = (np.asarray(v, dtype=float) for v in (score, ref, ceiling))
    out = (score - ref) / (ceiling - ref)
    return float(out) if out.ndim == 0 else out


def summarize(x, confidence: float = CONFIDENCE, reps: int = REPS, seed: int = 0) -> dict:
    """``n, mean, std (sample, ddof 1; nan at n = 1), iqm, ci_lo, ci_hi`` of the finite scores of ``x``
    (1-D over runs or ``[runs, tasks]``; a matrix with a non-finite entry drops that run)."""
    m = _matrix(x) if np.size(x) else np.empty((0, 1))
    m = m[np.isfinite(m).all(axis=1)]
    flat = m.ravel()
    lo, hi = iqm_ci(m, confidence, reps, seed) if len(m) else (math.nan, math.nan)
    return {"n": int(len(m)), "mean": float(flat.mean()) if flat.size else math.nan,
            "std": float(flat.std(ddof=1)) if flat.size > 1 else math.nan,
            "iqm": iqm(flat), "ci_lo": lo, "ci_hi": hi}


def _num(v: float, digits: int) -> str:
    return "nan" if not math.isfinite(v) else f"{v:,.{digits}f}"


def fmt(summary: dict, digits: int = 0) -> str:
    """``"IQM 412 [301, 520] · mean 405 ± 88 (n=5)"``; one run: ``"412 (n=1)"``; none: ``"–"``."""
    n = summary["n"]
    if n == 0:
        return "–"
    if n == 1:
        return f"{_num(summary['mean'], digits)} (n=1)"
    return (f"IQM {_num(summary['iqm'], digits)} [{_num(summary['ci_lo'], digits)}, {_num(summary['ci_hi'], digits)}]"
            f" · mean {_num(summary['mean'], digits)} ± {_num(summary['std'], digits)} (n={n})")
