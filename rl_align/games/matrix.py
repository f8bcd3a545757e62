"""Exact preference matrix games: ``A[i, j] = P(y_i > y_j)``, ``A + A^T = 1`` (docs/design.md, "Games").

The Nash policy ``pi*`` of the symmetric game maximizes ``min_j (pi^T A)_j`` (a linear program the lab
solves itself); every algorithm returns its iterates so that ``KL(pi* || pi_t)`` and the duality gap
``max_i (A pi)_i - min_j (pi^T A)_j`` can be tracked in the last iterate.
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

from rl_align.errors import UserError

# The COMAL paper's 3x3 game: P(b > a) = P(c > b) = 0.9, P(a > c) = 0.8.
COMAL3 = np.array([[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]])
COMAL3_START = np.array([0.2, 0.5, 0.3])


def cycle(n: int, p: float = 0.9) -> np.ndarray:
    """Rock-paper-scissors-like cycle of size ``n``: ``y_{i+1}`` beats ``y_i`` with probability ``p``,
    other pairs by a milder margin alternating in sign (an intransitive tournament)."""
    if n < 3:
        raise UserError(f"a cyclic game needs at least 3 actions, got {n}")
    A = np.full((n, n), 0.5)
    for i in range(n):
        for k in range(1, n):
            j = (i + k) % n
            A[j, i] = p if k == 1 else (0.6 if k % 2 else 0.4)
    A = (A + (1 - A.T)) / 2  # enforce A + A^T = 1 exactly
    return A


def random_game(n: int, seed: int) -> np.ndarray:
    """A random intransitive game ``A = 1/2 + M``, ``M = -M^T``, whose Nash policy has full support:
    ``M = Q^T S Q`` with ``S`` random skew-symmetric and ``Q = I - u 1^T`` for a random interior ``u``,
    so ``M u = 0`` and ``u`` is an equilibrium (the only one for odd ``n``; a skew matrix has even rank,
    so for even ``n`` the equilibria form a line)."""
    rng = np.random.default_rng(seed)
    while True:  # reject nearly degenerate draws (a tiny nonzero singular value makes every method crawl)
        u = rng.dirichlet(np.full(n, 5.0))
        S = np.triu(rng.normal(size=(n, n)), 1)
        S = S - S.T
        Q = np.eye(n) - np.outer(u, np.ones(n))
        M = Q.T @ S @ Q
        sv = np.linalg.svd(M, compute_uv=False)
        if sv[n - 2 if n % 2 else n - 3] > 0.15 * sv[0]:  # smallest nonzero singular value (skew: even rank)
            break
    M *= 0.45 / np.abs(M).max()
    A = 0.5 + M
    return (A + 1 - A.T) / 2


def validate(A: np.ndarray, source: str = "matrix") -> np.ndarray:
    A = np.asarray(A, dtype=float)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 2:
        raise UserError(f"{source} must be a square matrix of at least 2x2, got shape {A.shape}")
    if (A < 0).any() or (A > 1).any():
        raise UserError(f"{source} has entries outside [0, 1]; A[i, j] is the probability that y_i beats y_j")
    err = np.abs(A + A.T - 1).max()
    if err > 1e-9:
        raise UserError(f"{source} violates A + A^T = 1 by {err:.3g} (> 1e-9); set A[j, i] = 1 - A[i, j] and the diagonal to 0.5")
    return A


def load_matrix(spec: str) -> np.ndarray:
    """A built-in name (``comal3``, ``cycle:N``, ``random:N:SEED``) or a ``.json`` / ``.csv`` file."""
    if spec == "comal3":
        return COMAL3.copy()
    if spec.startswith("cycle:"):
        return cycle(_int(spec.split(":")[1], spec))
    if spec.startswith("random:"):
        parts = spec.split(":")
        return random_game(_int(parts[1], spec), _int(parts[2], spec) if len(parts) > 2 else 0)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"no matrix {spec!r}: give comal3, cycle:N, random:N:SEED, or a .json / .csv file")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data = data["matrix"] if isinstance(data, dict) else data
            A = np.asarray(data, dtype=float)
        else:
            A = np.asarray([[float(x) for x in row] for row in csv.reader(path.open()) if row], dtype=float)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read a matrix from {spec} ({exc}); use a JSON list of rows or a CSV of numbers") from None
    return validate(A, spec)


def _int(s: str, spec: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise UserError(f"bad built-in matrix {spec!r}; use cycle:N or random:N:SEED") from None


def check_policy(pi, n: int, what: str = "start") -> np.ndarray:
    pi = np.asarray(pi, dtype=float)
    if pi.shape != (n,):
        raise UserError(f"{what} policy must have {n} entries, got {pi.shape[0] if pi.ndim else 1}")
    if (pi <= 0).any():
        raise UserError(f"{what} policy must have full support (all entries > 0), got {pi.tolist()}")
    if abs(pi.sum() - 1) > 1e-9:
        raise UserError(f"{what} policy must lie on the simplex (sum to 1), sums to {pi.sum():.6g}")
    return pi


# ---- solution concepts -----------------------------------------------------------------------------
def nash(A: np.ndarray) -> np.ndarray:
    """Nash policy by LP: ``max v`` s.t. ``(pi^T A)_j >= v`` for all j, ``pi`` on the simplex."""
    n = A.shape[0]
    c = np.zeros(n + 1)
    c[-1] = -1.0  # maximize v
    A_ub = np.hstack([-A.T, np.ones((n, 1))])  # v - (pi^T A)_j <= 0
    A_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(n), A_eq=A_eq, b_eq=[1.0], bounds=[(0, None)] * n + [(None, None)], method="highs")
    if not res.success:
        raise RuntimeError(f"Nash LP failed: {res.message}")
    pi = np.clip(res.x[:n], 0, None)
    return pi / pi.sum()


def duality_gap(A: np.ndarray, pi: np.ndarray) -> float:
    """``max_i (A pi)_i - min_j (pi^T A)_j``; 0 exactly at a Nash policy."""
    return float((A @ pi).max() - (pi @ A).min())


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p || q)`` with ``0 log 0 = 0``."""
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


