"""The one training loop every agent runs, and what it hands the agents: the resolved start policy (the
auto reference trained here when needed) and each rollout's finished episodes.

config -> VecEnv -> agent.collect (shared buffer) -> agent.update(episodes) -> logger -> evaluation -> checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import signal
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from rl_align.agents.base import Agent, EpisodeTracker
from rl_align.checkpoints import disk_message, load_checkpoint, save_checkpoint, write_text_atomic
from rl_align.config import PRESET_ROOT, to_dict
from rl_align.errors import DiskFault, Interrupted, UserError
from rl_align.evaluation import eval_metrics
from rl_align.logger import Logger, Progress
from rl_align.runs import RunConfig, RunFolderLock, agent_preset, build_agent, create_run_folder, from_data, load_run_config
from rl_align.signals import DeferredSignals


class TrainingDiverged(UserError):
    """A loss or parameter became NaN/Inf; the last good checkpoint is kept."""


def prepare(agent: Agent, cfg: RunConfig) -> None:
    """Hand the agent what it starts from: its ``start_spec()`` resolved to weights (``auto``: the shipped
    or cached PPO reference, trained here once if needed; ``sb3:<zip>``: read without unpickling)."""
    spec = agent.start_spec()
    if spec is None:
        agent.prepare(None)
        return
    if spec == "auto" and not hasattr(cfg.agent, "ref_agent"):
        raise UserError(f"agent {cfg.agent_name} cannot start from 'auto' (only preference agents have an auto reference); give a run folder")
    source = str(auto_reference(cfg) if spec == "auto" else spec)
    if source.startswith("sb3:"):
        from rl_align.sb3 import agent_state

        state = agent_state(source[len("sb3:"):], agent)
    else:
        state = load_checkpoint(source)
    agent.prepare(state, source)


def auto_reference(cfg: RunConfig) -> Path:
    """The "SFT" reference for this env, seed and network: a short PPO run on the true reward. A policy
    shipped in the repository's ``refs/`` folder under the same key is used first (so every machine starts
    from the same weights); otherwise it is trained once into ``<out_dir>/_refs/<env>-<key>-s<seed>`` and
    reused by every later run. The key covers what PPO on the true reward depends on: the task and its
    episode limit, the reference preset, the network, the step budget and the seed (not the cost or the
    oracle, which it never uses)."""
    c = cfg.agent
    _, ref_data = agent_preset(c.ref_agent)
    ref_data = {k: v for k, v in ref_data.items() if k not in ("algo", "description", "run")}
    ref_data.update(hidden=list(c.hidden), activation=c.activation)  # same network as the preference agent
    env_key = {"task": cfg.env.task, "max_episode_steps": cfg.env.max_episode_steps}
    key_data = {"env": env_key, "agent": ref_data, "ref_agent": c.ref_agent, "steps": c.ref_steps, "seed": cfg.run.seed}
    digest = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{cfg.env.task.replace('/', '_')}-{digest}-s{cfg.run.seed}"
    shipped = PRESET_ROOT / "refs" / f"{name}.pt"
    if shipped.exists():
        print(f"reference: the shipped policy {shipped.relative_to(PRESET_ROOT)}", file=sys.stderr)
        return shipped
    folder = Path(cfg.run.out_dir) / "_refs" / name
    if (folder / "summary.json").exists():
        print(f"reference: reusing {folder}", file=sys.stderr)
        return folder
    print(f"reference: training {c.ref_agent} for {c.ref_steps:,} steps on the true reward (once; cached in {folder})", file=sys.stderr)
    ref_cfg = from_data(cfg.env_name, f"ref-{c.ref_agent}", "ppo", {
        "env": to_dict(cfg.env), "agent": ref_data,
        "run": {"steps": c.ref_steps, "seed": cfg.run.seed, "out_dir": str(folder.parent), "progress": False,
                "eval_episodes": cfg.run.eval_episodes, "device": cfg.run.device},
    })
    tmp, _ = train(ref_cfg, quiet=True)
    if folder.exists():  # another process finished the same reference meanwhile
        return folder
    tmp.rename(folder)
    return folder


def check_finite(agent: Agent, metrics: dict[str, float], step: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v) and not k.startswith(("train/explained_variance", "pl/", "pref/", "grad/")):
            raise TrainingDiverged(f"{k} became {v} at env step {step}; lower agent.lr or check the config (last good checkpoint kept)")
    for name, module in agent.modules().items():
        for pname, p in getattr(module, "named_parameters", lambda: [])():
            if not torch.isfinite(p).all():
                raise TrainingDiverged(f"parameter {name}.{pname} became NaN/Inf at env step {step}; lower agent.lr (last good checkpoint kept)")


def _disk_fault(exc: OSError, folder: Path, checkpoint) -> DiskFault:
    try:
        checkpoint()
        kept = "a checkpoint of this point was written"
    except OSError:
        kept = "the last checkpoint is kept" if (folder / "checkpoints" / "last.pt").exists() else "no checkpoint could be written"
    return DiskFault(f"{disk_message(exc)}; {kept}; then continue with: rl-align train --resume {folder}")


def _loop_checkpoint(folder: Path, agent: Agent, env_state: list | None, obs: np.ndarray, tracker: EpisodeTracker, loop: dict) -> None:
    """The agent's own ``state_dict`` plus everything the loop needs to continue exactly: env state and
    observations, torch RNG, episode tracker, eval/checkpoint counters. Written only at iteration boundaries."""
    state = agent.state_dict()
    state["loop"] = {
        **loop, "env": env_state, "obs": torch.as_tensor(obs), "torch_rng": torch.get_rng_state(),
        "tracker": {"ret": torch.as_tensor(tracker.ret), "cost": torch.as_tensor(tracker.cost), "len": torch.as_tensor(tracker.len)},
    }
    save_checkpoint(folder / "checkpoints" / "last.pt", state)


def _truncate_progress(path: Path, step: int) -> None:
    """Drop CSV rows logged after the checkpoint (a hard kill between checkpoints) before appending."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        keys, rows = list(reader.fieldnames or []), [r for r in reader if float(r["step"]) <= step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def resume(folder: Path, quiet: bool = False) -> tuple[Path, dict]:
    """Continue the run in ``folder`` from ``checkpoints/last.pt``; a finished run returns its summary."""
    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        raise UserError(f"{folder} is not a run folder (no config.yaml); give the folder `rl-align train` printed")
    if (folder / "summary.json").exists():
        return folder, json.loads((folder / "summary.json").read_text())
    cfg = load_run_config(folder)
    return train(cfg, folder=folder, quiet=quiet, resume=True)


