"""Tournament win-rate matrix on tiny real runs, and the intransitive halfcheetah-cyclic oracle."""

import csv
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from rl_align.cli import main
from rl_align.envs import Oracle, make_vec_env
from rl_align.runs import resolve_config
from rl_align.tournament import tournament, write_outputs
from rl_align.train import train

TINY = ["agent.n_envs=2", "agent.n_steps=256", "env.max_episode_steps=150", "run.eval_episodes=1", "run.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny PPO runs (different seeds, so different policies) on the cyclic preset."""
    out = tmp_path_factory.mktemp("runs")
    folders = []
    for seed in (0, 1):
        cfg = resolve_config("halfcheetah-cyclic", "ppo", TINY + [f"run.out_dir={out}"], steps=1024, seed=seed)
        folders.append(train(cfg, quiet=True)[0])
    return folders


@pytest.mark.parametrize("deterministic", [True, False])
def test_matrix_is_antisymmetric_with_half_diagonal(runs, tmp_path, deterministic):
    res = tournament([runs[0], runs[1], runs[0]], episodes=3, segment_len=50, deterministic=deterministic)
    W = res.win
    assert res.names == ["ppo-s0", "ppo-s1", "ppo-s0-2"]
    np.testing.assert_allclose(W + W.T, 1.0, atol=1e-9)  # P(a, b) = 1 - P(b, a) on symmetric matching
    np.testing.assert_allclose(np.diag(W), 0.5, atol=1e-9)
    assert W[0, 2] == pytest.approx(0.5)  # the same policy twice plays identical segments
    assert abs(W[0, 1] - 0.5) > 1e-3  # two different policies are told apart
    assert (res.n_pairs == 9).all()  # 3 episodes x 3 windows of 50 in 150 steps
    assert np.isfinite(res.half_width[0, 1]) and res.half_width[0, 1] >= 0
    files = write_outputs(res, tmp_path)
    rows = list(csv.reader(files[0].open()))
    assert rows[0] == ["row_vs_column", *res.names, "row_average", "kl_to_initial_ref"]
    assert float(rows[1][-2]) == pytest.approx((W[0, 1] + W[0, 2]) / 2, abs=1e-4)
    assert rows[1][-1] == "" and np.isnan(res.kl_init_ref).all()  # PPO runs have no reference to drift from
    np.testing.assert_allclose(res.per_episode.mean(-1), W, atol=1e-12)  # 3 windows in every episode: equal weights
    assert files[2].stat().st_size > 1000


def test_cli_writes_outputs_and_rejects_bad_folders(runs, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["tournament", str(runs[0]), str(runs[1]), "--episodes", "2", "--out", str(out), "--oracle", "halfcheetah-cyclic"]) == 0
    assert (out / "tournament.csv").exists() and (out / "tournament_cells.csv").exists() and (out / "tournament.png").exists()
    capsys.readouterr()
    assert main(["tournament", str(runs[0]), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.yaml").write_text((runs[1] / "config.yaml").read_text())
    assert main(["tournament", str(runs[0]), str(broken)]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err
    assert main(["tournament", str(runs[0]), str(runs[1]), "--oracle", "no-such-env"]) == 2


def test_cyclic_preset_is_intransitive_on_real_segments():
    """Segments of different random controllers on HalfCheetah contain preference cycles a > b > c > a."""
    cfg = resolve_config("halfcheetah-cyclic", "ppo", [])
    oracle = Oracle(cfg.env.oracle, seed=0)
    env = make_vec_env(cfg.env, 6, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    scale, bias = np.array([0.1, 0.3, 0.5, 0.8, 1.0, 1.5])[:, None], 0.5 * rng.uniform(-1, 1, (6, 6))
    feats = np.array([env.step(np.clip(scale * rng.standard_normal((6, 6)) + bias, -1, 1)).features for _ in range(200)])
    seg = feats.transpose(1, 0, 2).reshape(24, 50, 3)  # 24 segments of 50 steps
    i, j = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    P = oracle.preference_prob(SimpleNamespace(features=seg[i.ravel()]), SimpleNamespace(features=seg[j.ravel()])).reshape(24, 24)
    np.testing.assert_allclose(P + P.T, 1.0, atol=1e-12)
    beats = P > 0.5
    cycles = sum(1 for a, b, c in itertools.combinations(range(24), 3)
                 if (beats[a, b] and beats[b, c] and beats[c, a]) or (beats[b, a] and beats[c, b] and beats[a, c]))
    assert cycles >= 50  # measured 275 of 2024 triples; a BT (transitive) oracle has none
    # the same segments under the preset with S = 0 (pure Bradley-Terry on w . z) have no cycle
    oracle.config.skew = [[0.0] * 3 for _ in range(3)]
    P0 = oracle.preference_prob(SimpleNamespace(features=seg[i.ravel()]), SimpleNamespace(features=seg[j.ravel()])).reshape(24, 24)
    b0 = P0 > 0.5
    assert not any(b0[a, b] and b0[b, c] and b0[c, a] for a, b, c in itertools.permutations(range(24), 3))
