"""Preference oracles: Bradley-Terry frequencies, general-oracle antisymmetry, B-Pref noise, budgets."""

from types import SimpleNamespace

import numpy as np
import pytest

from rl_align.envs import Oracle, OracleConfig
from rl_align.errors import UserError


def segs(rewards, features=None):
    rewards = np.asarray(rewards, dtype=float)
    if features is None:
        features = np.zeros(rewards.shape + (3,))
    return SimpleNamespace(rewards=rewards, features=np.asarray(features, dtype=float))


def test_bradley_terry_label_frequencies_match_sigmoid():
    M, H, T = 20000, 5, 2.0
    rng = np.random.default_rng(0)
    d = rng.uniform(-6, 6, size=M)  # return differences
    r1 = np.zeros((M, H)); r1[:, 0] = d
    oracle = Oracle(OracleConfig(temperature=T), seed=1)
    labels = oracle.label(segs(r1), segs(np.zeros((M, H))))
    for lo in np.arange(-6, 6, 1.5):
        sel = (d >= lo) & (d < lo + 1.5)
        expected = (1 / (1 + np.exp(-d[sel] / T))).mean()
        assert abs(labels[sel].mean() - expected) < 0.03
    assert oracle.queries == M


def test_myopic_discount_weights_late_steps():
    oracle = Oracle(OracleConfig(discount=0.5), seed=0)
    early = segs([[1.0, 0, 0, 0]]); late = segs([[0, 0, 0, 1.0]])
    assert oracle.returns(early)[0] == pytest.approx(0.125) and oracle.returns(late)[0] == pytest.approx(1.0)


def test_deterministic_teacher_and_scores():
    oracle = Oracle(OracleConfig(temperature=0.0), seed=0)
    labels = oracle.label(segs([[1.0], [0.0], [2.0]]), segs([[0.0], [1.0], [2.0]]))
    np.testing.assert_array_equal(labels, [1.0, 0.0, 0.5])
    fwd = np.zeros((2, 3, 3)); fwd[0, :, 0] = 1.0; fwd[1, :, 0] = -1.0
    a, b = segs(np.zeros((1, 3)), fwd[:1]), segs(np.zeros((1, 3)), fwd[1:])
    assert Oracle(OracleConfig(temperature=0, score="forward")).label(a, b)[0] == 1.0
    assert Oracle(OracleConfig(temperature=0, score="backward")).label(a, b)[0] == 0.0


def test_general_oracle_is_antisymmetric_and_cyclic():
    S = [[0, 2.0, -2.0], [-2.0, 0, 2.0], [2.0, -2.0, 0]]
    oracle = Oracle(OracleConfig(kind="general", weights=[0.0, 0.0, 0.0], skew=S, sharpness=3.0), seed=0)
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(500, 4, 3)), rng.normal(size=(500, 4, 3))
    p12 = oracle.preference_prob(segs(np.zeros((500, 4)), f1), segs(np.zeros((500, 4)), f2))
    p21 = oracle.preference_prob(segs(np.zeros((500, 4)), f2), segs(np.zeros((500, 4)), f1))
    np.testing.assert_allclose(p12 + p21, 1.0, atol=1e-12)
    # three one-hot feature profiles beat each other in a cycle: a > b > c > a
    e = np.eye(3)[:, None, :].repeat(2, axis=1)
    x = [segs(np.zeros((1, 2)), e[i : i + 1]) for i in range(3)]
    x = [SimpleNamespace(rewards=s.rewards, features=s.features * np.array([1, 1, -1])) for s in x]  # undo the -effort sign
    p = [oracle.preference_prob(x[i], x[(i + 1) % 3])[0] for i in range(3)]
    assert all(v > 0.9 for v in p) or all(v < 0.1 for v in p)


def test_noisy_teachers_skip_tie_mistake_rates():
    M = 20000
    rng = np.random.default_rng(1)
    r1 = rng.uniform(0, 10, size=(M, 1)); r2 = rng.uniform(0, 10, size=(M, 1))
    cfg = OracleConfig(temperature=0.0, skip_threshold=3.0, equal_threshold=1.0, mistake_prob=0.2)
    labels = Oracle(cfg, seed=0).label(segs(r1), segs(r2))
    skip = np.maximum(r1, r2)[:, 0] < 3.0
    assert np.isnan(labels[skip]).all() and not np.isnan(labels[~skip]).any()
    tie = (np.abs(r1 - r2)[:, 0] < 1.0) & ~skip
    assert (labels[tie] == 0.5).all()
    rest = ~skip & ~tie
    wrong = labels[rest] != (r1[rest, 0] > r2[rest, 0])
    assert abs(wrong.mean() - 0.2) < 0.015


