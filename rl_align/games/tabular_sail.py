"""Tabular SAIL vs SAIL-RevKL: exact objective, gradient and Hessian of a softmax policy over ``K``
responses (docs/design.md, "SAIL, SAIL-RevKL and online DPO" and "PL-gap diagnostics"; no sampling anywhere).

    J(theta) = sum_{a,b} pi(a) pi(b) [A_ab log sig(h_a - h_b) + A_ba log sig(h_b - h_a)] - lam KL(pi || pi_ref)
    h_y = beta log(pi(y) / pi_ref(y))

Pairs are drawn from ``pi_theta`` itself, so autograd through the weights ``pi(a) pi(b)`` gives both
parts of the SAIL gradient (DPO part + distribution-shift part) exactly. The last logit is pinned at 0
(softmax is invariant to a shared shift, which would add a spurious zero eigenvalue).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.errors import UserError
from rl_align.games.matrix import single_thread

# The instance the lab exhibits: 5 responses, Bradley-Terry preferences from scores, a non-uniform reference.
# Plain SAIL started at pi_ref stalls at a spurious stationary point (gradient -> 0, gap ~0.089 > 0); with
# the reverse-KL penalty the gap falls geometrically. (On the former default, scores 1,0,2,-1 and reference
# 0.1,0.4,0.2,0.3, SAIL converges linearly too; benchmarks/results_games.md reports both.)
DEFAULT_SCORES = [-0.3, 1.3, 0.2, -1.1, 0.7]
DEFAULT_REF = [0.05, 0.06, 0.21, 0.45, 0.23]


def bt_matrix(scores) -> np.ndarray:
    s = np.asarray(scores, float)
    return 1 / (1 + np.exp(-(s[:, None] - s[None, :])))  # A_ab = sigmoid(s_a - s_b)


def policy(theta: torch.Tensor) -> torch.Tensor:
    """Softmax over ``[theta, 0]``: ``K - 1`` free logits."""
    return F.softmax(torch.cat([theta, theta.new_zeros(1)]), 0)


def objective(theta: torch.Tensor, A: torch.Tensor, ref: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    pi = policy(theta)
    logpi = torch.log(pi)
    h = beta * (logpi - torch.log(ref))  # implicit reward
    diff = h[:, None] - h[None, :]
    pair = A * F.logsigmoid(diff) + A.T * F.logsigmoid(-diff)  # E_label log sigmoid(h_w - h_l) for pair (a, b)
    J = (pi[:, None] * pi[None, :] * pair).sum()  # pairs sampled from pi_theta itself
    return J - lam * (pi * (logpi - torch.log(ref))).sum()  # SAIL-RevKL: minus lam KL(pi || pi_ref)


def gradient_parts(theta: torch.Tensor, A: torch.Tensor, ref: torch.Tensor, beta: float, lam: float) -> dict[str, torch.Tensor]:
    """The SAIL gradient split as in docs/design.md ("SAIL, SAIL-RevKL and online DPO"), each part exact (``[K-1]`` tensors):
    ``dpo = sum_ab pi_a pi_b grad l_ab`` (pairs held fixed), ``shift = sum_ab pi_a pi_b (l_ab - b)
    (grad log pi_a + grad log pi_b)`` with baseline ``b = E[l]`` (the pairs' own distribution moves), and
    ``revkl = -lam grad KL(pi || pi_ref)``; their sum is ``grad J``."""
    theta = theta.detach().requires_grad_(True)
    pi = policy(theta)
    logpi = torch.log(pi)
    h = beta * (logpi - torch.log(ref))
    diff = h[:, None] - h[None, :]
    pair = A * F.logsigmoid(diff) + A.T * F.logsigmoid(-diff)  # l_ab = E_label log sigmoid(h_w - h_l)
    w = (pi[:, None] * pi[None, :]).detach()
    (dpo,) = torch.autograd.grad((w * pair).sum(), theta, retain_graph=True)  # DPO part
    adv = (pair - (w * pair).sum()).detach()  # l_ab - b
    (shift,) = torch.autograd.grad((w * adv * (logpi[:, None] + logpi[None, :])).sum(), theta, retain_graph=True)  # shift part
    (revkl,) = torch.autograd.grad(-lam * (pi * (logpi - torch.log(ref))).sum(), theta)  # reverse-KL part
    return {"dpo": dpo, "shift": shift, "revkl": revkl}


@single_thread()
def run(A, ref, beta: float = 1.0, lam: float = 0.0, lr: float = 0.5, iters: int = 3000, start=None, hessian_every: int = 10) -> dict:
    """Plain gradient ascent with the exact gradient; per iterate: ``f``, ``||grad f||^2``; every
    ``hessian_every`` iterates the Hessian's extreme eigenvalues; then (once ``f*`` is known) gap, PL
    ratio and its running minimum."""
    A, ref = np.asarray(A, float), np.asarray(ref, float)
    K = A.shape[0]
    if ref.shape != (K,) or (ref <= 0).any() or abs(ref.sum() - 1) > 1e-9:
        raise UserError(f"the reference policy must be {K} positive numbers summing to 1")
    if lam < 0 or beta <= 0 or lr <= 0:
        raise UserError(f"need lam >= 0, beta > 0 and lr > 0; got lam={lam}, beta={beta}, lr={lr}")
    if iters < 1 or hessian_every < 1:
        raise UserError(f"iters and hessian_every must be >= 1, got {iters} and {hessian_every}")
    At, reft = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    start = np.log(ref[:-1] / ref[-1]) if start is None else np.asarray(start, float)  # start at pi_ref
    theta = torch.as_tensor(start, dtype=torch.float64).clone().requires_grad_(True)
    f_of = lambda t: objective(t, At, reft, beta, lam)  # noqa: E731
    fs, g2s, lmax, lmin = [], [], [], []
    for _ in range(iters):
        f = f_of(theta)
        (g,) = torch.autograd.grad(f, theta)
        if len(fs) % hessian_every == 0:
            ev = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f_of, theta.detach()))
            lmax.append(float(ev[-1]))
            lmin.append(float(ev[0]))
        fs.append(float(f.detach()))
        g2s.append(float(g @ g))
        with torch.no_grad():
            theta += lr * g
    f_star = optimum(At, reft, beta, lam, theta.detach())
    fs = np.asarray(fs)
    gap = np.maximum(f_star - fs, 0.0)
    ratio = np.where(gap > 1e-12, np.asarray(g2s) / (2 * np.maximum(gap, 1e-300)), np.nan)
    final_pi = policy(theta.detach()).numpy()
    return {"f": fs, "grad_norm_sq": np.asarray(g2s), "lambda_max": np.asarray(lmax), "lambda_min": np.asarray(lmin),
            "f_star": f_star, "gap": gap, "pl_ratio": ratio, "pl_ratio_min": np.fmin.accumulate(np.nan_to_num(ratio, nan=np.inf)),
            "final_pi": final_pi, "kl_to_ref": float(np.sum(final_pi * np.log(final_pi / ref)))}


def optimum(A: torch.Tensor, ref: torch.Tensor, beta: float, lam: float, init: torch.Tensor) -> float:
    """``f*`` found by the lab: L-BFGS from the end of the run and from a few other starts, best value."""
    best = -np.inf
    gen = torch.Generator().manual_seed(0)
    starts = [init.clone()] + [torch.randn(init.shape, generator=gen, dtype=torch.float64) * 2 for _ in range(4)]
    for s in starts:
        t = s.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([t], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -objective(t, A, ref, beta, lam)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            best = max(best, float(objective(t, A, ref, beta, lam)))
    return best


def sweep(coefs, A=None, ref=None, beta: float = 1.0, lr: float = 0.5, iters: int = 2000, tol: float = 1e-6) -> list[dict]:
    """Per reverse-KL coefficient: min PL ratio, max lambda_max, iterations to gap < tol, final KL to pi_ref."""
    A = bt_matrix(DEFAULT_SCORES) if A is None else A
    ref = np.asarray(DEFAULT_REF) if ref is None else ref
    rows = []
    for lam in coefs:
        r = run(A, ref, beta=beta, lam=lam, lr=lr, iters=iters)
        hit = np.flatnonzero(r["gap"] < tol)
        rows.append({"revkl_coef": lam, "min_pl_ratio": float(np.nanmin(r["pl_ratio"])) if np.isfinite(r["pl_ratio"]).any() else float("nan"),
                     "max_lambda_max": float(r["lambda_max"].max()), "iters_to_gap": int(hit[0]) if len(hit) else None,
                     "final_gap": float(r["gap"][-1]), "kl_to_ref": r["kl_to_ref"], "run": r})
    return rows
