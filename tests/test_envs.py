"""The env stack: any MuJoCo task, costs in info, env checker, same-step autoreset."""

import subprocess
import sys

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rl_align.config import list_presets
from rl_align.envs import CostConfig, EnvConfig, make_env, make_vec_env
from rl_align.envs.costs import VELOCITY_THRESHOLDS
from rl_align.errors import UserError
from rl_align.runs import resolve_config
from rl_align.train import train


@pytest.mark.parametrize("preset", sorted(list_presets("envs")))
def test_every_preset_passes_the_env_checker(preset):
    cfg = resolve_config(preset, "ppo")
    env = make_env(cfg.env)
    check_env(env, skip_render_check=True)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert isinstance(info["cost"], float) and info["features"].shape == (3,)


@pytest.mark.parametrize("task", ["HalfCheetah-v5", "Hopper-v5", "Ant-v5"])
def test_velocity_cost_is_one_exactly_above_threshold(task):
    env = make_env(EnvConfig(task=task, cost=CostConfig(kind="velocity", threshold=0.3)), seed=0)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        _, _, term, trunc, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
        speed = np.hypot(info["x_velocity"], info["y_velocity"]) if task.startswith("Ant") else info["x_velocity"]
        assert info["cost"] == float(speed > 0.3)
        seen.add(info["cost"])
        if term or trunc:
            env.reset()
    assert seen == {0.0, 1.0}  # both sides of the threshold were visited


def test_default_thresholds_are_safety_gymnasium_v1():
    env = make_env("HalfCheetah-v5")
    assert env.threshold == VELOCITY_THRESHOLDS["HalfCheetah"] == 3.2096
    env = make_env("Reacher-v5")  # no default: the cost is unavailable, not an error
    env.reset(seed=0)
    info = env.step(env.action_space.sample())[4]
    assert env.threshold is None and not env.cost_available and np.isnan(info["cost"])
    given = make_env(EnvConfig(task="Reacher-v5", cost=CostConfig(threshold=0.5)), seed=0)
    assert given.cost_available and given.step(given.action_space.sample())[4]["cost"] in (0.0, 1.0)


def test_a_task_without_a_default_threshold_trains_unconstrained_and_a_constrained_run_asks(tmp_path):
    sets = ["agent.n_envs=2", "agent.n_steps=256", "agent.epochs=2", "run.eval_episodes=2", "run.progress=false",
            f"run.out_dir={tmp_path}"]
    folder, summary = train(resolve_config("Reacher-v5", "ppo", sets, steps=2048, seed=0), quiet=True)
    assert summary["env_steps"] == 2048 and (folder / "checkpoints" / "last.pt").exists()
    assert np.isfinite(summary["final"]["eval/return_det"]) and np.isnan(summary["final"]["eval/cost_det"])
    for agent in ("ppo-lag", "ppo-pid", "sail-revkl-lag"):
        with pytest.raises(UserError, match=r"needs the episode cost, but Reacher has no default velocity threshold; "
                                            r"set env.cost.threshold=") as info:
            resolve_config("Reacher-v5", agent, sets)
        assert "\n" not in str(info.value)
    assert resolve_config("Reacher-v5", "ppo-lag", [*sets, "env.cost.threshold=0.5"]).env.cost.threshold == 0.5
    assert resolve_config("Reacher-v5", "ppo-lag", [*sets, "env.cost.kind=energy"]).env.cost.kind == "energy"


def test_mujoco_deprecations_print_once_and_other_warnings_every_time():
    code = ("import mujoco, numpy as np; from rl_align.envs import make_env\n"
            "envs = [make_env('HalfCheetah-v5') for _ in range(4)]\n"
            "for e in envs[:2]:\n"
            "    b = e.unwrapped; b.data.qvel[:] = np.nan; mujoco.mj_step(b.model, b.data)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert sum("is deprecated" in line for line in lines) <= 1  # MuJoCo 4: once, not once per env made
    assert sum("simulation is unstable" in line for line in lines) == 2  # each instability still shown


def user_cost(env, action, info):
    return 2.0 * float(action[0] > 0)


def test_energy_and_user_costs_on_any_task():
    env = make_env(EnvConfig(task="Reacher-v5", cost=CostConfig(kind="energy")), seed=0)
    a = np.array([0.5, -0.5], dtype=np.float32)
    _, _, _, _, info = env.step(a)
    assert info["cost"] == pytest.approx(0.5)
    env = make_env(EnvConfig(task="Swimmer-v5", cost=CostConfig(kind="tests.test_envs:user_cost")), seed=0)
    assert env.step(np.array([1.0, 0.0], dtype=np.float32))[4]["cost"] == 2.0
    assert env.step(np.array([-1.0, 0.0], dtype=np.float32))[4]["cost"] == 0.0
    check_env(env, skip_render_check=True)


def test_bad_env_input_is_a_user_error():
    with pytest.raises(UserError, match="unknown task"):
        make_env("NoSuchTask-v9")
    with pytest.raises(UserError, match="cannot load cost function"):
        make_env(EnvConfig(task="Swimmer-v5", cost=CostConfig(kind="no.such.module:f")))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_same_step_autoreset(mode):
    """At the step an episode ends, obs is the new episode's first observation and final_obs the last
    one of the old episode; the next step continues the new episode."""
    vec = make_vec_env(EnvConfig(task="InvertedPendulum-v5", cost=CostConfig(kind="none"), vectorization=mode), 2, seed=3)
    single = make_env(EnvConfig(task="InvertedPendulum-v5", cost=CostConfig(kind="none")))
    obs = vec.reset()
    first_obs_env0, _ = single.reset(seed=3)
    np.testing.assert_allclose(obs[0], first_obs_env0, rtol=1e-6)
    action = np.full((2, 1), 3.0, dtype=np.float32)  # pushes the pole over within a few steps
    for t in range(100):
        step = vec.step(action)
        o, r, term, trunc, _ = single.step(action[0])
        assert step.rewards[0] == r
        if step.terminated[0]:
            assert term
            np.testing.assert_allclose(step.final_obs[0], o, rtol=1e-6)
            assert not np.allclose(step.obs[0], o)  # a fresh episode has started
            assert np.abs(step.obs[0]).max() < 0.011  # reset noise of InvertedPendulum is U(-0.01, 0.01)
            break
        np.testing.assert_allclose(step.obs[0], o, rtol=1e-6)
    else:
        pytest.fail("the episode did not end")
    vec.close()


def test_deepmind_control_tasks_are_env_ids_with_physics_features_and_exact_state():
    """dm_control through Shimmy: flattened observations, the torso's forward speed and height from the
    physics, and a saved env state that replays the same future."""
    env = make_vec_env("dm_control/walker-walk-v0", 2, seed=0)
    obs = env.reset()
    assert obs.shape == (2, 24) and obs.dtype == np.float32
    rng = np.random.default_rng(0)
    for _ in range(50):
        step = env.step(rng.uniform(-1, 1, (2, 6)))
    assert (step.features[:, 1] > 0.1).all()  # the torso's height above the floor, read from the physics
    state, acts = env.get_state(), rng.uniform(-1, 1, (30, 2, 6))
    first = [env.step(a) for a in acts]
    other = make_vec_env("dm_control/walker-walk-v0", 2, seed=9)
    other.reset()
    other.set_state(state)
    again = [other.step(a) for a in acts]
    assert all(np.array_equal(a.obs, b.obs) and np.array_equal(a.rewards, b.rewards) for a, b in zip(first, again))
    assert abs(np.mean([s.features[:, 0] for s in first])) < 5  # a speed in m/s, not a position
    env.close(), other.close()
