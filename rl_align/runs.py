"""Run configs and run folders: resolve presets, build the agent of a config, snapshot config and versions.

A run folder is ``runs/<env>/<agent>/<timestamp>-s<seed>/`` holding ``config.yaml`` (resolved),
``versions.json``, ``progress.csv``, ``tb/`` (TensorBoard events), ``checkpoints/last.pt`` and, when
the run ends, ``summary.json``. An existing folder is never overwritten, and one process at a time writes
a folder (:class:`RunFolderLock`, the file ``.lock`` in it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from rl_align.agents import get_agent
from rl_align.agents.base import AgentConfig
from rl_align.agents.lagrangian import ConstraintConfig, episode_horizon
from rl_align.config import TrainConfig, apply_overrides, build, list_presets, load_preset, read_yaml, to_dict
from rl_align.envs import EnvConfig, Oracle, check_task, make_vec_env, require_cost
from rl_align.checkpoints import disk_message, write_text_atomic
from rl_align.errors import UserError


@dataclass
class RunConfig:
    env_name: str
    agent_name: str
    algo: str
    env: EnvConfig
    agent: AgentConfig
    run: TrainConfig

    def to_dict(self) -> dict:
        return {
            "env_name": self.env_name, "agent_name": self.agent_name, "algo": self.algo,
            "env": to_dict(self.env), "agent": to_dict(self.agent), "run": to_dict(self.run),
        }


def _env_data(name: str) -> tuple[str, dict]:
    found = load_preset("envs", name)
    if found is not None:
        return found
    if "-v" in name and ("/" not in name or name.startswith("dm_control/")):
        check_task(name)
        return name, {"task": name, "description": f"{name} with the default cost and oracle"}
    raise UserError(f"unknown env {name!r}; use a preset ({', '.join(list_presets('envs'))}) or a Gymnasium id such as HalfCheetah-v5")


def agent_preset(name: str) -> tuple[str, dict]:
    found = load_preset("agents", name)
    if found is None:
        raise UserError(f"unknown agent {name!r}; use a preset ({', '.join(list_presets('agents'))}) or a path to a .yaml file")
    preset, data = found
    if "algo" not in data:
        raise UserError(f"agent preset {preset} has no 'algo:' line naming the algorithm (e.g. algo: ppo)")
    return preset, data


def resolve_config(env: str, agent: str, overrides: list[str] = (), steps: int | None = None, seed: int | None = None) -> RunConfig:
    """Preset names (or YAML paths / task ids) + ``section.key=value`` overrides -> validated config.
    A preset's ``run:`` section sets run defaults (e.g. its budget); ``--steps`` / ``--seed`` win."""
    env_name, env_data = _env_data(env)
    agent_name, agent_data = agent_preset(agent)
    agent_data = dict(agent_data)
    algo = agent_data.pop("algo")
    agent_data.pop("description", None)
    run_data = dict(agent_data.pop("run", None) or {})
    env_data = dict(env_data)
    run_data.update({k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None})
    agent_data = switch_rule(agent_data, list(overrides))
    data = apply_overrides({"env": env_data, "agent": agent_data, "run": run_data}, list(overrides))
    return from_data(env_name, agent_name, algo, data)


def switch_rule(agent_data: dict, overrides: list[str]) -> dict:
    """When ``--set agent.constraint.method`` names another rule than the preset's, the preset's constraint
    section keeps only the fields the new rule has (pd -> opd keeps ``lam_lr``; pd -> pid drops it)."""
    section = agent_data.get("constraint")
    chosen = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "agent.constraint.method" and "=" in o]
    if not chosen or not isinstance(section, dict) or chosen[-1] == section.get("method", "none"):
        return agent_data
    return {**agent_data, "constraint": ConstraintConfig.own_fields({**section, "method": chosen[-1]})}


def from_data(env_name: str, agent_name: str, algo: str, data: dict) -> RunConfig:
    _, config_cls = get_agent(algo)
    cfg = RunConfig(
        env_name=env_name, agent_name=agent_name, algo=algo,
        env=build(EnvConfig, data.get("env") or {}, "env"),
        agent=build(config_cls, data.get("agent") or {}, "agent"),
        run=build(TrainConfig, data.get("run") or {}, "run"),
    )
    method = getattr(getattr(cfg.agent, "constraint", None), "method", "none")
    if method != "none":  # a constrained agent: the cost must exist before anything runs
        require_cost(cfg.env.cost, cfg.env.task, f"agent {agent_name} (agent.constraint.method={method})")
    return cfg


