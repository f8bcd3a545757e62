"""COMAL: the prox-point meta-algorithm around a KL-regularized inner solver (DESIGN.md, "COMAL").

Outer loop ``t = 1..T`` (COMAL Algorithm 1): starting from ``pi_ref^t``, run ``K_t`` inner updates that
approximately solve the regularized game

    J_tau(pi1, pi2, pi_ref) = P(pi1 > pi2) - tau KL(pi1 || pi_ref) + tau KL(pi2 || pi_ref),

then move the reference: ``pi_ref^{t+1} <- pi^{t+1}``. ``tau = revkl_coef``. Inner solvers (``inner``):

* ``sail-revkl``: the SAIL-RevKL update of :mod:`rl_align.agents.sail` with ``revkl_coef = tau``.
* ``inpo``: the INPO-style regression of COMAL's Algorithm 3 on pairs of segments sampled from the
  current iterate ``mu_k`` (the behaviour policy of the batch), with trajectory log-likelihood ratios
  (dynamics cancel):

      L(theta) = E_{s, s' ~ mu_k} [ ( log pi_theta(s)/pi_theta(s') - (1 - eta tau) log mu_k(s)/mu_k(s')
                                      - eta tau log pi_ref(s)/pi_ref(s') - eta (w(s) - w(s')) )^2 ]

  whose minimizer is the mirror-descent step ``mu_{k+1} ~ mu_k^{1 - eta tau} pi_ref^{eta tau}
  exp(eta P(. > mu_k))``; ``w(s)``, the win rate of segment ``s`` against ``mu_k``, is estimated by the
  share of its labelled comparisons it won within the batch (all pairs of the rollout by default).

Reference reset ("outer step"): every ``inner_updates`` updates (fixed schedule), and/or when the inner
objective plateaus: with ``f_k`` the inner objective at the start of update ``k`` on its fresh batch
(SAIL-RevKL: ``dpo - tau KL``; INPO: ``-L`` at ``theta = mu_k``, which is 0 at the regularized game's
solution up to label noise), reset when at least ``2 W`` updates have passed since the last reset and
``mean(f over the last W) - mean(f over the W before) < plateau_tol`` (``W = plateau_window``). With
both switched off (``inner_updates = 0``, ``plateau_window = 0``) COMAL is exactly its inner solver.
The win rate reported by evaluation is against the *initial* reference (the SFT policy), kept frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from rl_align.agents import register
from rl_align.agents.sail import SAIL, SAILConfig
from rl_align.errors import UserError

INNER = ("sail-revkl", "inpo")


@dataclass
class COMALConfig(SAILConfig):
    inner: str = "sail-revkl"  # sail-revkl | inpo: the regularized inner solver (tau = revkl_coef)
    eta: float = 1.0  # INPO step size eta (the target moves log-ratios by at most eta per update)
    inner_updates: int = 10  # K: reset pi_ref <- pi every K updates (0: no scheduled reset)
    plateau_window: int = 0  # W: also reset when the inner objective plateaus over 2 W updates (0: off)
    plateau_tol: float = 0.01  # minimum gain of mean f between consecutive windows that counts as progress

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner not in INNER:
            raise UserError(f"agent.inner must be one of {', '.join(INNER)}, got {self.inner!r}")
        if self.eta <= 0:
            raise UserError(f"agent.eta must be > 0, got {self.eta}")
        if self.inner == "inpo" and self.eta * self.revkl_coef > 1:
            raise UserError(f"agent.eta * agent.revkl_coef = {self.eta * self.revkl_coef:g} must be <= 1 (weight of mu_k is 1 - eta tau)")
        if self.inner == "inpo" and self.replay > 0:
            raise UserError("agent.replay must be 0 with agent.inner=inpo (its regression needs each pair's behaviour log-probs, fresh only)")
        if self.inner_updates < 0 or self.plateau_window < 0:
            raise UserError("agent.inner_updates and agent.plateau_window must be >= 0 (0 switches that reset off)")


def segment_win_rates(i: torch.Tensor, j: torch.Tensor, pref1: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Win rate of each segment against the batch ``[M]``: wins / comparisons over the labelled pairs
    ``(i, j)`` (``pref1 = 1`` where ``i`` won); 1/2 for a segment never compared."""
    wins = torch.zeros(n_segments, device=pref1.device).index_add_(0, i, pref1).index_add_(0, j, 1 - pref1)
    games = torch.zeros(n_segments, device=pref1.device).index_add_(0, i, torch.ones_like(pref1)).index_add_(0, j, torch.ones_like(pref1))
    return torch.where(games > 0, wins / games.clamp(min=1), torch.full_like(wins, 0.5))


