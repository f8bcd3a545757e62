"""Lagrange multipliers for ``max J_r s.t. J_c <= d``, one small object per rule (docs/design.md, "Constrained RL").

Each rule sees only a cost estimate per step, never an agent (as OmniSafe's ``common/lagrange.py``):
``update(cost) -> lam`` moves the multiplier on ``g_k = cost_k - d``, ``value`` is the multiplier the
dual player holds and ``primal_value`` the one the policy step uses. The MuJoCo Lagrangian layer
(``rl_align.agents.lagrangian``) and the exact bandit lab (``rl_align.games.bandit``) use these classes, so
both floors run the same update. Bottom floor: imports only the standard library.

    PD   lam <- clip(lam + eta g_k)                                    projected gradient ascent
    PID  lam <- clip(Kp g_k + I_k + Kd max(0, J_k - J_{k-1})),         I_k = max(0, I_{k-1} + Ki g_k)
         (Stooke, Achiam & Abbeel 2020; the integral is clamped at 0: anti-windup)
    OPD  lam <- clip(lam + eta (2 g_k - g_{k-1}))                      optimistic dual step
         primal step on the extrapolated multiplier max(0, 2 lam_k - lam_{k-1})   (Li, Ju & Shroff 2026)

``clip`` projects onto ``[0, lam_max]``. OPD with both optimism switches off is exactly PD.
"""

from __future__ import annotations

import math


class PD:
    """Projected gradient ascent on the dual: ``lam <- clip(lam + lr (cost - limit))``."""

    def __init__(self, limit: float, lr: float, lam_init: float = 0.0, lam_max: float = math.inf) -> None:
        self.limit, self.lr, self.lam_max = float(limit), float(lr), float(lam_max)
        self.lam = self._clip(lam_init)
        self.lam_prev = self.lam  # lam_{k-1}: the value before the latest update

    def _clip(self, lam: float) -> float:
        return float(min(max(lam, 0.0), self.lam_max))

    @property
    def value(self) -> float:
        return self.lam

    @property
    def primal_value(self) -> float:
        """The multiplier the policy step uses; PD and PID: the current one."""
        return self.lam

    def step_direction(self, g: float) -> float:
        return g

    def update(self, cost: float) -> float:
        g = float(cost) - self.limit
        self.lam_prev, self.lam = self.lam, self._clip(self.lam + self.lr * self.step_direction(g))
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam, "lam_prev": self.lam_prev}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.lam_prev = float(state["lam"]), float(state["lam_prev"])


class OPD(PD):
    """Optimistic primal-dual: dual step on the prediction ``2 g_k - g_{k-1}`` (the first step has no
    ``g_{k-1}`` and is plain PD); the policy steps on ``max(0, 2 lam_k - lam_{k-1})``, the systematic part
    of the extrapolated Lagrangian gradient. ``primal_optimism`` / ``dual_optimism`` switch each half."""

    def __init__(self, limit: float, lr: float, lam_init: float = 0.0, lam_max: float = math.inf,
                 primal_optimism: bool = True, dual_optimism: bool = True) -> None:
        super().__init__(limit, lr, lam_init, lam_max)
        self.primal_optimism, self.dual_optimism = primal_optimism, dual_optimism
        self.g_prev: float | None = None  # g_{k-1}

    def step_direction(self, g: float) -> float:
        step = 2 * g - self.g_prev if self.dual_optimism and self.g_prev is not None else g  # 2 g_k - g_{k-1}
        self.g_prev = g
        return step

    @property
    def primal_value(self) -> float:
        return max(0.0, 2 * self.lam - self.lam_prev) if self.primal_optimism else self.lam  # max(0, 2 lam_k - lam_{k-1})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "g_prev": self.g_prev}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.g_prev = state["g_prev"]


class PID(PD):
    """PID-Lagrangian (Stooke et al. 2020): ``lam = clip(Kp g + I + Kd max(0, J_k - J_{k-1}))`` with the
    integral ``I <- max(0, I + Ki g)`` clamped at 0 (anti-windup) and started at ``lam_init``."""

    def __init__(self, limit: float, kp: float, ki: float, kd: float, lam_init: float = 0.0, lam_max: float = math.inf) -> None:
        super().__init__(limit, 0.0, lam_init, lam_max)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.integral = float(lam_init)
        self.cost_prev: float | None = None  # J_{k-1} for the derivative term

    def update(self, cost: float) -> float:
        cost = float(cost)
        g = cost - self.limit
        self.integral = max(0.0, self.integral + self.ki * g)  # anti-windup: I never goes below 0
        deriv = max(0.0, cost - self.cost_prev) if self.cost_prev is not None else 0.0
        self.cost_prev = cost
        self.lam_prev, self.lam = self.lam, self._clip(self.kp * g + self.integral + self.kd * deriv)
        return self.lam

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral, "cost_prev": self.cost_prev}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.integral, self.cost_prev = float(state["integral"]), state["cost_prev"]