# ---- algorithms: each returns the iterates [iters + 1, n] -----------------------------------------------
def _mwu(pi: np.ndarray, g: np.ndarray, eta: float) -> np.ndarray:
    """Mirror (multiplicative-weights) step ``pi' ∝ pi exp(eta g)``, computed in log space."""
    logits = np.log(pi) + eta * g
    logits -= logits.max()
    w = np.exp(logits)
    return w / w.sum()


def md(A, start, eta, iters, **_) -> np.ndarray:
    """Mirror descent / MWU: ``pi_{t+1} ∝ pi_t exp(eta A pi_t)``."""
    out = [start]
    for _ in range(iters):
        out.append(_mwu(out[-1], A @ out[-1], eta))
    return np.asarray(out)


def omwu(A, start, eta, iters, **_) -> np.ndarray:
    """Optimistic MWU: ``pi_{t+1} ∝ pi_t exp(eta (2 A pi_t - A pi_{t-1}))``."""
    out, prev = [start], start
    for _ in range(iters):
        pi = out[-1]
        out.append(_mwu(pi, 2 * A @ pi - A @ prev, eta))
        prev = pi
    return np.asarray(out)


def mirror_prox(A, start, eta, iters, **_) -> np.ndarray:
    """Mirror-Prox (extragradient): ``pi_half ∝ pi_t exp(eta A pi_t)``, ``pi_{t+1} ∝ pi_t exp(eta A pi_half)``."""
    out = [start]
    for _ in range(iters):
        pi = out[-1]
        half = _mwu(pi, A @ pi, eta)
        out.append(_mwu(pi, A @ half, eta))
    return np.asarray(out)


def regularized_md(A, start, ref, eta, tau, steps) -> np.ndarray:
    """Algorithm 2 of COMAL (the regularized inner solver): mirror descent on
    ``g = P(. > mu_k) - tau (log(mu_k / pi_ref) + 1)``, i.e. ``mu_{k+1} ∝ mu_k exp(eta g)``."""
    out = [start]
    for _ in range(steps):
        mu = out[-1]
        g = A @ mu - tau * (np.log(mu) - np.log(ref) + 1)
        out.append(_mwu(mu, g, eta))
    return np.asarray(out)


def inpo(A, start, eta, tau, iters, **_) -> np.ndarray:
    """INPO alone: the regularized solver with the reference fixed at the start; converges to the
    *regularized* equilibrium, not to the Nash policy."""
    return regularized_md(A, start, start, eta, tau, iters)


def comal(A, start, eta, tau, T, K, **_) -> np.ndarray:
    """COMAL (Algorithm 1): ``T`` outer steps; each solves the KL-regularized game around ``pi_ref = pi_t``
    with ``K`` inner steps of Algorithm 2, then resets the reference ``pi_ref <- pi_{t+1}``. Returns every
    inner iterate (``T K + 1`` rows)."""
    out, ref = [start], start
    for _ in range(T):
        inner = regularized_md(A, ref, ref, eta, tau, K)
        out.extend(inner[1:])
        ref = inner[-1]  # reference reset
    return np.asarray(out)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: these tensors are tiny, and on a shared CPU thread hand-offs cost ~10x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sampled_pairs(pi, A, n, rng):
    a, b = rng.choice(len(pi), size=n, p=pi), rng.choice(len(pi), size=n, p=pi)
    win = rng.random(n) < A[a, b]
    return np.where(win, a, b), np.where(win, b, a)


