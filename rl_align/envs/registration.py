"""The entry point behind rl-align's registered Gymnasium ids (registered on ``import rl_align``).

``gym.make("rl_align/HalfCheetahVelocity-v5")`` is HalfCheetah-v5 with Safety-Gymnasium's velocity cost
in ``info["cost"]`` (``c_t = 1[v > v_max]``, v_max from Safety-Gymnasium v1 unless ``threshold=`` is
given), as ``make_env`` builds it for training; likewise Hopper, Walker2d, Ant, Swimmer and Humanoid.
"""

from __future__ import annotations

import gymnasium as gym

from rl_align.envs.costs import CostConfig, CostWrapper

VELOCITY_TASKS = ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Swimmer", "Humanoid")


def make_velocity_env(task: str, threshold: float | None = None, **kwargs) -> gym.Env:
    """``task`` (a Gymnasium MuJoCo id) under the velocity-cost wrapper. The registered id's own spec adds
    the time limit and checkers, so the inner env is taken unwrapped (no second TimeLimit)."""
    return CostWrapper(gym.make(task, **kwargs).unwrapped, CostConfig(kind="velocity", threshold=threshold))
