"""The SAIL-family objective as pure functions of (policy, reference, batch, coefficients)
(docs/design.md, "SAIL, SAIL-RevKL and online DPO").

Segment log-likelihood ``log p_theta(s) = sum_t log pi_theta(a_t|s_t)``; implicit reward
``h(s) = beta * sum_t [log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)]``. Maximized:

    J = dpo + shift_coef * shift - revkl_coef * revkl + bc_coef * bc

    dpo   = E_pairs[log sigmoid(h_w - loser_weight * h_l)]                           (1) the DPO part
    shift = surrogate of E[(log sigmoid(h_w - h_l) - b) (grad log p(s1) + grad log p(s2))]  (2) the shift part
    revkl = E_{s ~ pi}[sum_{t in s} KL(pi(.|s_t) || pi_ref(.|s_t))]                  (3) the reverse KL
    bc    = E_pairs[log p_theta(s_w)]                                                  the winners' likelihood

``revkl_coef = 0`` is SAIL, ``shift_coef = 0`` online iterative DPO. Nothing here holds an agent: the
policy, the reference and the batch are arguments, and every coefficient comes from
:class:`SAILCoefficients`. The terms are mixed with their coefficients in one place,
:func:`weighted_parts`; ``J`` is their sum. A constrained agent adds its Lagrangian cost term beside
``J`` itself (it needs the rollout's steps, not the pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rl_align.agents.preferences import PreferenceBatch, batch_logp, pair_accuracy
from rl_align.diagnostics import flat_grad, halves_cosine
from rl_align.nets import gaussian_kl

Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SAILCoefficients:
    """The coefficients and switches of the SAIL-family objective (read once from ``SAILConfig``)."""

    beta: float = 0.1  # implicit-reward scale
    revkl_coef: float = 0.0  # lambda, per segment-summed KL
    revkl_std: bool = True  # False: only the mean part of the Gaussian KL
    shift_coef: float = 1.0
    baseline: bool = True  # leave-one-out baseline in the shift weights
    normalize_shift: bool = True
    loser_weight: float = 1.0  # CPL's conservative margin (1: plain DPO)
    bc_coef: float = 0.0
    clip: float = 0.2  # the per-step ratio clip of the shift (and clipped DPO) surrogates
    center_h: bool = False  # the DPO part on h minus its expectation under pi_old at each segment's states
    dpo_clip: bool = False  # the DPO part as its gradient at theta_old behind clipped ratios

    @classmethod
    def of(cls, config) -> "SAILCoefficients":
        """The fields of ``config`` (a ``SAILConfig``) that the objective reads."""
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})


# ---- the pieces, each an equation ----------------------------------------------------------------------
def implicit_reward(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``h(s) = beta * sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)]`` over the real steps, ``[M]`` from ``[M, H]``."""
    return beta * ((logp - ref_logp) * mask).sum(-1)


def dpo_term(h_w: torch.Tensor, h_l: torch.Tensor, loser_weight: float = 1.0) -> torch.Tensor:
    """(1) ``log sigmoid(h_w - h_l)`` per pair ``[P]``; ``loser_weight < 1`` is CPL's conservative margin."""
    return F.logsigmoid(h_w - loser_weight * h_l)


def shift_weights(i: torch.Tensor, j: torch.Tensor, logsig: torch.Tensor, n_segments: int, baseline: bool = True,
                  normalize: bool = True) -> torch.Tensor:
    """Per-segment weights of the shift part (2), computed once at theta_old, ``[M]``.

    ``(1/P) sum_p (logsig_p - b)(grad log p(s_i) + grad log p(s_j)) = sum_k w_k grad log p(s_k)`` with
    ``w_k = (sum_{p ∋ k} logsig_p - deg_k b_k) / P`` and ``b_k`` the mean ``logsig`` of the pairs without
    ``k`` (leave-one-out, so the estimator stays unbiased). ``normalize`` rescales ``w`` to zero mean and
    unit std over the segments, as PPO normalizes advantages (its scale is then ``shift_coef``'s)."""
    P = len(logsig)
    ones = torch.ones_like(logsig)
    sums = torch.zeros(n_segments, dtype=logsig.dtype, device=logsig.device).index_add_(0, i, logsig).index_add_(0, j, logsig)
    deg = torch.zeros_like(sums).index_add_(0, i, ones).index_add_(0, j, ones)
    b = (logsig.sum() - sums) / (P - deg).clamp(min=1) if baseline and P > 1 else torch.zeros_like(sums)
    w = (sums - deg * b) / P
    if normalize and n_segments > 1:
        w = (w - w.mean()) / (w.std() + 1e-8)
    return w


