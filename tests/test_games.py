"""The theory lab's acceptance checks: exact games, constrained bandits, tabular SAIL landscapes."""

import json

import numpy as np
import pytest

from rl_align.cli import main
from rl_align.errors import UserError
from rl_align.games import bandit, tabular_sail
from rl_align.games.matrix import COMAL3, COMAL3_START, nash, random_game, run, validate

PAPER = dict(eta=0.3, tau=0.1, T=200, K=25, iters=5000)


def test_paper_game_nash_is_computed_by_lp():
    np.testing.assert_allclose(nash(COMAL3), [4 / 11, 3 / 11, 4 / 11], atol=1e-9)


def test_paper_game_last_iterates():
    res = {a: run(a, COMAL3, COMAL3_START, **PAPER) for a in ("md", "omwu", "mirror-prox", "inpo", "comal")}
    assert res["comal"]["kl"][-1] < 1e-10
    assert res["md"]["gap"][-1] > 0.5  # MD / MWU cycles away from the Nash policy
    assert res["inpo"]["gap"][-1] > 0.01  # converges, but to the regularized equilibrium
    assert res["omwu"]["gap"][-1] < 1e-3 and res["mirror-prox"]["gap"][-1] < 1e-3
    assert len(res["comal"]["iterates"]) == 200 * 25 + 1


def test_sample_based_methods_are_seeded_and_do_not_converge():
    a = run("sppo", COMAL3, COMAL3_START, eta=0.3, iters=500, n=50, seed=1)
    b = run("sppo", COMAL3, COMAL3_START, eta=0.3, iters=500, n=50, seed=1)
    np.testing.assert_array_equal(a["iterates"], b["iterates"])
    assert a["gap"][-1] > 0.1
    d = run("dpo", COMAL3, COMAL3_START, tau=0.1, iters=20, n=50, seed=0)
    assert d["gap"][-1] > 0.1


@pytest.mark.parametrize("seed", range(6))
def test_comal_converges_on_random_intransitive_games_md_does_not(seed):
    n = (5, 7, 9)[seed % 3]
    A = random_game(n, seed)
    star = nash(A)
    assert star.min() > 0.01  # full-support equilibrium
    assert (A @ star).max() - (star @ A).min() < 1e-8
    start = np.full(n, 1 / n)
    c = run("comal", A, start, eta=1.0, tau=0.2, T=400, K=25)
    m = run("md", A, start, eta=1.0, iters=10_000)
    assert c["kl"][-1] < c["kl"][0] / 10 and c["gap"][-1] < 0.01
    assert m["gap"][-1] > 0.1 and m["kl"][-1] > m["kl"][0]


def test_constrained_bandit_opd_converges_where_pd_oscillates():
    r, c, d = np.array(bandit.DEFAULT_REWARDS), np.array(bandit.DEFAULT_COSTS), bandit.DEFAULT_BUDGET
    pd = bandit.primal_dual(r, c, d, eta=0.1, iters=30_000)
    opd = bandit.primal_dual(r, c, d, eta=0.1, iters=30_000, primal_optimism=True, dual_optimism=True)
    assert opd["distance"][-1] < 1e-6
    assert pd["distance"][-1] > 1e-2 and pd["distance"][-5000:].max() > 0.1  # still cycling at the end
    star = bandit.lp_optimum(r, c, d)
    assert star @ c == pytest.approx(d) and star @ r > r[c <= d].max()  # the optimum mixes arms on the budget line


@pytest.mark.parametrize("po, do", [(False, False), (True, True), (True, False), (False, True)])
def test_constrained_bandit_steps_equal_the_closed_form(po, do):
    """Every iterate of the lab against the paper's updates written out: MWU on r - lam_p c with
    lam_p = max(0, 2 lam_t - lam_{t-1}) under primal optimism, projected ascent on h_t (or 2 h_t - h_{t-1})."""
    r, c, d = np.array(bandit.DEFAULT_REWARDS), np.array(bandit.DEFAULT_COSTS), bandit.DEFAULT_BUDGET
    res = bandit.primal_dual(r, c, d, eta=0.1, iters=300, primal_optimism=po, dual_optimism=do)
    pi, lam, lam_prev, h_prev = np.full(4, 0.25), 0.0, 0.0, None
    for t in range(300):
        h = pi @ c - d
        lam_p = max(0.0, 2 * lam - lam_prev) if po else lam
        w = pi * np.exp(0.1 * (r - lam_p * c))
        pi = w / w.sum()
        lam_prev, lam = lam, max(0.0, lam + 0.1 * (2 * h - h_prev if do and h_prev is not None else h))
        h_prev = h
        assert res["lam"][t + 1] == pytest.approx(lam, abs=1e-12)
        np.testing.assert_allclose(res["iterates"][t + 1], pi, atol=1e-12)
    assert res["lam"].max() > 0.5  # the multiplier was active


def test_tabular_sail_nonconcave_and_revkl_pl_linear_convergence():
    A, ref = tabular_sail.bt_matrix(tabular_sail.DEFAULT_SCORES), np.array(tabular_sail.DEFAULT_REF)
    sail = tabular_sail.run(A, ref, lam=0.0, iters=600, hessian_every=5)
    assert sail["lambda_max"].max() > 0  # SAIL's objective is not concave along its run
    assert sail["gap"][-1] > 0.05 and sail["grad_norm_sq"][-1] < 1e-6  # it stalls at a spurious local maximum short of f*
    rev = tabular_sail.run(A, ref, lam=1.0, iters=300, hessian_every=5)
    assert np.nanmin(rev["pl_ratio"]) > 0.04  # PL ratio bounded away from zero
    gap = rev["gap"]
    live = np.flatnonzero(gap > 1e-11)
    for t in range(0, live[-1] - 20, 20):  # linear convergence: a constant factor every 20 steps
        assert gap[t + 20] < 0.6 * gap[t]
    assert gap[200] < 1e-6


