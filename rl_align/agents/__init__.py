"""One registry of agents: ``algo`` name -> (agent class, config dataclass)."""

from __future__ import annotations

import importlib

from rl_align.errors import UserError

REGISTRY: dict[str, tuple[type, type]] = {}
_MODULES = ("ppo", "sail", "rlhf", "comal", "sac")  # imported lazily so one broken module breaks only itself


def register(name: str, config_cls: type | None = None):
    """Class decorator: ``@register("ppo")`` makes the agent available as ``algo: ppo`` with its
    ``config_cls``; ``register("rlhf", RLHFConfig)(PPO)`` registers a class under another config (the
    config builds the components that make the difference)."""

    def wrap(cls: type) -> type:
        REGISTRY[name] = (cls, config_cls or cls.config_cls)
        return cls

    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"rl_align.agents.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rl_align.agents.{mod}":
                raise


def get_agent(algo: str) -> tuple[type, type]:
    """``(agent class, config dataclass)`` of ``algo``."""
    _load_all()
    if algo not in REGISTRY:
        raise UserError(f"unknown algorithm {algo!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[algo]