def train(cfg: RunConfig, folder: Path | None = None, quiet: bool = False, resume: bool = False) -> tuple[Path, dict]:
    """Train ``cfg`` into a new run folder (or ``folder``); returns ``(folder, summary)``. With
    ``resume``, continue ``folder`` from its last checkpoint exactly as if never stopped.
    Everything that can fail on bad input is built before the folder is made, and the folder is locked
    for this process (:class:`RunFolderLock`) before any log or checkpoint is written. SIGINT / SIGTERM are
    deferred from the start to the end of the current iteration (see :class:`Interrupted`)."""
    with DeferredSignals("run") as stop, RunFolderLock() as lock:
        try:
            return _train(cfg, folder, quiet, resume, stop, lock)
        except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM while the first was being handled
            if not stop.owner:
                raise
            raise Interrupted(stop.signum or signal.SIGINT, lock.folder, None) from None


def _train(cfg: RunConfig, folder: Path | None, quiet: bool, resume: bool, stop: DeferredSignals,
           lock: RunFolderLock) -> tuple[Path, dict]:
    agent, env = build_agent(cfg)
    prepare(agent, cfg)
    folder = create_run_folder(cfg) if folder is None else Path(folder)
    lock.acquire(folder)  # one writer per run folder: a second train --resume of it is refused in one line
    saved = None
    if resume:
        if (folder / "summary.json").exists():  # finished by another process since resume() looked
            env.close()
            return folder, json.loads((folder / "summary.json").read_text())
        saved = load_checkpoint(folder)
        if "loop" not in saved:
            raise UserError(f"{folder}/checkpoints/last.pt holds no training-loop state (not written by an interruptible run); start a new run")
        agent.load_state_dict(saved)
        _truncate_progress(Path(folder) / "progress.csv", agent.env_steps)
    logger = Logger(folder)
    run = cfg.run
    ckpt_every = run.checkpoint_every or max(1, run.steps // 10)
    progress = Progress(run.steps, start=agent.env_steps, enabled=run.progress and not quiet)
    t_start = time.perf_counter()
    history: deque = deque(maxlen=100)
    tracker = EpisodeTracker(env.n_envs)
    obs = env.reset()
    if saved is None:
        first_eval = eval_metrics(agent, cfg)
        logger.record_dict(first_eval)
        logger.dump(0)
        loop = {"next_eval": run.eval_every or run.steps + 1, "next_ckpt": ckpt_every, "iteration": 0,
                "first_eval": first_eval, "wall_time_s": 0.0, "history": [], "labelled": False}
    else:
        loop = {k: saved["loop"][k] for k in ("next_eval", "next_ckpt", "iteration", "first_eval", "wall_time_s", "history")}
        loop["labelled"] = saved["loop"].get("labelled", True)
        history.extend(tuple(e) for e in loop["history"])
        first_eval = loop["first_eval"]
        if saved["loop"]["env"] is not None:
            env.set_state(saved["loop"]["env"])
            obs = saved["loop"]["obs"].numpy().copy()
        tracker.ret, tracker.cost, tracker.len = (saved["loop"]["tracker"][k].numpy().copy() for k in ("ret", "cost", "len"))
        torch.set_rng_state(saved["loop"]["torch_rng"])
    wall_before = loop["wall_time_s"]

    closed_state: list = []  # the envs' state when they were closed (a DeepMind Control env frees its physics)

    def checkpoint() -> None:
        loop.update(history=list(history), wall_time_s=wall_before + time.perf_counter() - t_start)
        _loop_checkpoint(folder, agent, closed_state[0] if closed_state else env.get_state(), obs, tracker, loop)

    notes: list[str] = []
    try:
        while agent.env_steps < run.steps:
            t0, steps_before = time.perf_counter(), agent.env_steps
            obs = agent.collect(env, obs, tracker)
            t_collect = time.perf_counter() - t0
            episodes = tracker.pop()
            history.extend(episodes)
            metrics = agent.update(episodes)
            loop["iteration"] += 1
            check_finite(agent, metrics, agent.env_steps)
            loop["labelled"] = loop["labelled"] or not metrics.get("train/skipped")
            if not loop["labelled"] and not notes and agent.oracle is not None and agent.oracle.remaining() == 0:
                notes.append(f"the oracle's query budget (env.oracle.budget={agent.oracle.config.budget}) was spent before the first "
                             "update, so the policy does not change; raise env.oracle.budget")
                print(f"rl-align: note: {notes[-1]}", file=sys.stderr)
            dt = time.perf_counter() - t0
            logger.record_dict(metrics)
            logger.record("time/sps", (agent.env_steps - steps_before) / dt)
            logger.record("time/collect_fraction", t_collect / dt)
            logger.record("rollout/x_velocity", float(agent.iteration_features()[..., 0].mean()))
            if agent.oracle is not None and agent.oracle.queries:
                logger.record("train/queries_used", float(agent.oracle.queries))
            if episodes:
                eps = np.asarray(episodes)
                logger.record("rollout/ep_return", eps[:, 0].mean())
                logger.record("rollout/ep_cost", eps[:, 1].mean())
                logger.record("rollout/ep_length", eps[:, 2].mean())
            if agent.env_steps >= run.steps:
                break  # the final evaluation joins this row and the final checkpoint follows: one row per step
            if agent.env_steps >= loop["next_eval"]:
                logger.record_dict(eval_metrics(agent, cfg))
                loop["next_eval"] += run.eval_every
            logger.dump(agent.env_steps)
            if agent.env_steps >= loop["next_ckpt"]:
                loop["next_ckpt"] += ckpt_every
                checkpoint()
            if stop.signum is not None:
                checkpoint()
                logger.close()
                raise Interrupted(stop.signum, folder, agent.env_steps)
            recent = np.asarray(history) if history else None
            progress.update(
                agent.env_steps,
                **{"return": recent[-10:, 0].mean() if recent is not None else None,
                   "cost": recent[-10:, 1].mean() if recent is not None else None},
                **(agent.oracle.feed.progress() if agent.oracle is not None and agent.oracle.feed is not None else {}),  # a label store's
            )
    except OSError as exc:  # a full or read-only disk mid-run
        raise _disk_fault(exc, folder, checkpoint) from None
    finally:
        progress.close()
        closed_state.append(env.get_state())
        env.close()
    try:
        if saved is not None and "final" in saved["loop"]:  # stopped after the final row was logged: not logged twice
            final = saved["loop"]["final"]
        else:
            final = eval_metrics(agent, cfg)
            logger.record_dict(final)
            logger.dump(agent.env_steps)
        logger.close()
        loop.update(finished=True, final=final)
        checkpoint()
        wall = wall_before + time.perf_counter() - t_start
        summary = {
            "env": cfg.env_name, "agent": cfg.agent_name, "algo": cfg.algo, "seed": run.seed,
            "env_steps": agent.env_steps, "wall_time_s": wall, "iterations": loop["iteration"],
            "initial": first_eval, "final": final,
            "queries_used": agent.oracle.queries if agent.oracle is not None else 0,
            "eval_episodes": run.eval_episodes, "notes": notes,
        }
        write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2))
    except OSError as exc:
        raise _disk_fault(exc, folder, checkpoint) from None
    return folder, summary
