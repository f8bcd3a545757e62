"""The shared rollout buffer: GAE against hand-computed values (with truncation), segments, pairs."""

import numpy as np
import pytest

from rl_align.agents.base import EpisodeTracker
from rl_align.buffer import RolloutBuffer, gae
from rl_align.runs import resolve_config
from rl_align.runs import build_agent
from rl_align.train import prepare


def test_gae_hand_computed_with_termination_and_truncation():
    g, lam = 0.9, 0.8
    # one env, 4 steps: episode A ends by truncation at t=1 (V(final obs) = 5), episode B runs on
    rewards = np.array([[1.0], [2.0], [3.0], [4.0]])
    values = np.array([[0.5], [1.0], [1.5], [2.0]])
    final_values = np.array([[0.0], [5.0], [0.0], [0.0]])
    terminated = np.zeros((4, 1), bool)
    truncated = np.array([[False], [True], [False], [False]])
    last = np.array([3.0])
    adv, ret = gae(rewards, values, last, final_values, terminated, truncated, g, lam)
    d3 = 4 + g * 3.0 - 2.0
    d2 = 3 + g * 2.0 - 1.5
    d1 = 2 + g * 5.0 - 1.0  # bootstraps from the truncated episode's final observation
    d0 = 1 + g * 1.0 - 0.5
    expected = [d0 + g * lam * d1, d1, d2 + g * lam * d3, d3]
    np.testing.assert_allclose(adv[:, 0], expected)
    np.testing.assert_allclose(ret, adv + values)
    # a termination instead: no bootstrap at all at t=1
    adv_t, _ = gae(rewards, values, last, final_values, truncated, truncated, g, lam)
    assert adv_t[1, 0] == pytest.approx(2 - 1.0)


def test_segments_never_span_two_episodes():
    buf = RolloutBuffer(n_steps=40, n_envs=3, obs_dim=2, act_dim=1)
    rng = np.random.default_rng(0)
    buf.terminated[:] = rng.random((40, 3)) < 0.05
    buf.truncated[:] = rng.random((40, 3)) < 0.05
    buf.rewards[:] = np.arange(40)[:, None] + 100 * np.arange(3)[None, :]  # encodes (t, env)
    episode_id = np.cumsum(np.concatenate([np.zeros((1, 3)), buf.done[:-1]]), axis=0)
    for H in (1, 3, 7):
        segs = buf.segments(H)
        assert segs.rewards.shape == (len(segs), H)
        for k in range(len(segs)):
            n, s, L = segs.env[k], segs.start[k], int(segs.mask[k].sum())
            assert segs.mask[k, :L].all() and not segs.mask[k, L:].any()  # real steps first, then padding
            np.testing.assert_array_equal(segs.rewards[k, :L], np.arange(s, s + L) + 100 * n)
            assert (segs.rewards[k, L:] == 0).all() and (segs.logp[k, L:] == 0).all()  # the absorbing state
            assert len(set(episode_id[s : s + L, n])) == 1, "a segment crosses an episode boundary"
            if L < H:  # only a fall ends a window early
                assert buf.terminated[s + L - 1, n]
        starts = [(n, s) for n, s in zip(segs.env, segs.start)]
        assert len(starts) == len(set(starts))
    with pytest.raises(ValueError):
        buf.segments(41)


def test_a_terminated_episodes_final_window_is_labelled():
    """One env, H = 10: an episode falls at t = 24, so steps 20..24 form a padded window the oracle
    judges (its return counts only those 5 steps); a truncation's remainder is left for later."""
    from rl_align.envs import Oracle, OracleConfig

    buf = RolloutBuffer(n_steps=40, n_envs=1, obs_dim=2, act_dim=1)
    buf.rewards[:] = 1.0
    buf.terminated[24, 0] = True
    buf.truncated[36, 0] = True
    segs = buf.segments(10)
    assert list(segs.start) == [0, 10, 20, 25]  # 20..24 padded; 35..36 before the truncation dropped
    assert segs.mask.sum(-1).tolist() == [10, 10, 5, 10]
    ret = Oracle(OracleConfig()).returns(segs)
    assert ret.tolist() == [10.0, 10.0, 5.0, 10.0]
    lab = Oracle(OracleConfig()).label(segs.take(np.array([2])), segs.take(np.array([0])))
    assert lab.tolist() == [0.0]  # the window with the fall loses to a full one


