"""``rl-align game ...``: run the exact labs from the shell; figures and CSVs where asked."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rl_align.errors import UserError

# Constrained-bandit variants: (primal optimism, dual optimism).
BANDIT_VARIANTS = {"pd": (False, False), "opd": (True, True), "opd-primal-only": (True, False), "opd-dual-only": (False, True)}


def _floats(text: str, what: str) -> np.ndarray:
    try:
        return np.asarray([float(x) for x in text.split(",")])
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before any work when an output file cannot be written (its folder is missing)."""
    for opt in ("csv", "plot"):
        path = getattr(args, opt, None)
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"--{opt} {path}: folder {Path(path).resolve().parent} does not exist; create it or pick another path")


def _write_rows(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"csv: {path}")


def plot_matrix_runs(results: list[dict], out: Path) -> None:
    """Simplex trajectories (3 actions; one panel per algorithm, as the COMAL paper's Figures 1-2) and the
    duality gap per iteration on a log scale (any size)."""
    plt = _plt()
    n, k = results[0]["iterates"].shape[1], len(results)
    cols = min(4, k) if n == 3 else 0
    rows = -(-k // 4) if n == 3 else 1
    fig = plt.figure(figsize=(3 * cols + 6, 3 * max(rows, 1.5)))
    grid = fig.add_gridspec(rows, cols + 2)
    if n == 3:
        corners = np.array([[0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])
        star = results[0]["nash"] @ corners
        for idx, r in enumerate(results):
            ax = fig.add_subplot(grid[idx // 4, idx % 4])
            ax.plot(*np.vstack([corners, corners[:1]]).T, "k-", lw=0.8)
            xy = r["iterates"] @ corners
            ax.plot(xy[:, 0], xy[:, 1], lw=0.6, color=f"C{idx}")
            ax.plot(*xy[0], "ks", ms=4)
            ax.plot(*xy[-1], "o", color=f"C{idx}", ms=5)
            ax.plot(*star, "k*", ms=10)
            for i, c in enumerate(corners):
                ax.annotate(f"y{i}", c, textcoords="offset points", xytext=(-8, -12 if i < 2 else 4), fontsize=8)
            ax.set_aspect("equal")
            ax.axis("off")
            ax.set_title(f"{r['algo']}: gap {r['gap'][-1]:.2g}", fontsize=9)
    ax = fig.add_subplot(grid[:, cols:])
    for idx, r in enumerate(results):
        ax.semilogy(np.maximum(r["gap"], 1e-16), color=f"C{idx}", label=r["algo"], lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("duality gap")
    ax.set_title("square: start, dot: last iterate, star: Nash (LP)" if n == 3 else "duality gap", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _matrix(args: argparse.Namespace) -> int:
    _check_outputs(args)
    from rl_align.games.matrix import ALGORITHMS, COMAL3_START, load_matrix, run, write_csv

    A = load_matrix(args.matrix)
    start = _floats(args.start, "--start") if args.start else (COMAL3_START if A.shape == (3, 3) and args.matrix == "comal3" else np.full(len(A), 1 / len(A)))
    algos = list(dict.fromkeys(args.algos.split(","))) if args.algo == "compare" else [args.algo]
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown:
        raise UserError(f"unknown game algorithm {unknown[0]!r} in --algos; use some of {', '.join(ALGORITHMS)}")
    results = []
    for algo in algos:
        iters = args.iters if algo not in ("dpo", "ipo") else min(args.iters, args.sample_iters)
        r = run(algo, A, start, eta=args.eta, tau=args.tau, iters=iters, T=args.T, K=args.K, n=args.n, seed=args.seed)
        results.append(r)
        print(f"{algo:<12} last iterate {np.array2string(r['iterates'][-1], precision=4)}  KL(pi*||pi) {r['kl'][-1]:.3g}  gap {r['gap'][-1]:.3g}")
        if args.csv:
            path = Path(args.csv) if len(algos) == 1 else Path(args.csv).with_name(f"{Path(args.csv).stem}-{algo}.csv")
            write_csv(r, path)
    print(f"Nash policy (LP): {np.array2string(results[0]['nash'], precision=6)}")
    if args.plot:
        plot_matrix_runs(results, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def _bandit(args: argparse.Namespace) -> int:
    _check_outputs(args)
    from rl_align.games.bandit import primal_dual

    r, c = _floats(args.rewards, "--rewards"), _floats(args.costs, "--costs")
    names = list(dict.fromkeys(args.variants.split(",")))
    unknown = [v for v in names if v not in BANDIT_VARIANTS]
    if unknown:
        raise UserError(f"unknown bandit variant {unknown[0]!r}; use some of {', '.join(BANDIT_VARIANTS)}")
    runs = {v: primal_dual(r, c, args.budget, args.eta, iters=args.iters, primal_optimism=BANDIT_VARIANTS[v][0],
                           dual_optimism=BANDIT_VARIANTS[v][1]) for v in names}
    first = next(iter(runs.values()))
    print(f"LP optimum: {np.array2string(first['optimum'], precision=6)}")
    for name, res in runs.items():
        tail = res["distance"][-max(1, args.iters // 10):]  # the last 10% of iterations
        print(f"{name:<16} ||pi_T - pi*||_1 {res['distance'][-1]:.3g} (max over last 10%: {tail.max():.3g})  "
              f"violation {res['violation'][-1]:.3g}  lambda {res['lam'][-1]:.4f}")
    if args.csv:
        _write_rows(Path(args.csv), [{"variant": name, "iteration": t, "distance": f"{res['distance'][t]:.6g}", "violation": f"{res['violation'][t]:.6g}",
                                      "multiplier": f"{res['lam'][t]:.6g}"} for name, res in runs.items() for t in range(len(res["lam"]))])
    if args.plot:
        plt = _plt()
        fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
        for k, (name, res) in enumerate(runs.items()):
            a1.semilogy(np.maximum(res["distance"], 1e-16), color=f"C{k}", label=name, lw=1)
            a2.plot(res["violation"], color=f"C{k}", lw=1)
            a3.plot(res["lam"], color=f"C{k}", lw=1)
        a1.set_ylabel("||pi_t - pi*||_1")
        a1.legend(fontsize=8)
        a2.set_ylabel("violation")
        a3.set_ylabel("multiplier")
        a3.set_xlabel("iteration")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


def _sail(args: argparse.Namespace) -> int:
    _check_outputs(args)
    from rl_align.games.tabular_sail import DEFAULT_REF, DEFAULT_SCORES, bt_matrix, sweep

    A = bt_matrix(_floats(args.scores, "--scores")) if args.matrix is None else __import__("rl_align.games.matrix", fromlist=["load_matrix"]).load_matrix(args.matrix)
    ref = _floats(args.ref, "--ref") if args.ref else (np.asarray(DEFAULT_REF) if len(A) == len(DEFAULT_SCORES) else np.full(len(A), 1 / len(A)))
    coefs = _floats(args.coefs, "--coefs")
    if (coefs < 0).any():
        raise UserError("--coefs must be >= 0 (reverse-KL coefficients)")
    rows = sweep(coefs, A, ref, beta=args.beta, lr=args.lr, iters=args.iters, tol=args.tol)
    print(f"{'revkl_coef':>10} {'min PL ratio':>13} {'max lambda_max':>15} {'iters to gap<' + format(args.tol, 'g'):>18} {'KL to ref':>10}")
    for r in rows:
        its = r["iters_to_gap"] if r["iters_to_gap"] is not None else f">{args.iters}"
        print(f"{r['revkl_coef']:>10g} {r['min_pl_ratio']:>13.4g} {r['max_lambda_max']:>15.4g} {its!s:>18} {r['kl_to_ref']:>10.4g}")
    if args.csv:
        _write_rows(Path(args.csv), [{k: v for k, v in r.items() if k != "run"} for r in rows])
    if args.plot:
        plt = _plt()
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for k, r in enumerate(rows):
            run = r["run"]
            lbl = f"lambda={r['revkl_coef']:g}"
            axes[0].semilogy(np.maximum(run["gap"], 1e-16), color=f"C{k}", label=lbl)
            axes[1].semilogy(np.where(np.isfinite(run["pl_ratio"]), run["pl_ratio"], np.nan), color=f"C{k}", label=lbl)
            axes[2].plot(np.arange(len(run["lambda_max"])) * 10, run["lambda_max"], color=f"C{k}", label=lbl)
        axes[0].set_title("gap f* - f")
        axes[1].set_title("PL ratio ||grad f||^2 / (2 gap)")
        axes[2].set_title("largest Hessian eigenvalue")
        axes[2].axhline(0, color="k", lw=0.8)
        for ax in axes:
            ax.set_xlabel("iteration")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


ALGO_HELP = {"md": "mirror descent / MWU", "mwu": "MWU (same as md)", "omwu": "optimistic MWU", "mirror-prox": "Mirror-Prox (extragradient)",
             "inpo": "INPO: the KL-regularized solver with a fixed reference", "comal": "COMAL: T prox steps of K regularized inner steps, reference reset",
             "dpo": "sample-based iterative DPO", "ipo": "sample-based iterative IPO", "sppo": "sample-based SPPO",
             "compare": "several algorithms on one game, one plot"}


def add_parser(sub) -> None:
    game = sub.add_parser("game", help="exact small-scale labs: preference games, constrained bandits, tabular SAIL",
                          description="Exact, seconds-long checks of the source papers' claims.")
    gsub = game.add_subparsers(dest="game", metavar="LAB")
    gsub.required = True
    from rl_align.games.matrix import ALGORITHMS

    for algo in [*ALGORITHMS, "compare"]:
        p = gsub.add_parser(algo, help=ALGO_HELP[algo], description=f"{ALGO_HELP[algo]} on A[i, j] = P(y_i > y_j); prints the last iterate, "
                            "KL(pi* || pi) to the Nash policy pi* (solved by LP) and the duality gap max_i (A pi)_i - min_j (pi^T A)_j.")
        p.add_argument("--matrix", default="comal3", help="comal3 (the COMAL paper's game), cycle:N, random:N:SEED, or a .json / .csv file")
        p.add_argument("--start", default=None, help="starting policy, comma-separated on the simplex with full support (default: the paper's [0.2,0.5,0.3] for comal3, else uniform)")
        p.add_argument("--eta", type=float, default=0.3, help="step size (default 0.3)")
        p.add_argument("--tau", type=float, default=0.1, help="KL regularization of INPO / COMAL, beta of DPO / IPO (default 0.1)")
        p.add_argument("--iters", type=int, default=5000, help="iterations of MD / OMWU / Mirror-Prox / INPO / SPPO (default 5000)")
        p.add_argument("--sample-iters", type=int, default=100, help="iterations of sample-based DPO / IPO (default 100)")
        p.add_argument("--T", type=int, default=200, help="COMAL outer iterations (default 200)")
        p.add_argument("--K", type=int, default=25, help="COMAL inner steps per outer iteration (default 25)")
        p.add_argument("--n", type=int, default=100, help="oracle samples per iteration for DPO / IPO / SPPO (default 100)")
        p.add_argument("--seed", type=int, default=0, help="RNG seed of the oracle samples of DPO / IPO / SPPO (default 0)")
        p.add_argument("--csv", default=None, help="write iterates, KL and gap per iteration to this CSV")
        p.add_argument("--plot", default=None, help="write a PNG: simplex trajectories (3 actions) and gap vs iteration")
        if algo == "compare":
            p.add_argument("--algos", default="md,omwu,mirror-prox,inpo,comal,sppo", help="comma-separated algorithms")
        p.set_defaults(func=_matrix, algo=algo)

    from rl_align.games.bandit import DEFAULT_BUDGET, DEFAULT_COSTS, DEFAULT_REWARDS

    p = gsub.add_parser("bandit", help="constrained bandit: PD vs OPD last iterates", description="max pi.r s.t. pi.c <= d; standard primal-dual vs optimistic (and one-sided optimism).")
    p.add_argument("--rewards", default=",".join(map(str, DEFAULT_REWARDS)), help="reward of each arm, comma-separated (default %(default)s)")
    p.add_argument("--costs", default=",".join(map(str, DEFAULT_COSTS)), help="cost of each arm, comma-separated (default %(default)s)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="cost budget d, pi.c <= d (default %(default)s)")
    p.add_argument("--eta", type=float, default=0.1, help="step size of both players (default 0.1)")
    p.add_argument("--iters", type=int, default=30_000, help="iterations of every variant (default %(default)s)")
    p.add_argument("--variants", default=",".join(BANDIT_VARIANTS), help="comma-separated from %(default)s (primal/dual optimism switches)")
    p.add_argument("--csv", default=None, help="write distance, violation and multiplier per iteration and variant to this CSV")
    p.add_argument("--plot", default=None, help="PNG of distance to the LP optimum, violation and multiplier")
    p.set_defaults(func=_bandit)

    from rl_align.games.tabular_sail import DEFAULT_REF, DEFAULT_SCORES

    p = gsub.add_parser("sail", help="tabular SAIL vs SAIL-RevKL: exact PL diagnostics over a sweep of the reverse-KL coefficient",
                        description="Exact objective, gradient and Hessian of a softmax policy; gradient ascent per coefficient.")
    p.add_argument("--scores", default=",".join(map(str, DEFAULT_SCORES)), help="Bradley-Terry scores of the responses (default %(default)s)")
    p.add_argument("--matrix", default=None, help="a general preference matrix instead of scores (as for the games)")
    p.add_argument("--ref", default=None, help=f"reference policy (default {','.join(map(str, DEFAULT_REF))} with the default scores, else uniform)")
    p.add_argument("--beta", type=float, default=1.0, help="implicit-reward scale h = beta log(pi / pi_ref) (default 1)")
    p.add_argument("--lr", type=float, default=0.5, help="gradient-ascent step size")
    p.add_argument("--iters", type=int, default=2000, help="gradient-ascent iterations per coefficient (default 2000)")
    p.add_argument("--coefs", default="0,0.01,0.1,0.3,1", help="reverse-KL coefficients to sweep")
    p.add_argument("--tol", type=float, default=1e-6, help="gap that counts as converged (default 1e-6)")
    p.add_argument("--csv", default=None, help="write the sweep table to this CSV")
    p.add_argument("--plot", default=None, help="PNG of gap, PL ratio and lambda_max per coefficient")
    p.set_defaults(func=_sail)
