"""PL-gap and curvature diagnostics on a quadratic whose Hessian and PL constant are known."""

import numpy as np
import pytest
import torch

from rl_align.diagnostics import DiagnosticsConfig, PLDiagnostics, hessian_extremes


def _quadratic(eigs, seed=0):
    """f(x) = -1/2 (x - x*)^T A (x - x*) with spectrum ``eigs`` (maximized at x*, f* = 0)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
    A = torch.tensor(Q @ np.diag(eigs) @ Q.T, dtype=torch.float32)
    x_star = torch.tensor(rng.normal(size=len(eigs)), dtype=torch.float32)
    x = torch.nn.Parameter(torch.tensor(rng.normal(size=len(eigs)) * 3, dtype=torch.float32))
    f = lambda: -0.5 * (x - x_star) @ A @ (x - x_star)  # noqa: E731
    return f, x


def test_lanczos_recovers_hessian_extremes():
    eigs = [0.3, 1.0, 2.0, 5.0, 7.5, 12.0]
    f, x = _quadratic(eigs)
    lmax, lmin = hessian_extremes(f, [x], iters=6)
    assert lmax == pytest.approx(-0.3, abs=1e-3)  # Hessian is -A
    assert lmin == pytest.approx(-12.0, abs=1e-3)


def test_pl_ratio_recovers_the_pl_constant_along_gradient_ascent():
    """For a strongly concave quadratic the PL ratio ||g||^2 / (2 gap) is >= lambda_min(A), and
    gradient ascent drives it to lambda_min(A) as the iterate aligns with the flattest direction."""
    eigs = [0.5, 1.0, 3.0, 4.0]
    f, x = _quadratic(eigs, seed=1)
    diag = PLDiagnostics(DiagnosticsConfig(f_star=0.0, curvature_every=0))
    ratios = []
    for _ in range(60):
        m = diag.measure(f, [x])
        ratios.append(m["pl/ratio"])
        assert m["pl/gap"] == pytest.approx(-float(f().detach()), rel=1e-5)
        g = torch.autograd.grad(f(), x)[0]
        with torch.no_grad():
            x.add_(0.2 * g)
    assert min(ratios) >= 0.5 - 1e-4
    assert m["pl/ratio_min"] == pytest.approx(0.5, rel=0.02)
    assert ratios[0] > 0.6  # it started away from the constant: the minimum was found, not assumed


def test_best_seen_is_f_star_when_unknown_and_curvature_is_scheduled():
    f, x = _quadratic([1.0, 2.0])
    diag = PLDiagnostics(DiagnosticsConfig(curvature_every=3))
    seen = []
    for _ in range(6):
        m = diag.measure(f, [x])
        seen.append("pl/lambda_max" in m)
        assert m["pl/f_star"] >= m["pl/f"]
        g = torch.autograd.grad(f(), x)[0]
        with torch.no_grad():
            x.add_(0.1 * g)
    assert seen == [True, False, False, True, False, False]