def test_budget_is_enforced_and_counted():
    oracle = Oracle(OracleConfig(budget=25), seed=0)
    a = oracle.label(segs(np.ones((10, 2))), segs(np.zeros((10, 2))))
    b = oracle.label(segs(np.ones((20, 2))), segs(np.zeros((20, 2))))
    assert oracle.queries == 25 and not np.isnan(a).any()
    assert (~np.isnan(b)).sum() == 15 and np.isnan(b[15:]).all()
    assert np.isnan(oracle.label(segs(np.ones((3, 2))), segs(np.zeros((3, 2))))).all() and oracle.queries == 25


def test_same_seed_same_labels():
    r = np.random.default_rng(0).normal(size=(100, 4))
    l1 = Oracle(OracleConfig(), seed=5).label(segs(r), segs(np.zeros((100, 4))))
    l2 = Oracle(OracleConfig(), seed=5).label(segs(r), segs(np.zeros((100, 4))))
    np.testing.assert_array_equal(l1, l2)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(discount=0.0), dict(mistake_prob=1.5),
                                 dict(kind="general", skew=[[0, 1, 0], [1, 0, 0], [0, 0, 0]]), dict(kind="nope")])
def test_bad_oracle_config(bad):
    with pytest.raises(UserError):
        OracleConfig(**bad)


def test_a_user_score_gets_segments_with_a_mask_on_every_path():
    """Training's segments, the win rate's matched windows and a label store's pairs all reach a user score
    as ``rl_align.buffer.Segments``, ``mask`` included (the win-rate path once handed it a bare namespace)."""
    from rl_align.buffer import Segments
    from rl_align.evaluation import matched_preferences
    from rl_align.labels.learn import stored_segments

    oracle = Oracle(OracleConfig(score="user_scores:forward_per_real_step", temperature=0.0))
    rng = np.random.default_rng(0)
    window = lambda v: {"obs": rng.normal(size=(5, 4)), "actions": rng.normal(size=(5, 2)), "rewards": np.zeros(5),  # noqa: E731
                        "costs": np.zeros(5), "features": np.stack([np.full(5, v), np.zeros(5), np.zeros(5)], -1)}
    fast, slow = {(0, 0): window(2.0), (0, 1): window(2.0)}, {(0, 0): window(1.0), (0, 1): window(1.0)}
    p, episode = matched_preferences(fast, slow, oracle)
    assert p.tolist() == [1.0, 1.0] and episode.tolist() == [0, 0]

    seen = []
    spy = Oracle(OracleConfig(score="user_scores:forward_per_real_step", temperature=0.0))
    spy._user_score = lambda seg: seen.append(seg) or np.zeros(len(seg.rewards))
    matched_preferences(fast, slow, spy)
    side = {"obs": rng.normal(size=(3, 5, 4)), "actions": rng.normal(size=(3, 5, 2)), "mask": np.ones((3, 5)), "logp": np.zeros((3, 5)),
            "ref_logp": np.zeros((3, 5)), "rewards": np.zeros((3, 5)), "features": np.zeros((3, 5, 3))}
    spy.returns(stored_segments(side, np.array([0, 2])))
    assert all(isinstance(s, Segments) and s.mask.shape == s.rewards.shape and s.mask.dtype == bool for s in seen)
    assert seen[0].mask.all() and seen[-1].raw_obs.shape == (2, 5, 4)


def test_a_user_score_that_raises_is_one_line_naming_it():
    from rl_align.buffer import Segments

    oracle = Oracle(OracleConfig(score="user_scores:broken"))
    seg = Segments.of(actions=np.zeros((2, 3, 1)), rewards=np.zeros((2, 3)), features=np.zeros((2, 3, 3)), obs=np.zeros((2, 3, 4)))
    with pytest.raises(UserError) as exc:
        oracle.label(seg, seg)
    msg = str(exc.value)
    assert "\n" not in msg and "user_scores:broken" in msg and "AttributeError" in msg and "no_such_field" in msg and "mask" in msg


def test_a_user_score_that_raises_in_training_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "rl_align.cli", "train", "--env", "halfcheetah-pref", "--agent", "sail", "--steps", "200",
                          "--set", "env.oracle.score=user_scores:broken", "--set", "agent.ref=init", "--set", "agent.n_envs=2",
                          "--set", "agent.n_steps=100", "--set", "agent.segment_len=20", "--set", "run.progress=false",
                          "--set", f"run.out_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120)
    lines = [l for l in res.stderr.splitlines() if l.strip() and "WARNING" not in l]
    assert res.returncode == 2 and len(lines) == 1 and "user_scores:broken raised AttributeError" in lines[0], res.stderr
