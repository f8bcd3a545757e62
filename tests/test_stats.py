"""rl_align.stats: IQM, its stratified bootstrap interval, probability of improvement and normalized
scores against hand-counted cases and against scipy.stats."""

import math

import numpy as np
import pytest
from scipy import stats

from rl_align.stats import fmt, iqm, iqm_ci, normalize, prob_improvement, prob_improvement_ci, summarize


def test_iqm_is_the_mean_of_the_middle_half():
    # 8 scores: the 2 lowest and 2 highest are dropped, the outlier 100 with them: mean(3, 4, 5, 6) = 4.5
    assert iqm([7, 1, 100, 3, 5, 2, 6, 4]) == pytest.approx(4.5)
    x = np.random.default_rng(1).normal(size=(9, 4))
    assert iqm(x) == pytest.approx(stats.trim_mean(x.ravel(), 0.25))  # flattened over runs and tasks
    assert iqm([1.0, 2.0, 30.0]) == pytest.approx(11.0)  # n = 3 trims nothing (int(0.75) = 0): IQM = mean


def test_bootstrap_interval_contains_the_iqm_stays_in_the_data_and_shrinks_with_more_runs():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 2, size=8), rng.normal(10, 2, size=400)
    for x in (small, large):
        lo, hi = iqm_ci(x)
        assert x.min() <= lo < iqm(x) < hi <= x.max()
    assert np.subtract(*iqm_ci(large)[::-1]) < 0.4 * np.subtract(*iqm_ci(small)[::-1])
    lo, hi = iqm_ci(large)
    assert lo < 10 < hi  # the IQM of a normal distribution is its mean
    assert iqm_ci(small, seed=3) == iqm_ci(small, seed=3)  # seeded: a table prints the same numbers twice


def test_three_runs_give_a_coarse_interval_no_t_multiplier():
    # Percentile bootstrap of 3 runs: resamples of {1, 2, 3}; the 95% interval is about the data's range
    # (a t-interval would be 2 +- 4.30 * 1 / sqrt(3) = [-0.48, 4.48], outside the data)
    lo, hi = iqm_ci([1.0, 2.0, 3.0])
    assert 1.0 <= lo <= 1.34 and 2.66 <= hi <= 3.0


def test_one_run_has_no_interval_and_constant_runs_a_point():
    assert all(math.isnan(v) for v in iqm_ci([5.0]))
    assert iqm_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)


def test_stratified_bootstrap_resamples_runs_within_each_task():
    # Two tasks on very different scales, little spread inside each: resampling within a task keeps
    # 4 scores of each task in every resample, so the IQM moves little; pooling the runs would not.
    m = np.array([[0.0, 100.0], [0.1, 100.1], [0.2, 100.2], [0.3, 100.3]])
    lo, hi = iqm_ci(m)
    assert lo <= iqm(m) <= hi and hi - lo < 0.5
    pooled = iqm_ci(m.ravel())
    assert pooled[1] - pooled[0] > 20


def test_probability_of_improvement_by_its_definition():
    assert prob_improvement([3, 4, 5], [0, 1, 2]) == 1.0
    assert prob_improvement([0, 1, 2], [3, 4, 5]) == 0.0
    assert prob_improvement([1, 2, 3], [1, 2, 3]) == 0.5
    # hand count, x = (1, 4, 6) vs y = (2, 4): 1 beats none; 4 beats 2, ties 4 (1.5); 6 beats both (2) -> 3.5 / 6
    assert prob_improvement([1, 4, 6], [2, 4]) == pytest.approx(3.5 / 6)
    # two tasks: the mean of the per-task probabilities (3.5 / 6 and 1)
    x, y = np.array([[1, 10], [4, 11], [6, 12]]), np.array([[2, 0], [4, 1]])
    assert prob_improvement(x, y) == pytest.approx((3.5 / 6 + 1) / 2)
    with pytest.raises(ValueError, match="same tasks"):
        prob_improvement(np.zeros((3, 2)), np.zeros((3, 1)))


def test_probability_of_improvement_interval():
    lo, hi = prob_improvement_ci([3, 4, 5], [0, 1, 2])
    assert lo == hi == 1.0  # every resample keeps x above y
    lo, hi = prob_improvement_ci([1, 4, 6], [2, 4])
    assert 0.0 <= lo < 3.5 / 6 < hi <= 1.0
    assert all(math.isnan(v) for v in prob_improvement_ci([1.0], [0.0, 2.0]))


def test_normalize_reference_is_zero_and_ceiling_one():
    assert normalize(412, 100, 600) == pytest.approx(0.624)
    assert normalize(100, 100, 600) == 0.0 and normalize(600, 100, 600) == 1.0
    out = normalize([50, 300], [0, 100], [100, 500])  # per-seed reference and ceiling
    assert np.allclose(out, [0.5, 0.5])


def test_summary_and_its_format():
    s = summarize([1.0, 2.0, 3.0, float("nan")])  # non-finite runs dropped
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0 and s["iqm"] == 2.0 and s["ci_lo"] <= 2.0 <= s["ci_hi"]
    assert fmt({"n": 5, "mean": 405.2, "std": 88.4, "iqm": 412.0, "ci_lo": 301.0, "ci_hi": 520.3}) == "IQM 412 [301, 520] · mean 405 ± 88 (n=5)"
    assert fmt(summarize([0.25]), 2) == "0.25 (n=1)" and fmt(summarize([])) == "–"