def _fit_logits(pi_ref, winners, losers, loss: str, beta: float, steps: int = 200, lr: float = 0.5) -> np.ndarray:
    """Tabular DPO / IPO step: minimize the pairwise loss over policies with pi_t as reference
    (gradient descent on logits; exact gradients of the sample loss)."""
    import torch

    ref = torch.as_tensor(np.log(pi_ref))
    theta = ref.clone().requires_grad_(True)
    w, l = torch.as_tensor(winners), torch.as_tensor(losers)
    opt = torch.optim.SGD([theta], lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(theta, 0)
        h = beta * (logp - ref)
        margin = h[w] - h[l]
        if loss == "dpo":
            obj = -torch.nn.functional.logsigmoid(margin).mean()  # DPO: -log sigmoid(h_w - h_l)
        else:
            obj = ((margin / beta - 1 / (2 * beta)) ** 2).mean()  # IPO (Azar et al.): (log-ratio_w - log-ratio_l - 1/(2 tau))^2
        opt.zero_grad()
        obj.backward()
        opt.step()
    return torch.softmax(theta.detach(), 0).numpy()


def iterative_dpo(A, start, iters, n=100, tau=0.1, seed=0, loss="dpo", **_) -> np.ndarray:
    """Iterative DPO (or IPO with ``loss='ipo'``): each iteration samples ``n`` pairs from ``pi_t``, labels
    them with the oracle ``A`` and fits the DPO loss with ``pi_t`` as reference (``beta = tau``)."""
    rng = np.random.default_rng(seed)
    out = [start]
    with single_thread():
        for _ in range(iters):
            w, l = _sampled_pairs(out[-1], A, n, rng)
            pi = np.clip(_fit_logits(out[-1], w, l, loss, tau), 1e-300, None)
            out.append(pi / pi.sum())
    return np.asarray(out)


def iterative_ipo(A, start, iters, n=100, tau=0.1, seed=0, **_) -> np.ndarray:
    return iterative_dpo(A, start, iters, n=n, tau=tau, seed=seed, loss="ipo")


def sppo(A, start, eta, iters, n=100, seed=0, **_) -> np.ndarray:
    """SPPO: ``pi_{t+1}(y) ∝ pi_t(y) exp(eta (P_hat(y > pi_t) - 1/2))``, win rates estimated from ``n``
    oracle samples per action against ``pi_t``."""
    rng = np.random.default_rng(seed)
    out = [start]
    k = len(start)
    for _ in range(iters):
        pi = out[-1]
        opp = rng.choice(k, size=(k, n), p=pi)
        p_hat = (rng.random((k, n)) < A[np.arange(k)[:, None], opp]).mean(1)
        out.append(_mwu(pi, p_hat - 0.5, eta))
    return np.asarray(out)


ALGORITHMS = {"md": md, "mwu": md, "omwu": omwu, "mirror-prox": mirror_prox, "inpo": inpo, "comal": comal,
              "dpo": iterative_dpo, "ipo": iterative_ipo, "sppo": sppo}


def run(algo: str, A: np.ndarray, start: np.ndarray, eta: float = 0.3, tau: float = 0.1, iters: int = 5000, T: int = 200,
        K: int = 25, n: int = 100, seed: int = 0) -> dict:
    """Run one algorithm; returns the iterates, ``kl`` to the Nash policy and the duality ``gap`` per iterate."""
    if algo not in ALGORITHMS:
        raise UserError(f"unknown game algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")
    A = validate(A)
    start = check_policy(start, A.shape[0])
    for name, v in (("eta", eta), ("tau", tau)):
        if v <= 0:
            raise UserError(f"{name} must be > 0, got {v}")
    for name, v in (("iters", iters), ("T", T), ("K", K), ("n", n)):
        if v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    traj = ALGORITHMS[algo](A, start, eta=eta, tau=tau, iters=iters, T=T, K=K, n=n, seed=seed)
    star = nash(A)
    return {"algo": algo, "iterates": traj, "nash": star, "kl": np.array([kl(star, p) for p in traj]),
            "gap": np.array([duality_gap(A, p) for p in traj])}


def write_csv(result: dict, path: Path) -> None:
    it = result["iterates"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "kl_to_nash", "duality_gap"] + [f"pi_{i}" for i in range(it.shape[1])])
        for t, (p, k, g) in enumerate(zip(it, result["kl"], result["gap"])):
            w.writerow([t, f"{k:.6g}", f"{g:.6g}"] + [f"{x:.8g}" for x in p])