@pytest.mark.parametrize("matrix, message", [
    ([[0.5, 0.2, 0.3], [0.8, 0.5, 0.1]], "square"),
    ([[0.5, 1.2], [-0.2, 0.5]], "outside"),
    ([[0.5, 0.3], [0.6, 0.5]], "A \\+ A\\^T"),
])
def test_bad_matrices_are_user_errors(matrix, message):
    with pytest.raises(UserError, match=message):
        validate(np.asarray(matrix, dtype=float))


def test_cli_game_from_file_with_plot_and_errors(tmp_path, capsys):
    path = tmp_path / "my.json"
    path.write_text(json.dumps(COMAL3.tolist()))
    assert main(["game", "comal", "--matrix", str(path), "--start", "0.2,0.5,0.3", "--plot", str(tmp_path / "out.png"),
                 "--csv", str(tmp_path / "out.csv")]) == 0
    assert (tmp_path / "out.png").stat().st_size > 1000
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 200 * 25 + 2
    assert "0.3636" in capsys.readouterr().out
    bad = [(["game", "md", "--start", "0.5,0.6,0.2"], "simplex"), (["game", "md", "--start", "0,0.5,0.5"], "full support"),
           (["game", "md", "--eta", "0"], "eta"), (["game", "omwu", "--matrix", str(tmp_path / "nope.csv")], "no matrix"),
           (["game", "compare", "--algos", "md,nope"], "unknown game algorithm"),
           (["game", "md", "--plot", str(tmp_path / "missing" / "x.png")], "does not exist")]
    for argv, msg in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("n, seed", [(6, 1), (8, 3), (10, 5)])
def test_comal_reaches_an_equilibrium_on_even_sized_games(n, seed):
    """Even sizes: a skew matrix has even rank, so full-support equilibria form a set; the gap decides."""
    A = random_game(n, seed)
    start = np.full(n, 1 / n)
    c = run("comal", A, start, eta=1.0, tau=0.2, T=400, K=25)
    m = run("md", A, start, eta=1.0, iters=10_000)
    assert c["gap"][-1] < 0.01 and c["iterates"][-1].min() > 1e-3  # an interior (full-support) equilibrium
    assert m["gap"][-1] > 0.1


def test_game_help_documents_every_option():
    import argparse

    from rl_align.cli import build_parser

    game = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["game"]
    labs = next(a for a in game._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"md", "omwu", "mirror-prox", "inpo", "comal", "dpo", "ipo", "sppo", "bandit", "sail"} <= set(labs)
    for name, parser in labs.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"rl-align game {name} {action.option_strings[0]} has no help text"


def test_cli_bandit_and_sail_write_csv(tmp_path, capsys):
    assert main(["game", "bandit", "--variants", "pd,opd-dual-only", "--iters", "200", "--csv", str(tmp_path / "b.csv")]) == 0
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert lines[0] == "variant,iteration,distance,violation,multiplier" and len(lines) == 1 + 2 * 201
    assert main(["game", "sail", "--coefs", "0,1", "--iters", "50", "--csv", str(tmp_path / "s.csv")]) == 0
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 3
    for argv, msg in [(["game", "bandit", "--budget", "-1"], "budget"), (["game", "bandit", "--variants", "pd,x"], "variant"),
                      (["game", "sail", "--coefs", "-1"], "coefs"), (["game", "bandit", "--rewards", "1,a"], "numbers")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_cli_matrix_files_that_are_not_games_exit_2(tmp_path, capsys):
    cases = {"ns.csv": "0.5,0.2,0.3\n0.8,0.5,0.1\n", "range.json": json.dumps([[0.5, 1.5], [-0.5, 0.5]]),
             "sym.json": json.dumps({"matrix": [[0.5, 0.3], [0.6, 0.5]]}), "text.csv": "a,b\nc,d\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["game", "md", "--matrix", str(tmp_path / name), "--csv", str(tmp_path / "out.csv")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "rl-align: error:" in err
    assert not (tmp_path / "out.csv").exists()  # nothing written for bad input


def test_tabular_sail_gradient_is_dpo_part_plus_shift_part():
    import torch

    A = torch.as_tensor(tabular_sail.bt_matrix(tabular_sail.DEFAULT_SCORES))
    ref = torch.as_tensor(tabular_sail.DEFAULT_REF, dtype=torch.float64)
    theta = torch.tensor([0.3, -1.0, 0.5, 0.2], dtype=torch.float64, requires_grad=True)
    for lam in (0.0, 0.3):
        (full,) = torch.autograd.grad(tabular_sail.objective(theta, A, ref, 1.0, lam), theta)
        parts = tabular_sail.gradient_parts(theta, A, ref, 1.0, lam)
        torch.testing.assert_close(parts["dpo"] + parts["shift"] + parts["revkl"], full, rtol=1e-10, atol=1e-12)
        assert parts["shift"].norm() > 1e-3 * parts["dpo"].norm()  # the shift part is not negligible here