def test_pairs_all_or_subsampled():
    rng = np.random.default_rng(0)
    i, j = RolloutBuffer.pairs(6, None, rng)
    assert len(i) == 15 and (i != j).all()
    assert {frozenset(p) for p in zip(i, j)} == {frozenset((a, b)) for a in range(6) for b in range(a + 1, 6)}
    i, j = RolloutBuffer.pairs(10, 7, rng)
    assert len(i) == 7 and len({frozenset(p) for p in zip(i, j)}) == 7


def test_collect_bootstraps_truncation_from_the_final_observation():
    """A real rollout with short episodes: done steps hold V(final obs), not V(next episode's obs)."""
    cfg = resolve_config("HalfCheetah-v5", "ppo", ["agent.n_steps=64", "agent.n_envs=2", "env.max_episode_steps=25"])
    agent, env = build_agent(cfg)
    obs = env.reset()
    agent.collect(env, obs, EpisodeTracker(2))
    buf = agent.buffer
    assert buf.truncated.sum() == 4 and not buf.terminated.any()
    actor = agent.actor()
    for t, n in zip(*np.nonzero(buf.truncated)):
        # the episode's last observation is not in the buffer; the next row is a fresh episode
        assert buf.final_values[t, n] != 0.0
        assert abs(actor.values(buf.obs[t + 1 : t + 2, n])[0][0] - buf.values[t + 1, n]) < 1e-5
    env.close()


def test_episode_tracker_sums_per_env():
    tr = EpisodeTracker(2)
    tr.step(np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.array([False, False]))
    tr.step(np.array([1.0, 2.0]), np.array([1.0, 1.0]), np.array([True, False]))
    assert tr.pop() == [(2.0, 1.0, 2)]


def test_aligned_windows_pad_a_fall_and_drop_a_truncation():
    """``aligned``: the fixed windows [0, 10), [10, 20), ... of each env; a fall at t = 24 pads 20..24 and
    drops 25..29 (it started after the reset), a truncation at t = 33 drops 30..39."""
    buf = RolloutBuffer(n_steps=40, n_envs=1, obs_dim=2, act_dim=1)
    buf.terminated[24, 0] = True
    buf.truncated[33, 0] = True
    segs = buf.segments(10, aligned=True)
    assert list(segs.start) == [0, 10, 20] and segs.mask.sum(-1).tolist() == [10, 10, 5]
    buf.truncated[9, 0] = True  # an episode ending on a window's last step keeps that window
    assert list(buf.segments(10, aligned=True).start) == [0, 10, 20]


def test_pairs_with_a_key_stay_inside_their_key():
    key = np.array([0, 0, 1, 1, 1, 2])
    i, j = RolloutBuffer.pairs(6, None, np.random.default_rng(0), key)
    assert {frozenset(p) for p in zip(i, j)} == {frozenset(p) for p in [(0, 1), (2, 3), (2, 4), (3, 4)]}


def test_tracker_copy_continues_the_source_episode():
    tr = EpisodeTracker(3)
    tr.step(np.array([1.0, 5.0, 7.0]), np.zeros(3), np.zeros(3, bool))
    tr.copy(0, [1, 2])
    tr.step(np.array([1.0, 2.0, 3.0]), np.zeros(3), np.array([True, True, True]))
    assert tr.pop() == [(2.0, 0.0, 2), (3.0, 0.0, 2), (4.0, 0.0, 2)]
