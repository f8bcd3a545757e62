"""``report`` on a real sweep and on a preference run: the PNGs exist and the table has a row per setting
with the mean ± std of the trials' final metrics."""

import csv

import matplotlib.image
import numpy as np
import pytest

from rl_align.cli import main
from rl_align.errors import UserError
from rl_align.report import aggregate, make_report
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
    assert main(["report", str(folder), "--out", str(tmp_path / "out")]) == 0
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
        assert cells[2] == f"{np.mean(returns):.1f} ± {np.std(returns, ddof=1):.1f}"
    assert "![return](return.png)" in md


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


def test_interval_is_the_t_interval_over_seeds():
    x = np.array([0.0, 1.0, 2.0])
    grid, mean, half = aggregate([(x, np.array([0.0, 1.0, 2.0])), (x, np.array([2.0, 3.0, 4.0])), (x + 0.5, np.array([1.0, 2.0, 3.0]))])
    assert np.allclose(grid, [0.5, 1.0, 1.5, 2.0])  # the range all seeds cover
    ys = np.array([[0.5, 1, 1.5, 2], [2.5, 3, 3.5, 4], [1, 1.5, 2, 2.5]])
    assert np.allclose(mean, ys.mean(0))
    assert np.allclose(half, 4.302652729911275 * ys.std(0, ddof=1) / np.sqrt(3))


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="neither a run folder"):
        make_report(tmp_path)
