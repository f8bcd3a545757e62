"""``report`` on a real sweep and on a preference run: the PNGs exist and the table has a row per setting
with the IQM [bootstrap CI] and mean ± std of the trials' final metrics."""

import csv

import matplotlib.image
import numpy as np
import pytest

from rl_align.cli import main
from rl_align.errors import UserError
from rl_align.report import aggregate, make_report
from rl_align.stats import iqm_ci
from rl_align.runs import resolve_config
from rl_align.sweep import SweepSpec, parse_grid, run_sweep
from rl_align.train import train

TINY = ["agent.n_steps=128", "agent.epochs=2", "run.eval_episodes=2", "env.max_episode_steps=100"]


def png_ok(path):
    img = matplotlib.image.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def test_report_on_a_sweep(tmp_path, capsys):
    spec = SweepSpec(env="inverted-pendulum", agent="ppo", steps=512, sets=TINY, grid=parse_grid(["agent.lr=3e-4,1e-3"]), seeds=[0, 1])
    folder, _ = run_sweep(spec, name="rep", root=tmp_path, workers=1, log=lambda s: None)
    assert main(["report", str(folder), "--out", str(tmp_path / "out"), "--compare", "agent.lr=1e-3", "agent.lr=3e-4",
                 "--normalize", "0", "1000"]) == 0
    out = tmp_path / "out"
    for name in ("return.png", "cost.png"):
        assert png_ok(out / name), name
    assert not (out / "pl_diagnostics.png").exists()  # PPO logs no pl/*: skipped and said so
    printed = capsys.readouterr().out
    assert "skipped pl_diagnostics.png: no run logged pl/*" in printed and "skipped multiplier.png" in printed

    md = (out / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| agent.lr=")]
    assert len(table) == 2
    with (folder / "index.csv").open(newline="") as f:
        index = list(csv.DictReader(f))
    for lr, row in zip(("3e-4", "1e-3"), table):
        returns = [float(r["eval/return_det"]) for r in index if r["agent.lr"] == lr]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"agent.lr={lr}" and cells[1] == "2/2"
        lo, hi = iqm_ci(returns)  # two seeds: IQM = mean; the bootstrap interval lies within the two returns
        assert min(returns) <= lo <= hi <= max(returns)
        assert cells[2] == (f"IQM {np.mean(returns):,.1f} [{lo:,.1f}, {hi:,.1f}] · mean {np.mean(returns):,.1f} "
                            f"± {np.std(returns, ddof=1):,.1f} (n=2)")
        norm = [r / 1000 for r in returns]
        assert cells[-1].endswith(f"mean {np.mean(norm):,.2f} ± {np.std(norm, ddof=1):,.2f} (n=2)")
    assert "![return](return.png)" in md
    pi = next(line for line in md.splitlines() if line.startswith("- eval/return_det:"))
    hi_lr = [float(r["eval/return_det"]) for r in index if r["agent.lr"] == "1e-3"]
    lo_lr = [float(r["eval/return_det"]) for r in index if r["agent.lr"] == "3e-4"]
    share = np.mean([(a > b) + 0.5 * (a == b) for a in hi_lr for b in lo_lr])  # P(A > B) by its definition
    assert pi.startswith(f"- eval/return_det: P = {share:.2f} [") and pi.endswith("n = 2 vs 2")
    with pytest.raises(UserError, match="no group 'agent.lr=1'"):
        make_report(folder, tmp_path / "out2", compare=("agent.lr=1", "agent.lr=3e-4"))


def test_report_on_a_preference_run_draws_pl_kl_and_queries(tmp_path):
    cfg = resolve_config("inverted-pendulum", "sail", [
        "agent.ref=init", "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=20", "agent.epochs=2", "agent.win_rate_episodes=2",
        "agent.curvature_every=2", "run.eval_episodes=2", "env.max_episode_steps=100", "run.progress=false", f"run.out_dir={tmp_path}"],
        steps=1000, seed=0)
    folder, _ = train(cfg, quiet=True)
    out, written, skipped = make_report(folder, log=lambda s: None)
    assert out == folder / "report"
    names = {p.name for p in written}
    assert {"return.png", "pl_diagnostics.png", "kl_to_ref.png", "queries.png", "return_vs_queries.png"} <= names
    assert all(png_ok(p) for p in written)
    assert any(s.startswith("multiplier.png") for s in skipped)  # no Lagrangian layer in this run
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| sail on")]
    assert len(rows) == 1 and "| 1/1 |" in rows[0]


def test_curves_are_the_iqm_over_seeds_with_a_bootstrap_band_not_a_t_interval():
    x = np.array([0.0, 1.0, 2.0])
    grid, center, band = aggregate([(x, np.array([0.0, 1.0, 2.0])), (x, np.array([2.0, 3.0, 4.0])), (x + 0.5, np.array([1.0, 2.0, 3.0]))])
    assert np.allclose(grid, [0.5, 1.0, 1.5, 2.0])  # the range all seeds cover
    ys = np.array([[0.5, 1, 1.5, 2], [2.5, 3, 3.5, 4], [1, 1.5, 2, 2.5]])
    assert np.allclose(center, ys.mean(0))  # 3 seeds: the IQM trims nothing
    lo, hi = band
    # the percentile band stays inside the seeds' range; the t-interval (multiplier 4.30) would leave it
    assert np.all(ys.min(0) <= lo) and np.all(lo < center) and np.all(center < hi) and np.all(hi <= ys.max(0))
    assert np.all(center + 4.302652729911275 * ys.std(0, ddof=1) / np.sqrt(3) > ys.max(0))
    assert aggregate([(x, x)])[2] is None  # one seed: no band


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="neither a run folder"):
        make_report(tmp_path)