def build_agent(cfg: RunConfig):
    """``(agent, env)`` for ``cfg``: the vector env, the oracle and the agent (nothing written to disk;
    nothing loaded: ``train.prepare`` resolves what the agent starts from)."""
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("run.device=cuda but PyTorch sees no CUDA device; use run.device=cpu")
    torch.set_num_threads(cfg.run.torch_threads)
    env = make_vec_env(cfg.env, cfg.agent.n_envs, seed=cfg.run.seed)
    oracle = Oracle(cfg.env.oracle, seed=cfg.run.seed + 7919)
    cls, _ = get_agent(cfg.algo)
    constrained = getattr(getattr(cfg.agent, "constraint", None), "method", "none") != "none"
    budget = {"cost_limit": cfg.env.cost.limit, "horizon": episode_horizon(cfg.env)} if constrained else {}  # d = env.cost.limit
    return cls(cfg.agent, env, seed=cfg.run.seed, device=cfg.run.device, oracle=oracle, total_steps=cfg.run.steps, **budget), env


# agent keys renamed (old -> new), for the agents whose config has the new key: one name for one thing
RENAMED_AGENT_KEYS = {"kl_coef": "revkl_coef", "minibatch": "minibatch_pairs"}


def load_run_config(folder: Path) -> RunConfig:
    """A run folder's saved config. One written before a key was renamed is read under the new name (the
    file is the program's own record of the run; a preset or ``--set`` with the old name is refused)."""
    data = read_yaml(Path(folder) / "config.yaml")
    try:
        agent = data.get("agent") or {}
        fields = dataclasses.fields(get_agent(data["algo"])[1])
        for old, new in RENAMED_AGENT_KEYS.items():
            if new in {f.name for f in fields} and new not in agent and agent.get(old) is not None:
                agent[new] = agent.pop(old)
        if isinstance(agent.get("constraint"), dict):  # written when one config held every rule's fields
            agent["constraint"] = ConstraintConfig.own_fields(agent["constraint"])
        return from_data(data["env_name"], data["agent_name"], data["algo"], data)
    except KeyError as exc:
        raise UserError(f"{folder}/config.yaml lacks {exc}; it is not an rl-align run folder") from None


def versions() -> dict[str, Any]:
    import gymnasium
    import mujoco
    import numpy

    import rl_align

    out = {
        "rl_align": rl_align.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    try:
        here = Path(__file__).resolve().parent
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def create_run_folder(cfg: RunConfig, root: Path | None = None) -> Path:
    """Make a new, empty run folder and write the config and versions. Never reuses a folder."""
    root = Path(root if root is not None else cfg.run.out_dir)
    env_part = cfg.env_name.replace("/", "_")
    base = root / env_part / cfg.agent_name / f"{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.run.seed}"
    folder, k = base, 1
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:
            folder, k = base.with_name(f"{base.name}-{k}"), k + 1
    try:
        (folder / "checkpoints").mkdir()
        write_text_atomic(folder / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text_atomic(folder / "versions.json", json.dumps(versions(), indent=2))
    except OSError:  # a full disk: no half-made run folder is left behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


class RunFolderLock:
    """One writer per run folder: an exclusive ``flock`` on ``<folder>/.lock``, taken before the run writes
    anything and held until :meth:`release` (the end of ``train``) or the end of the process: the OS drops
    it on any exit, SIGKILL included, so a stale lock never blocks a resume. The file holds the holder's pid."""

    NAME = ".lock"

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._file = None

    def acquire(self, folder: Path) -> None:
        folder = Path(folder)
        try:
            f = open(folder / self.NAME, "a+")
        except OSError as exc:
            raise UserError(f"cannot lock the run folder: {disk_message(exc)}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{folder} is being written by another rl-align process (pid {pid}); wait for it to end "
                            f"or stop it, then run rl-align train --resume {folder}") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        except OSError:  # a full disk: the lock holds all the same, only the pid is not recorded
            pass
        self.folder, self._file = folder, f

    def release(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # closing the last descriptor drops the flock
            except OSError:  # the pid never reached a full disk; the descriptor is closed all the same
                pass
            self._file = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