def dpo_weights(i: torch.Tensor, j: torch.Tensor, pref1: torch.Tensor, logsig: torch.Tensor, n_segments: int, beta: float,
                loser_weight: float = 1.0) -> torch.Tensor:
    """Per-segment weights of the DPO part's gradient at theta_old, ``[M]``: ``grad mean_p log sigmoid(h_w - lw h_l)
    = sum_k w_k grad log p(s_k)`` with ``w_k = beta / P * (sum_{p: k wins} s_p - lw * sum_{p: k loses} s_p)``,
    ``s_p = sigmoid(-(h_w - lw h_l)) = 1 - exp(logsig_p)``. ``dpo_clip`` puts them behind clipped ratios."""
    s = 1 - logsig.exp()
    w_idx, l_idx = torch.where(pref1 > 0.5, i, j), torch.where(pref1 > 0.5, j, i)
    g = torch.zeros(n_segments, dtype=s.dtype, device=s.device).index_add_(0, w_idx, s).index_add_(0, l_idx, -loser_weight * s)
    return beta * g / len(s)


def shift_term(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, clip: float) -> torch.Tensor:
    """(2) ``sum_k sum_t [min(rho_t w_k, clip(rho_t) w_k) - w_k]``, segments ``[M, H]``, weights ``[M]``:
    gradient ``sum_k w_k grad log p(s_k)`` at theta_old, value 0 there (PPO's per-step clipped ratios
    keep it a trust region over the epochs). Divided by ``M`` when the weights are normalized."""
    ratio = (logp - old_logp).exp()
    wk = w[:, None]
    surr = torch.min(ratio * wk, ratio.clamp(1 - clip, 1 + clip) * wk) - wk
    return (surr * mask).sum()