def inpo_loss(logp_i: torch.Tensor, logp_j: torch.Tensor, old_i: torch.Tensor, old_j: torch.Tensor, ref_i: torch.Tensor,
              ref_j: torch.Tensor, win_i: torch.Tensor, win_j: torch.Tensor, eta: float, tau: float) -> torch.Tensor:
    """COMAL Algorithm 3 regression on ``P`` segment pairs; per-step log-probs ``[P, H]`` under pi_theta,
    mu_k (behaviour) and pi_ref; ``win_* [P]`` the estimated win rates against mu_k. Returns the mean loss."""
    ratio = (logp_i - old_i).sum(-1) - (logp_j - old_j).sum(-1)  # log pi/mu_k (s) - log pi/mu_k (s')
    ref_pull = eta * tau * ((ref_i - old_i).sum(-1) - (ref_j - old_j).sum(-1))  # eta tau log pi_ref/mu_k, differenced
    return ((ratio - ref_pull - eta * (win_i - win_j)) ** 2).mean()  # (log-ratio - MD target)^2


@register("comal")
class COMAL(SAIL):
    config_cls = COMALConfig
    config: COMALConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_ref_policy = copy.deepcopy(self.ref_policy)  # pi_ref^1, kept for evaluation
        self.resets = 0
        self.inner_step = 0  # updates since the last reset
        self.inner_values: list[float] = []  # f_k since the last reset

    def modules(self) -> dict:
        return {**super().modules(), "init_ref_policy": self.init_ref_policy}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "comal": {"resets": self.resets, "inner_step": self.inner_step, "inner_values": list(self.inner_values)}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        s = state["comal"]
        self.resets, self.inner_step, self.inner_values = int(s["resets"]), int(s["inner_step"]), [float(v) for v in s["inner_values"]]

    def prepare(self, start: dict | None, source: str = "") -> None:
        super().prepare(start, source)
        self.init_ref_policy.load_state_dict(self.ref_policy.state_dict())

    # ---- the inner solver -------------------------------------------------------------------------
    def _batch(self) -> dict | None:
        """SAIL's labelled batch plus each segment's win rate against mu_k, and ``f_k`` at theta = mu_k."""
        b = super()._batch()
        if b is None:
            return None
        b["win"] = segment_win_rates(b["i"], b["j"], b["pref1"], len(b["obs"]))
        with torch.no_grad():
            self._f = float(self.objective(self.objective_terms(b, torch.arange(len(b["pref1"]), device=self.device))))
        return b

    def objective_terms(self, b: dict, idx: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
        terms = super().objective_terms(b, idx, policy)
        if self.config.inner == "inpo":
            i, j, logp = b["i"][idx], b["j"][idx], terms["logp"]  # SAIL's per-step log-probs, computed once
            terms["inpo"] = inpo_loss(logp[i], logp[j], b["old_logp"][i], b["old_logp"][j], b["ref_logp"][i], b["ref_logp"][j],
                                      b["win"][i], b["win"][j], self.config.eta, self.config.revkl_coef)
        return terms

    def objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inner objective to maximize: SAIL-RevKL's ``J`` with ``revkl_coef = tau``, or ``-L_INPO``."""
        return -terms["inpo"] if self.config.inner == "inpo" else super().objective(terms)

    # ---- the outer step ---------------------------------------------------------------------------
    def reset_reference(self) -> None:
        """``pi_ref <- pi``: copy the policy's parameters into the reference; nothing else changes."""
        self.ref_policy.load_state_dict(self.policy.state_dict())
        self.store.clear()  # stored pairs' pi_ref log-probs belong to the old prox centre
        self.resets += 1
        self.inner_step, self.inner_values = 0, []

    def plateaued(self) -> bool:
        """Mean ``f`` over the last ``W`` inner updates gained less than ``plateau_tol`` on the ``W`` before."""
        W, f = self.config.plateau_window, self.inner_values
        return W > 0 and len(f) >= 2 * W and np.mean(f[-W:]) - np.mean(f[-2 * W:-W]) < self.config.plateau_tol

    def update(self, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        c = self.config
        self._f = float("nan")
        metrics = super().update(episodes)
        self.inner_step += 1
        if np.isfinite(self._f):
            self.inner_values.append(self._f)
        scheduled = c.inner_updates > 0 and self.inner_step >= c.inner_updates
        plateau = self.plateaued()
        metrics.update({"comal/inner_objective": self._f, "comal/inner_step": float(self.inner_step)})
        if scheduled or plateau:
            self.reset_reference()
            metrics["comal/plateau_reset"] = float(plateau and not scheduled)
        metrics["comal/resets"] = float(self.resets)
        return metrics

    # ---- evaluation -------------------------------------------------------------------------------
    def reference(self) -> torch.nn.Module:
        """Evaluation measures against the initial reference pi_ref^1 (the moving one is only the prox centre)."""
        return self.init_ref_policy
