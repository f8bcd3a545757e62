"""PL-gap and curvature diagnostics for any agent with a scalar objective ``f`` to maximize.

docs/design.md, "PL-gap diagnostics". ``f`` is one function: the agent's objective on a fixed batch, as a
function of the policy's parameters. At each measurement (every ``every`` updates):

* ``f`` and ``||grad f||^2`` at the current parameters;
* ``f_star``: user-given, else the maximum of that same ``f`` found by ``fstar_steps`` Adam steps on a
  copy of the policy (the live policy is untouched); ``gap = f_star - f``;
* the PL ratio ``mu_hat = ||grad f||^2 / (2 gap)`` (where ``gap > eps``) and its running minimum: the
  PL condition with constant mu holds along the run iff ``mu_hat >= mu``;
* every ``curvature_every`` measurements the largest and smallest Hessian eigenvalues of ``f`` by
  Lanczos on Hessian-vector products (``lambda_max > 0``: not concave there).

The maximization finds a local maximum near the current parameters; for a PL function every local
maximum is global, and where ``f`` is not PL the ratio computed against a local ``f_star`` is an upper
bound of the global one (a small ratio is then conclusive, a large one is not). All scalars under ``pl/``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Objective = Callable[[], torch.Tensor]
ModuleObjective = Callable[[torch.nn.Module], torch.Tensor]


def flat_grad(f: torch.Tensor, params: list[torch.nn.Parameter], create_graph: bool = False, retain_graph: bool | None = None) -> torch.Tensor:
    """``grad f`` in ``params`` as one flat vector (zeros for parameters ``f`` does not use)."""
    grads = torch.autograd.grad(f, params, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def halves_cosine(loss: Callable[[int], torch.Tensor | None], params: list[torch.nn.Parameter]) -> float:
    """Cosine between the gradients of one loss on two disjoint halves of a batch, ``loss(0)`` and ``loss(1)``
    (None for an empty half gives nan): how much of an update's direction two independent halves of the
    data agree on. Near 0, the direction is sampling noise; near 1, it is the data's signal."""
    halves = [loss(k) for k in (0, 1)]
    if any(h is None for h in halves):
        return float("nan")
    g0, g1 = (flat_grad(h, params) for h in halves)
    return float(torch.nn.functional.cosine_similarity(g0, g1, dim=0))


def lanczos_extremes(hvp: Callable[[torch.Tensor], torch.Tensor], dim: int, iters: int = 20, seed: int = 0) -> tuple[float, float]:
    """Largest and smallest eigenvalue of a symmetric operator given as ``v -> H v`` (``dim`` entries):
    ``iters`` Lanczos steps with full re-orthogonalization, then the Ritz values of the tridiagonal."""
    gen = torch.Generator().manual_seed(seed)
    k = min(iters, dim)
    q = torch.randn(dim, generator=gen, dtype=torch.float64)
    Q = [q / q.norm()]
    alphas, betas = [], []
    for i in range(k):
        w = hvp(Q[i].float()).double()
        alphas.append(float(w @ Q[i]))
        for qj in Q:  # full re-orthogonalization: a few dozen vectors, cheap, and keeps Ritz values honest
            w = w - (w @ qj) * qj
        beta = float(w.norm())
        if i == k - 1 or beta < 1e-10:
            break
        betas.append(beta)
        Q.append(w / beta)
    T = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    ev = np.linalg.eigvalsh(T)
    return float(ev[-1]), float(ev[0])


def hessian_extremes(objective: Objective, params: list[torch.nn.Parameter], iters: int = 20, seed: int = 0) -> tuple[float, float]:
    """``(lambda_max, lambda_min)`` of the Hessian of ``objective()`` in ``params`` (double backward)."""
    f = objective()
    g = flat_grad(f, params, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:  # H v = grad (g . v); the graph of g is kept across calls
        hv = torch.autograd.grad(g @ v.to(g.device), params, retain_graph=True, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)]).detach().cpu()

    return lanczos_extremes(hvp, g.numel(), iters, seed)


@dataclass
class DiagnosticsConfig:
    every: int = 10  # measure f, ||grad f||^2, f_star, gap and PL ratio every this many updates (0: off)
    curvature_every: int = 1  # Hessian eigenvalues every this many measurements (0: off)
    lanczos_iters: int = 15
    f_star: float | None = None  # known optimum of f; None: maximize f on a copy of the policy
    fstar_steps: int = 200  # Adam steps of that maximization
    fstar_lr: float = 3e-3
    gap_eps: float = 1e-8  # PL ratio only where gap > eps


def maximize(f: ModuleObjective, module: torch.nn.Module, steps: int, lr: float) -> float:
    """The largest ``f`` found by Adam ascent on a copy of ``module`` (``module`` itself is untouched)."""
    twin = copy.deepcopy(module).requires_grad_(True)
    opt = torch.optim.Adam(twin.parameters(), lr=lr)
    best = -math.inf
    for _ in range(steps):
        value = f(twin)
        best = max(best, float(value.detach()))
        opt.zero_grad(set_to_none=True)
        (-value).backward()
        opt.step()
    with torch.no_grad():
        return max(best, float(f(twin)))


class PLDiagnostics:
    """Measures on request; keeps the PL ratio's running minimum (a component with its own state)."""

    def __init__(self, config: DiagnosticsConfig) -> None:
        self.config = config
        self.min_ratio = math.inf
        self.measurements = 0

    def due(self, update_index: int) -> bool:
        return self.config.every > 0 and update_index % self.config.every == 0

    def measure(self, f: ModuleObjective, module: torch.nn.Module) -> dict[str, float]:
        """``pl/`` scalars of ``f(module)`` at ``module``'s current parameters (``f`` rebuilds the
        objective on a fixed batch for any module of the same shape)."""
        c = self.config
        params = [p for p in module.parameters() if p.requires_grad]
        value = f(module)
        g = flat_grad(value, params)
        fv, g2 = float(value.detach()), float(g @ g)
        f_star = c.f_star if c.f_star is not None else max(fv, maximize(f, module, c.fstar_steps, c.fstar_lr))
        gap = f_star - fv
        out = {"pl/f": fv, "pl/grad_norm_sq": g2, "pl/f_star": f_star, "pl/gap": gap}
        if gap > c.gap_eps:
            ratio = g2 / (2 * gap)  # mu_hat = ||grad f||^2 / (2 (f* - f))
            self.min_ratio = min(self.min_ratio, ratio)
            out["pl/ratio"] = ratio
        if math.isfinite(self.min_ratio):
            out["pl/ratio_min"] = self.min_ratio
        if c.curvature_every > 0 and self.measurements % c.curvature_every == 0:
            lmax, lmin = hessian_extremes(lambda: f(module), params, c.lanczos_iters, seed=self.measurements)
            out["pl/lambda_max"], out["pl/lambda_min"] = lmax, lmin
        self.measurements += 1
        return out

    def state_dict(self) -> dict:
        return {"min_ratio": self.min_ratio, "measurements": self.measurements}

    def load_state_dict(self, state: dict) -> None:
        self.min_ratio, self.measurements = float(state["min_ratio"]), int(state["measurements"])
