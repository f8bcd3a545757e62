"""Per-step costs written to ``info["cost"]``, and the per-step features preference oracles score.

Velocity cost as in Safety-Gymnasium's velocity tasks: ``c_t = 1[v > v_max]`` with ``v`` the forward
x-velocity (Ant, Humanoid: planar speed); on a task with no default threshold and none given the cost
is unavailable (nan), and only a run that uses it (a constrained agent) is refused. Energy cost:
``c_t = ||a_t||^2``. A user cost is any callable ``f(env, action, info) -> float`` named by a dotted
path ``package.module:function``.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np

from rl_align.errors import UserError

# Safety-Gymnasium v1 velocity thresholds (safety_gymnasium/tasks/safe_velocity), by task family.
VELOCITY_THRESHOLDS = {
    "HalfCheetah": 3.2096,
    "Hopper": 0.7402,
    "Walker2d": 2.3415,
    "Ant": 2.6222,
    "Swimmer": 0.2282,
    "Humanoid": 1.4149,
}
PLANAR_SPEED_TASKS = ("Ant", "Humanoid")
FEATURE_NAMES = ("x_velocity", "height", "ctrl_energy")


def task_family(task_id: str) -> str:
    """``"HalfCheetah-v5" -> "HalfCheetah"``."""
    return task_id.split("-")[0].split("/")[-1]


def load_dotted(path: str, what: str) -> Callable:
    """Import ``package.module:name`` (or ``package.module.name``) and return the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot load {what} {path!r} ({exc}); give it as package.module:function") from None
    if not callable(obj):
        raise UserError(f"{what} {path!r} is not callable; name a function as package.module:function")
    return obj


def velocity_threshold(config: "CostConfig", family: str) -> float | None:
    """The velocity cost's threshold: the configured one, else the Safety-Gymnasium default of the task
    family, else None (the cost is unavailable; only a run that uses the cost needs one)."""
    return config.threshold if config.threshold is not None else VELOCITY_THRESHOLDS.get(family)


def require_cost(config: "CostConfig", task: str, why: str) -> None:
    """One-line error when ``why`` (a constraint, a cost report) needs a cost that ``task`` cannot give."""
    family = task_family(task)
    if config.kind == "velocity" and velocity_threshold(config, family) is None:
        raise UserError(f"{why} needs the episode cost, but {family} has no default velocity threshold; set "
                        f"env.cost.threshold=<speed> (defaults exist for {', '.join(VELOCITY_THRESHOLDS)})")


_NOTED: set[str] = set()


def _note_once(text: str) -> None:
    if text not in _NOTED:
        _NOTED.add(text)
        print(f"rl-align: note: {text}", file=sys.stderr)


@dataclass
class CostConfig:
    """Which cost ``info["cost"]`` carries and the per-episode limit ``d`` constrained agents respect."""

    kind: str = "velocity"  # velocity | energy | none | package.module:function
    threshold: float | None = None  # velocity threshold; None: the Safety-Gymnasium default of the task
    limit: float = 25.0  # episode cost limit d (per 1000-step episode)

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold < 0:
            raise UserError(f"env.cost.threshold must be >= 0, got {self.threshold}")
        if self.limit < 0:
            raise UserError(f"env.cost.limit must be >= 0, got {self.limit}")


def dm_physics(env: gym.Env):
    """The dm_control ``Physics`` behind a Shimmy-wrapped DeepMind Control env, or None."""
    return getattr(getattr(env.unwrapped, "_env", None), "physics", None)


def mj_model_data(env: gym.Env):
    """``(MjModel, MjData)`` of a Gymnasium MuJoCo env or of a DeepMind Control env through Shimmy."""
    physics = dm_physics(env)
    if physics is not None:
        return physics.model.ptr, physics.data.ptr
    return env.unwrapped.model, env.unwrapped.data


class CostWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Adds ``info["cost"]`` (float) and ``info["features"]`` (``[3]``: x-velocity, torso height,
    ``||a||^2``) to every step of a Gymnasium MuJoCo env."""

    def __init__(self, env: gym.Env, config: CostConfig) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, config=config)
        gym.Wrapper.__init__(self, env)
        self.config = config
        self.family = task_family(env.spec.id if env.spec is not None else "")
        self.threshold = velocity_threshold(config, self.family)
        self.cost_available = config.kind != "velocity" or self.threshold is not None
        if not self.cost_available:
            _note_once(f"{self.family} has no default velocity threshold: its episode cost is reported as nan "
                       f"(unavailable); set env.cost.threshold=<speed> to measure it")
        self.user_cost = None
        if config.kind not in ("velocity", "energy", "none"):
            self.user_cost = load_dotted(config.kind, "cost function")
        model, self._data = mj_model_data(self.env)
        self._has_torso = "torso" in [model.body(i).name for i in range(model.nbody)]
        # DeepMind Control has no x_velocity in info: the torso's forward speed, read from the physics
        self._dm = dm_physics(self.env) is not None
        self._x = (lambda: float(self._data.body("torso").xpos[0])) if self._dm and self._has_torso else (lambda: float(self._data.qpos[0]))

    def _velocity(self, info: dict, x_before: float) -> float:
        if self.family in PLANAR_SPEED_TASKS and "y_velocity" in info:
            return float(np.hypot(info["x_velocity"], info["y_velocity"]))
        if "x_velocity" in info:
            return float(info["x_velocity"])
        return float((self._x() - x_before) / self.env.unwrapped.dt)

    def step(self, action):
        x_before = self._x()
        obs, reward, terminated, truncated, info = self.env.step(action)
        speed = self._velocity(info, x_before)
        x_velocity = float(info["x_velocity"]) if "x_velocity" in info else speed
        energy = float(np.sum(np.square(action)))
        kind = self.config.kind
        if kind == "velocity":
            cost = float(speed > self.threshold) if self.cost_available else math.nan
        elif kind == "energy":
            cost = energy
        elif kind == "none":
            cost = 0.0
        else:
            cost = float(self.user_cost(self.env, action, info))
        height = float(self._data.body("torso").xpos[2]) if self._has_torso else 0.0
        info["cost"] = cost
        info["features"] = np.array([x_velocity, height, energy], dtype=np.float32)
        return obs, reward, terminated, truncated, info
