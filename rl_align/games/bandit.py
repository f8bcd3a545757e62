"""Constrained bandits, the OPD paper's synthetic experiment: ``K`` arms with reward vector ``r`` and
cost vector ``c``, a distributional policy ``pi`` and a budget ``d``:

    max_pi  pi . r   s.t.  pi . c <= d,      L(pi, lam) = pi . r - lam (pi . c - d)

Standard primal-dual: MWU on the primal gradient ``g_t = r - lam_t c`` and projected gradient ascent on
the dual gradient ``h_t = pi_t . c - d``. OPD: both players step on the prediction ``2 g_t - g_{t-1}``
(resp. ``2 h_t - h_{t-1}``); either half can be switched off. Since ``r`` is fixed,
``2 g_t - g_{t-1} = r - (2 lam_t - lam_{t-1}) c``: the primal prediction is the extrapolated multiplier,
projected at 0 as in the MuJoCo agents. The multiplier is the same ``rl_align.multipliers`` object the
MuJoCo Lagrangian layer uses (``PD`` / ``OPD``), fed the exact cost ``pi_t . c``. The lab solves the LP
for the optimum.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from rl_align.errors import UserError
from rl_align.games.matrix import _mwu
from rl_align.multipliers import OPD, PD

# An instance where standard PD keeps cycling: two arms matter, the optimum mixes them on the budget line.
DEFAULT_REWARDS = [1.0, 0.6, 0.2, 0.9]
DEFAULT_COSTS = [1.0, 0.3, 0.0, 0.9]
DEFAULT_BUDGET = 0.5


def lp_optimum(r: np.ndarray, c: np.ndarray, d: float) -> np.ndarray:
    """The optimal policy of ``max pi.r s.t. pi.c <= d``, pi on the simplex (HiGHS LP)."""
    n = len(r)
    res = linprog(-r, A_ub=c[None], b_ub=[d], A_eq=np.ones((1, n)), b_eq=[1.0], bounds=[(0, None)] * n, method="highs")
    if not res.success:
        raise UserError(f"no policy meets the budget d={d} (the cheapest arm costs {c.min():g}); raise d to at least min(c)")
    return res.x


def primal_dual(r, c, d, eta: float = 0.1, eta_dual: float | None = None, iters: int = 20_000, primal_optimism: bool = False,
                dual_optimism: bool = False, start: np.ndarray | None = None, lam0: float = 0.0) -> dict:
    """Run PD (both switches off) or OPD (both on); returns iterates ``pi [iters+1, K]``, ``lam``, the
    distance ``||pi_t - pi*||_1`` to the LP optimum and the violation ``max(0, pi_t . c - d)``."""
    r, c = np.asarray(r, float), np.asarray(c, float)
    if r.shape != c.shape or r.ndim != 1 or len(r) < 2:
        raise UserError("rewards and costs must be vectors of the same length >= 2")
    if eta <= 0 or (eta_dual is not None and eta_dual <= 0):
        raise UserError(f"step sizes must be > 0, got eta={eta}, eta_dual={eta_dual}")
    if iters < 1:
        raise UserError(f"iters must be >= 1, got {iters}")
    star = lp_optimum(r, c, d)  # validates the budget before any iteration
    eta_dual = eta if eta_dual is None else eta_dual
    pi = np.full(len(r), 1 / len(r)) if start is None else np.asarray(start, float)
    mult = (OPD(d, eta_dual, lam_init=lam0, primal_optimism=primal_optimism, dual_optimism=dual_optimism)
            if primal_optimism or dual_optimism else PD(d, eta_dual, lam_init=lam0))
    pis, lams = [pi], [mult.value]
    for _ in range(iters):
        lam_p = mult.primal_value  # lam_t, or max(0, 2 lam_t - lam_{t-1}) with primal optimism
        mult.update(pi @ c)  # dual step on h_t = pi_t . c - d (or 2 h_t - h_{t-1})
        pi = _mwu(pi, r - lam_p * c, eta)  # primal MWU step on g_t = r - lam c
        pis.append(pi)
        lams.append(mult.value)
    pis = np.asarray(pis)
    return {"iterates": pis, "lam": np.asarray(lams), "optimum": star, "distance": np.abs(pis - star).sum(1),
            "violation": np.maximum(pis @ c - d, 0.0)}
