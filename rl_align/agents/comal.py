"""COMAL: the prox-point meta-algorithm around a KL-regularized inner solver (docs/design.md, "COMAL and INPO").

Outer loop ``t = 1..T`` (COMAL Algorithm 1): starting from ``pi_ref^t``, run inner updates that
approximately solve the regularized game

    J_tau(pi1, pi2, pi_ref) = P(pi1 > pi2) - tau KL(pi1 || pi_ref) + tau KL(pi2 || pi_ref),

then move the reference: ``pi_ref^{t+1} <- pi^{t+1}``. ``tau = revkl_coef``, per segment-summed KL (the
units of SAIL-RevKL's lambda and of the trajectory log-ratios below). ``algo: comal`` is the SAIL agent
(its loop: collect, label, minibatch epochs, diagnostics) with two components that ``COMALConfig`` builds,
so "resets off == the inner solver" holds by construction:

* the inner objective (``inner``): :class:`INPOObjective`, COMAL's Algorithm 3 (INPO), the prox solver for a
  general preference (the default), or :class:`SAILRevKLInner`, the SAIL-RevKL objective with
  ``revkl_coef = tau`` (a Bradley-Terry likelihood: not the prox step of a cyclic preference; kept as an
  option and for comparison);
* the reference schedule, :class:`ReferenceSchedule`: reset when the inner solver has converged to a
  tolerance (the plateau rule), ``inner_updates`` being a guard on the inner updates per outer step.
  The statistic it watches is the iterate's distance from the prox centre, ``KL(mu_k || pi_ref^t)`` per
  state on the rollout (``train/kl_ref``): the mirror-descent iterates of the regularized game converge
  to its solution, which lies at a fixed distance from the centre, so the KL rises after a reset and
  then stops changing. (The inner objective itself, logged as ``comal/inner_objective``, cannot tell on
  HalfCheetah: INPO's relative residual ``-L/L_0`` was -1.09 +- 0.23 over updates 2-20 at tau 0.05, no
  trend, while the KL saturated after ~10 updates; single 50-step log-ratios are dominated by action
  noise. benchmarks/results_comal.md.) So a reset means "the inner solver stopped moving", the
  stationarity of the regularized iteration, not a measured equilibrium. Every reset is logged
  (``comal/reset``, ``comal/reset_plateau``, ``comal/outer_updates``).

With both resets off (``inner_updates = 0``, ``plateau_window = 0``) COMAL is exactly its inner solver.
Evaluation reports the win rate and KL against the *initial* reference (``eval/win_rate_vs_ref``,
``eval/kl_to_ref``: the same meaning as for every fixed-reference agent) and the KL to the current
prox centre (``eval/kl_to_current_ref``), so plain drift and prox-point progress can be told apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from rl_align.agents import register
from rl_align.agents.preferences import PreferenceBatch, batch_logp, pair_accuracy
from rl_align.agents.sail import SAIL, SAILConfig
from rl_align.agents.sail_objective import SAILCoefficients, SAILObjective, Terms, dpo_term, implicit_reward
from rl_align.diagnostics import flat_grad
from rl_align.errors import UserError

INNER = ("inpo", "sail-revkl")


@dataclass
class COMALConfig(SAILConfig):
    inner: str = "inpo"  # inpo (Algorithm 3, prox solver for general preferences) | sail-revkl (revkl_coef = tau)
    eta: float = 10.0  # INPO step size eta (eta * tau <= 1: the weight of mu_k is 1 - eta tau)
    inner_updates: int = 20  # guard: at most this many inner updates per outer step (0: no guard)
    plateau_window: int = 3  # W: reset when KL(mu_k || pi_ref^t) stopped growing over 2 W updates (0: off)
    plateau_tol: float = 0.05  # minimum relative growth of the mean KL to pi_ref^t between consecutive windows

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
        if self.inner_updates < 0 or self.plateau_window < 0 or self.plateau_tol < 0:
            raise UserError("agent.inner_updates, agent.plateau_window and agent.plateau_tol must be >= 0 (0 switches that reset off)")

    def make_objective(self) -> "INPOObjective | SAILRevKLInner":
        if self.inner == "inpo":
            return INPOObjective(INPOCoefficients(beta=self.beta, eta=self.eta, tau=self.revkl_coef))
        return SAILRevKLInner(SAILCoefficients.of(self))

    def make_schedule(self, agent) -> "ReferenceSchedule":
        return ReferenceSchedule(self.plateau_window, self.plateau_tol, self.inner_updates, initial=agent.ref_policy)


# ---- the reference schedule ---------------------------------------------------------------------------
class ReferenceSchedule:
    """When COMAL's outer step happens, and the step itself. ``f_k`` is a statistic of inner update ``k``
    that rises while the inner solver makes progress (COMAL feeds ``KL(mu_k || pi_ref^t)``). The inner game
    counts as solved when ``mean(f over the last W) - mean(f over the W before) < tol * |mean(f over the W
    before)|`` (a relative plateau, at least ``2 W`` values since the last reset); ``max_updates`` inner
    updates force the step (a guard). As the agent's component it also keeps ``pi_ref^1`` (``initial``),
    the reference evaluation measures against, and has its own state."""

    def __init__(self, window: int, tol: float, max_updates: int, initial: torch.nn.Module | None = None) -> None:
        self.window, self.tol, self.max_updates = window, tol, max_updates
        self.initial = copy.deepcopy(initial) if initial is not None else None  # pi_ref^1
        self.values: list[float] = []  # f_k since the last reset
        self.steps = 0  # inner updates since the last reset
        self.resets = 0

    # ---- as the agent's component ---------------------------------------------------------------------
    def modules(self) -> dict:
        return {"init_ref_policy": self.initial}

    def prepare(self, agent) -> None:
        self.initial.load_state_dict(agent.ref_policy.state_dict())

    def reference(self) -> torch.nn.Module:
        return self.initial

    def reset_reference(self, agent) -> None:
        """``pi_ref <- pi``: copy the policy's parameters into the reference; nothing else changes."""
        agent.ref_policy.load_state_dict(agent.policy.state_dict())
        agent.store.clear()  # stored pairs' pi_ref log-probs belong to the old prox centre
        self.reset()

    def after_update(self, agent, metrics: dict[str, float], f: float) -> dict[str, float]:
        """One inner update done (``f``: the inner loss's statistic, logged): step, and reset when solved."""
        reason = self.step(metrics.get("train/kl_ref", float("nan")))  # nan: a skipped batch
        out = {"comal/inner_objective": f} if np.isfinite(f) else {}
        out.update({"comal/inner_step": float(self.steps), "comal/reset": float(reason is not None)})
        if reason is not None:
            out.update({"comal/reset_plateau": float(reason == "plateau"), "comal/outer_updates": float(self.steps)})
            self.reset_reference(agent)
        out["comal/resets"] = float(self.resets)
        return out

    # ---- the rule -------------------------------------------------------------------------------------
    def plateaued(self) -> bool:
        W, f = self.window, self.values
        if W == 0 or len(f) < 2 * W:
            return False
        before, last = float(np.mean(f[-2 * W:-W])), float(np.mean(f[-W:]))
        return last - before < self.tol * abs(before)

    def step(self, f: float) -> str | None:
        """Record one inner update (``f`` may be nan for a skipped batch); ``"plateau"``, ``"guard"`` or None."""
        self.steps += 1
        if np.isfinite(f):
            self.values.append(float(f))
        if self.plateaued():
            return "plateau"
        if self.max_updates > 0 and self.steps >= self.max_updates:
            return "guard"
        return None

    def reset(self) -> None:
        self.resets += 1
        self.steps, self.values = 0, []

    def state_dict(self) -> dict:
        return {"resets": self.resets, "steps": self.steps, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        if "inner_step" in state:  # a checkpoint written before the schedule was a component (same quantities)
            state = {"resets": state["resets"], "steps": state["inner_step"], "values": state["inner_values"]}
        self.resets, self.steps, self.values = int(state["resets"]), int(state["steps"]), [float(v) for v in state["values"]]


# ---- the inner losses ---------------------------------------------------------------------------------
def segment_win_rates(i: torch.Tensor, j: torch.Tensor, pref1: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Win rate of each segment against the batch ``[M]``: wins / comparisons over the labelled pairs
    ``(i, j)`` (``pref1 = 1`` where ``i`` won); 1/2 for a segment never compared."""
    wins = torch.zeros(n_segments, device=pref1.device).index_add_(0, i, pref1).index_add_(0, j, 1 - pref1)
    games = torch.zeros(n_segments, device=pref1.device).index_add_(0, i, torch.ones_like(pref1)).index_add_(0, j, torch.ones_like(pref1))
    return torch.where(games > 0, wins / games.clamp(min=1), torch.full_like(wins, 0.5))


def inpo_loss(logp_i: torch.Tensor, logp_j: torch.Tensor, old_i: torch.Tensor, old_j: torch.Tensor, ref_i: torch.Tensor,
              ref_j: torch.Tensor, win_i: torch.Tensor, win_j: torch.Tensor, eta: float, tau: float) -> torch.Tensor:
    """COMAL Algorithm 3 (INPO) on ``P`` segment pairs sampled from ``mu_k``; per-step log-probs ``[P, H]``
    under pi_theta, mu_k (behaviour) and pi_ref, win rates ``[P]`` against mu_k. Returns the mean of

        ( log pi/mu_k (s) - log pi/mu_k (s') - eta tau log pi_ref/mu_k (s, s' differenced) - eta (w(s) - w(s')) )^2,

    whose minimizer over pi is the mirror-descent step ``mu_{k+1} ~ mu_k^{1 - eta tau} pi_ref^{eta tau}
    exp(eta P(. > mu_k))`` (Algorithm 2; dynamics cancel in every trajectory ratio).

    The paper's form regresses each labelled pair on the constant ``eta / 2``:
    ``sum_(s,s') (x(s, s') - eta (I(s > s') - 1/2))^2`` with ``x`` the same log-ratio difference minus the
    ``tau`` pull. Write ``x = f(s) - f(s')`` on the pair graph E (Laplacian ``Lap``, degrees ``d``): that
    loss is ``f^T Lap f - 2 eta f^T b + c`` with ``b_s = sum_{s' ~ s} (I(s > s') - 1/2) = d_s (w(s) - 1/2)``;
    this one is ``f^T Lap f - 2 eta f^T Lap w + c'``. On the complete graph of a rollout's M segments (every
    pair labelled, the default ``pairs_per_batch: null``) ``Lap w = M (w - 1/2)`` and ``d_s = M - 1``, so
    the two differ by a constant once eta is scaled by ``(M - 1) / M`` (0.975 at M = 40): the same
    gradient in theta (tests/test_comal.py checks it). With ties or skipped queries dropped the graph is
    not complete and the two are close, not equal. This form is kept because its value at ``theta = mu_k``
    is the squared length of the mirror-descent step the batch asks for, 0 at the regularized game's
    solution up to the noise of ``w`` (logged, relative to its value at a reset, as ``comal/inner_objective``).
    """
    ratio = (logp_i - old_i).sum(-1) - (logp_j - old_j).sum(-1)  # log pi/mu_k (s) - log pi/mu_k (s')
    ref_pull = eta * tau * ((ref_i - old_i).sum(-1) - (ref_j - old_j).sum(-1))  # eta tau log pi_ref/mu_k, differenced
    return ((ratio - ref_pull - eta * (win_i - win_j)) ** 2).mean()  # (log-ratio - MD target)^2


@dataclass(frozen=True)
class INPOCoefficients:
    """INPO's step size ``eta`` and regularization ``tau`` (``agent.revkl_coef``); ``beta`` scales only the
    logged implicit reward ``h`` (the held-out accuracy diagnostic)."""

    beta: float = 0.1
    eta: float = 10.0
    tau: float = 0.05


def inpo_terms(policy, b: PreferenceBatch, coef: INPOCoefficients, idx: torch.Tensor) -> Terms:
    """INPO's terms on the pairs ``idx`` of ``b`` (with its win rates ``b.win``): ``inpo`` (the regression
    loss, to minimize), and, for the logs, ``dpo`` / ``logsig`` / ``h`` of the implicit reward, per-step
    ``logp`` and ``revkl``, the sampled segment ``KL(mu_k || pi_ref)`` of the fresh segments (free from the
    batch: ``sum_t log mu_k/pi_ref``). One policy forward over the segments; the reference enters only
    through ``b.ref_logp``."""
    i, j, pref1 = b.i[idx], b.j[idx], b.pref1[idx]
    fresh = torch.arange(b.n_fresh_segments, device=b.obs.device)
    logp, _ = batch_logp(policy, b, torch.cat([i, j, fresh]).unique())
    h = implicit_reward(logp, b.ref_logp, b.mask, coef.beta)  # for the held-out accuracy diagnostic
    logsig = dpo_term(torch.where(pref1 > 0.5, h[i], h[j]), torch.where(pref1 > 0.5, h[j], h[i]))
    old, ref = b.old_logp, b.ref_logp
    inpo = inpo_loss(logp[i], logp[j], old[i], old[j], ref[i], ref[j], b.win[i], b.win[j], coef.eta, coef.tau)
    revkl = ((old[fresh] - ref[fresh]) * b.mask[fresh]).sum(-1).mean()  # sampled segment KL(mu_k || pi_ref)
    return {"inpo": inpo, "dpo": logsig.mean(), "logsig": logsig, "logp": logp, "h": h, "revkl": revkl,
            "shift": torch.zeros((), device=b.obs.device)}


class INPOObjective:
    """INPO as the preference agent's objective component (the interface of
    :class:`~rl_align.agents.sail_objective.SAILObjective`): ``J = -inpo``. Holds only its coefficients."""

    def __init__(self, coef: INPOCoefficients) -> None:
        self.coef = coef

    def prepare(self, policy, reference, fresh: PreferenceBatch) -> tuple[PreferenceBatch, float]:
        """Each segment's win rate against mu_k into the batch, and ``f_k = -L(mu_k) / L_0``: the loss at
        ``theta = mu_k`` (where the log-ratio to mu_k is 0, so no forward pass) relative to
        ``L_0 = eta^2 E[(w - w')^2]``, its value when ``pi_ref = mu_k``. ``f = -1`` right after a reset and
        rises toward 0 as ``tau log mu_k/pi_ref`` comes to explain the win rates (the fixed point of the
        regularized game); the ratio is unit-free, comparable across batches and eta."""
        c = self.coef
        b = fresh.fixed(win=segment_win_rates(fresh.i, fresh.j, fresh.pref1, len(fresh.obs)))
        i, j, old, ref = b.i, b.j, b.old_logp, b.ref_logp
        dref = (ref[i] - old[i]).sum(-1) - (ref[j] - old[j]).sum(-1)  # log pi_ref/mu_k (s) - (s')
        dwin = b.win[i] - b.win[j]
        L0 = float((c.eta * dwin).pow(2).mean())
        return b, (-float((c.eta * c.tau * dref + c.eta * dwin).pow(2).mean()) / L0 if L0 > 0 else float("nan"))

    def at_theta_old(self, policy, reference, b: PreferenceBatch) -> tuple[PreferenceBatch, Terms]:
        """Nothing to fix beyond the win rates (``prepare``); the terms at theta_old for the held-out accuracy."""
        with torch.no_grad():
            return b, self.terms(policy, reference, b, torch.arange(b.n_fresh_pairs, device=b.obs.device))

    def terms(self, policy, reference, b: PreferenceBatch, idx: torch.Tensor) -> Terms:
        return inpo_terms(policy, b, self.coef, idx)

    def objective(self, terms: Terms) -> torch.Tensor:
        return -terms["inpo"]

    def fixed_batch_objective(self, reference, b: PreferenceBatch, idx: torch.Tensor):
        return lambda policy: -inpo_terms(policy, b, self.coef, idx)["inpo"]

    def heldout_accuracy(self, b: PreferenceBatch, t0: Terms) -> float:
        n = b.n_fresh_pairs
        return pair_accuracy(t0["h"][b.i[:n]], t0["h"][b.j[:n]], b.pref1[:n])

    def term_gradients(self, policy, reference, b: PreferenceBatch, idx: torch.Tensor, extra: Terms | None = None) -> dict[str, float]:
        """Norms of the two pulls in the INPO gradient at theta_old (where the log-ratio to mu_k is 0):
        ``grad/inpo_pref`` of ``2 eta E[(w - w') grad x]`` and ``grad/inpo_ref`` of ``2 eta tau
        E[log pi_ref/mu_k (differenced) grad x]``; their ratio ``grad/ref_over_pref`` is the share of the
        step that the tau pull cancels (0 right after a reset, ~1 at the regularized game's solution).
        (``extra``, an agent's cost term, is not measured here.)"""
        c = self.coef
        i, j = b.i[idx], b.j[idx]
        logp, _ = batch_logp(policy, b, torch.cat([i, j]).unique())
        x = (logp[i] - b.old_logp[i]).sum(-1) - (logp[j] - b.old_logp[j]).sum(-1)
        dref = (b.ref_logp[i] - b.old_logp[i]).sum(-1) - (b.ref_logp[j] - b.old_logp[j]).sum(-1)
        params = list(policy.parameters())
        g_pref = flat_grad((2 * c.eta * (b.win[i] - b.win[j]) * x).mean(), params, retain_graph=True)
        g_ref = flat_grad((2 * c.eta * c.tau * dref * x).mean(), params, retain_graph=True)
        out = {"grad/inpo_pref": float(g_pref.norm()), "grad/inpo_ref": float(g_ref.norm())}
        if out["grad/inpo_pref"] > 0:
            out["grad/ref_over_pref"] = out["grad/inpo_ref"] / out["grad/inpo_pref"]
        return out


class SAILRevKLInner(SAILObjective):
    """SAIL-RevKL with ``revkl_coef = tau`` (SAIL's own objective); ``f_k = dpo - tau KL`` at theta_old costs
    one extra no-grad forward per update."""

    def prepare(self, policy, reference, fresh: PreferenceBatch) -> tuple[PreferenceBatch, float]:
        with torch.no_grad():
            t = self.terms(policy, reference, fresh, torch.arange(fresh.n_pairs, device=fresh.obs.device))
        return fresh, float(t["dpo"] - self.coef.revkl_coef * t["revkl"])


register("comal", COMALConfig)(SAIL)