def segment_kl(kl_steps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse KL of each segment, summed over its real steps: ``[M, H] -> [M]``."""
    return (kl_steps * mask).sum(-1)


def expected_h(policy, ref_policy, obs: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``E_{a_t ~ policy}[h(s)] = beta * sum_t KL(policy(.|s_t) || pi_ref(.|s_t))`` at each segment's own states,
    ``[M]`` from states ``[M, H, obs]``: the offset ``center_h`` subtracts (a function of the states only)."""
    kl = gaussian_kl(policy.mean(obs), policy.log_std, ref_policy.mean(obs), ref_policy.log_std)
    return beta * segment_kl(kl, mask)


# ---- the objective -------------------------------------------------------------------------------------
def sail_terms(policy, reference, b: PreferenceBatch, coef: SAILCoefficients, idx: torch.Tensor) -> Terms:
    """The terms of J on the pairs ``idx`` of ``b``: ``dpo`` (mean log sigmoid, (1)), ``shift`` ((2) on the
    fresh segments with ``b.shift_w``; 0 without them), ``revkl`` ((3), mean over the fresh segments),
    ``bc``, ``dpo_clipped`` (with ``b.dpo_w``), and what the update logs from: per-pair ``logsig``,
    per-step ``logp`` ``[M, H]`` (filled on the pairs' and the fresh segments) and ``h`` ``[M]``."""
    i, j, pref1 = b.i[idx], b.j[idx], b.pref1[idx]
    n_fresh = b.n_fresh_segments
    fresh = torch.arange(n_fresh, device=b.obs.device)
    seg_idx = torch.cat([i, j, fresh]).unique()
    logp, dist = batch_logp(policy, b, seg_idx)
    h = implicit_reward(logp, b.ref_logp, b.mask, coef.beta)
    if b.h_offset is not None:  # center_h: h minus its expectation under pi_old, per segment
        h = h - b.h_offset
    w_idx, l_idx = torch.where(pref1 > 0.5, i, j), torch.where(pref1 > 0.5, j, i)
    logsig = dpo_term(h[w_idx], h[l_idx], coef.loser_weight)
    terms = {"dpo": logsig.mean(), "logsig": logsig, "logp": logp, "h": h}
    if b.dpo_w is not None:  # dpo_clip: the DPO part's gradient at theta_old on the fresh segments, clipped ratios over the epochs
        terms["dpo_clipped"] = shift_term(logp[:n_fresh], b.old_logp[:n_fresh], b.mask[:n_fresh], b.dpo_w, coef.clip)
    terms["bc"] = logp[w_idx].sum(-1).mean()  # winners' segment log-likelihood
    if b.shift_w is not None:
        shift = shift_term(logp[:n_fresh], b.old_logp[:n_fresh], b.mask[:n_fresh], b.shift_w, coef.clip)
        terms["shift"] = shift / n_fresh if coef.normalize_shift else shift
    else:
        terms["shift"] = torch.zeros((), device=b.obs.device)
    pos = torch.searchsorted(seg_idx, fresh)  # rows of the fresh segments in `dist`
    ref_mu = b.ref_mu  # pi_ref's mean on the fresh states: fixed during an update, computed once
    if ref_mu is None:
        with torch.no_grad():
            ref_mu = reference.mean(b.obs[fresh])
    kl_steps = gaussian_kl(dist.loc[pos], policy.log_std, ref_mu, reference.log_std, std_part=coef.revkl_std)  # [M, H]
    terms["revkl"] = segment_kl(kl_steps, b.mask[:n_fresh]).mean()
    return terms


def weighted_parts(terms: Terms, coef: SAILCoefficients) -> Terms:
    """Each term times its coefficient, the sign of J included (the one place they are mixed):
    ``J = dpo + shift_coef * shift - revkl_coef * revkl + bc_coef * bc``; with ``dpo_clip`` the DPO part
    enters as its clipped surrogate (the same gradient at theta_old)."""
    return {"dpo": terms.get("dpo_clipped", terms["dpo"]), "shift": coef.shift_coef * terms["shift"],
            "revkl": -coef.revkl_coef * terms["revkl"], "bc": coef.bc_coef * terms["bc"]}


def sail_objective(terms: Terms, coef: SAILCoefficients) -> torch.Tensor:
    """``J``, the sum of the weighted parts (SAIL-RevKL; ``revkl_coef = 0`` is SAIL, ``shift_coef = 0`` online DPO)."""
    p = weighted_parts(terms, coef)
    return p["dpo"] + p["shift"] + p["revkl"] + p["bc"]


def fixed_batch_objective(reference, b: PreferenceBatch, coef: SAILCoefficients, idx: torch.Tensor) -> Callable[[torch.nn.Module], torch.Tensor]:
    """``f(policy)``: the DPO and reverse-KL parts of J on a fixed batch of pairs, where the sampling
    distribution does not move, so its value and gradient are of one function (the PL diagnostics).
    The shift part (a surrogate of how the sampling moves) and ``bc`` are not in ``f``."""
    fixed = b.fixed(shift_w=None, dpo_w=None)

    def f(policy: torch.nn.Module) -> torch.Tensor:
        p = weighted_parts(sail_terms(policy, reference, fixed, coef, idx), coef)
        return p["dpo"] + p["revkl"]

    return f


def term_gradients(parts: Terms, params: list[torch.nn.Parameter]) -> dict[str, float]:
    """Norms of each weighted part's gradient in ``params`` (``grad/<part>``), the DPO / shift cosine and
    the reverse KL's share of the DPO part; ``parts`` may hold more (the agent's Lagrangian ``cost``)."""
    zero = torch.zeros(sum(p.numel() for p in params))
    grads = {k: flat_grad(v, params, retain_graph=True) if v.requires_grad else zero for k, v in parts.items()}
    out = {f"grad/{k}": float(g.norm()) for k, g in grads.items()}
    if out["grad/shift"] > 0 and out["grad/dpo"] > 0:  # (no direction to compare when a part is exactly 0)
        out["grad/cos_dpo_shift"] = float(F.cosine_similarity(grads["dpo"], grads["shift"], dim=0))
    if out["grad/dpo"] > 0:
        out["grad/revkl_over_dpo"] = out["grad/revkl"] / out["grad/dpo"]
    return out


def dpo_halves_cosine(policy, reference, b: PreferenceBatch, coef: SAILCoefficients) -> float:
    """``grad/dpo_halves_cos``: the DPO part on two disjoint halves of the fresh segments (even and odd
    rows, each with the fresh pairs inside it), in the mean network's weights only (the log-std shrinks
    whatever the labels say: benchmarks/RESULTS.md's coin-flip control)."""
    i, j = b.i[: b.n_fresh_pairs], b.j[: b.n_fresh_pairs]

    def dpo(parity: int) -> torch.Tensor | None:
        idx = torch.nonzero((i % 2 == parity) & (j % 2 == parity)).flatten()
        return sail_terms(policy, reference, b, coef, idx)["dpo"] if len(idx) else None

    return halves_cosine(dpo, list(policy.mean.parameters()))


class SAILObjective:
    """The SAIL(-RevKL) objective with its coefficients bound: the preference agent's objective component
    (COMAL's INPO objective, rl_align.agents.comal, has the same interface and takes its place). It holds
    no agent: every method takes the policy, the reference and the batch."""

    def __init__(self, coef: SAILCoefficients) -> None:
        self.coef = coef

    def prepare(self, policy, reference, fresh: PreferenceBatch) -> tuple[PreferenceBatch, float]:
        """On each fresh batch before the update: the batch (unchanged here) and a statistic at theta_old (none)."""
        return fresh, float("nan")

    def at_theta_old(self, policy, reference, b: PreferenceBatch) -> tuple[PreferenceBatch, Terms]:
        """Fix what stays fixed over the epochs: ``ref_mu``, ``center_h``'s offset, then (on-policy batches)
        the shift part's weights and ``dpo_clip``'s from the terms at theta_old, which are returned too."""
        c, M = self.coef, b.n_fresh_segments
        fresh_idx = torch.arange(b.n_fresh_pairs, device=b.obs.device)
        with torch.no_grad():
            b = b.fixed(ref_mu=reference.mean(b.obs[:M]),
                        h_offset=expected_h(policy, reference, b.obs, b.mask, c.beta) if c.center_h else None)
            t0 = sail_terms(policy, reference, b, c, fresh_idx)
            if b.on_policy:  # the shift part needs labels of this rollout's own segments
                i, j = b.i[: b.n_fresh_pairs], b.j[: b.n_fresh_pairs]
                b = b.fixed(shift_w=shift_weights(i, j, t0["logsig"], M, c.baseline, c.normalize_shift),
                            dpo_w=dpo_weights(i, j, b.pref1[: b.n_fresh_pairs], t0["logsig"], M, c.beta, c.loser_weight) if c.dpo_clip else None)
        return b, t0

    def terms(self, policy, reference, b: PreferenceBatch, idx: torch.Tensor) -> Terms:
        return sail_terms(policy, reference, b, self.coef, idx)

    def objective(self, terms: Terms) -> torch.Tensor:
        return sail_objective(terms, self.coef)

    def fixed_batch_objective(self, reference, b: PreferenceBatch, idx: torch.Tensor) -> Callable[[torch.nn.Module], torch.Tensor]:
        return fixed_batch_objective(reference, b, self.coef, idx)

    def term_gradients(self, policy, reference, b: PreferenceBatch, idx: torch.Tensor, extra: Terms | None = None) -> dict[str, float]:
        """``grad/`` diagnostics of J's weighted parts on the pairs ``idx`` (``bc`` only when weighted), plus
        any ``extra`` part the agent adds beside J (its Lagrangian cost term), and the halves cosine."""
        parts = weighted_parts(self.terms(policy, reference, b, idx), self.coef)
        if self.coef.bc_coef == 0:
            del parts["bc"]
        out = term_gradients({**parts, **(extra or {})}, list(policy.parameters()))
        out["grad/dpo_halves_cos"] = dpo_halves_cosine(policy, reference, b, self.coef)
        return out

    def heldout_accuracy(self, b: PreferenceBatch, t0: Terms) -> float:
        """Accuracy of ``h`` at theta_old on the fresh labels (before the update has seen them)."""
        n = b.n_fresh_pairs
        return pair_accuracy(t0["h"][b.i[:n]], t0["h"][b.j[:n]], b.pref1[:n])
