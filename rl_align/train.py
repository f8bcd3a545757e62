"""The one training loop every agent runs, and deterministic / stochastic evaluation.

config -> VecEnv -> agent.collect (shared buffer) -> agent.update -> logger -> eval -> checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rl_align.agents import get_agent_class
from rl_align.agents.base import Agent, EpisodeTracker
from rl_align.envs import EnvConfig, Oracle, make_vec_env
from rl_align.errors import UserError
from rl_align.logger import Logger, Progress
from rl_align.runs import RunConfig, create_run_folder, load_checkpoint, load_run_config, save_checkpoint, write_text_atomic


class TrainingDiverged(UserError):
    """A loss or parameter became NaN/Inf; the last good checkpoint is kept."""


def build_agent(cfg: RunConfig) -> tuple[Agent, object]:
    """Env + oracle + agent for ``cfg`` (nothing written to disk)."""
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("run.device=cuda but PyTorch sees no CUDA device; use run.device=cpu")
    torch.set_num_threads(cfg.run.torch_threads)
    env = make_vec_env(cfg.env, cfg.agent.n_envs, seed=cfg.run.seed)
    oracle = Oracle(cfg.env.oracle, seed=cfg.run.seed + 7919)
    agent = get_agent_class(cfg.algo)(cfg.agent, env, seed=cfg.run.seed, device=cfg.run.device, oracle=oracle)
    agent.total_steps = cfg.run.steps
    return agent, env


def evaluate(agent: Agent, env_config: EnvConfig, episodes: int, seed: int, deterministic: bool = True) -> dict[str, np.ndarray]:
    """Run ``episodes`` full episodes on fresh envs (seeds ``seed + i``), batched; per-episode
    ``return``, ``cost``, ``length`` arrays. The agent's normalizer is used frozen."""
    out = {"return": [], "cost": [], "length": []}
    done_eps = 0
    while done_eps < episodes:
        n = min(16, episodes - done_eps)
        env = make_vec_env(env_config, n, seed=seed + done_eps)
        obs = env.reset()
        alive = np.ones(n, bool)
        ret, cost, length = np.zeros(n), np.zeros(n), np.zeros(n, int)
        gen_state = agent.act_rng.bit_generator.state
        actor = agent.actor()
        while alive.any():
            step = env.step(agent.act(obs, deterministic=deterministic, actor=actor))
            ret += step.rewards * alive
            cost += step.costs * alive
            length += alive
            alive &= ~(step.terminated | step.truncated)
            obs = step.obs
        agent.act_rng.bit_generator.state = gen_state  # evaluation never shifts the training random stream
        env.close()
        out["return"] += list(ret)
        out["cost"] += list(cost)
        out["length"] += list(length)
        done_eps += n
    return {k: np.asarray(v) for k, v in out.items()}


def rollout_segments(agent: Agent, env_config: EnvConfig, episodes: int, H: int, seed: int, deterministic: bool = False) -> dict[tuple[int, int], dict]:
    """Windows of ``H`` steps from ``episodes`` fresh episodes (env seeds ``seed + i``), keyed by
    ``(episode, window)`` so two policies' segments can be matched; windows end before termination.
    Each value holds ``obs`` (raw), ``actions``, ``rewards``, ``costs``, ``features`` for that window."""
    env = make_vec_env(env_config, episodes, seed=seed)
    obs = env.reset()
    alive = np.ones(episodes, bool)
    rec = {k: [] for k in ("obs", "actions", "rewards", "costs", "features")}
    steps = np.zeros(episodes, int)
    gen_state = agent.act_rng.bit_generator.state
    actor = agent.actor()
    while alive.any():
        action = agent.act(obs, deterministic=deterministic, actor=actor)
        step = env.step(action)
        for k, v in (("obs", obs), ("actions", action), ("rewards", step.rewards), ("costs", step.costs), ("features", step.features)):
            rec[k].append(np.asarray(v))
        steps += alive
        alive &= ~(step.terminated | step.truncated)
        obs = step.obs
    agent.act_rng.bit_generator.state = gen_state
    env.close()
    arr = {k: np.stack(v, axis=1) for k, v in rec.items()}  # [episodes, T, ...]
    return {(e, w): {k: a[e, w * H:(w + 1) * H] for k, a in arr.items()} for e in range(episodes) for w in range(steps[e] // H)}


def win_rate(agent: Agent, other: Agent, env_config: EnvConfig, oracle: Oracle, episodes: int, H: int, seed: int,
             deterministic: bool = False) -> float:
    """Mean ``P(segment of agent > matched segment of other)`` under ``oracle`` (no label noise, no query
    spent): both play the same env seeds, windows matched by episode and position."""
    a = rollout_segments(agent, env_config, episodes, H, seed, deterministic)
    b = rollout_segments(other, env_config, episodes, H, seed, deterministic)
    keys = sorted(set(a) & set(b))
    if not keys:
        return float("nan")
    stack = lambda segs: SimpleNamespace(**{k: np.stack([segs[key][k] for key in keys]) for k in segs[keys[0]]})  # noqa: E731
    return float(oracle.preference_prob(stack(a), stack(b)).mean())


def eval_metrics(agent: Agent, cfg: RunConfig) -> dict[str, float]:
    """``eval/`` scalars: deterministic and stochastic return (each over ``run.eval_episodes`` episodes with
    distinct reset seeds, with their spread), episode cost and violation."""
    m: dict[str, float] = {"eval/episodes": float(cfg.run.eval_episodes)}
    for mode, det in (("det", True), ("stoch", False)):
        res = evaluate(agent, cfg.env, cfg.run.eval_episodes, seed=cfg.run.seed + 100_000, deterministic=det)
        m[f"eval/return_{mode}"] = float(res["return"].mean())
        m[f"eval/return_{mode}_std"] = float(res["return"].std())
        m[f"eval/cost_{mode}"] = float(res["cost"].mean())
    m["eval/violation"] = max(0.0, m["eval/cost_det"] - cfg.env.cost.limit)
    m["eval/length"] = float(res["length"].mean())
    if hasattr(agent, "eval_extra"):
        m.update(agent.eval_extra(cfg))
    return m


def check_finite(agent: Agent, metrics: dict[str, float], step: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v) and not k.startswith(("train/explained_variance", "pl/", "pref/", "grad/")):
            raise TrainingDiverged(f"{k} became {v} at env step {step}; lower agent.lr or check the config (last good checkpoint kept)")
    for name, module in agent.modules().items():
        for pname, p in getattr(module, "named_parameters", lambda: [])():
            if not torch.isfinite(p).all():
                raise TrainingDiverged(f"parameter {name}.{pname} became NaN/Inf at env step {step}; lower agent.lr (last good checkpoint kept)")


class Interrupted(Exception):
    """Ctrl-C / SIGTERM arrived: the current iteration was finished, a checkpoint written, logs flushed."""

    def __init__(self, signum: int, folder: Path, step: int) -> None:
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        name = signal.Signals(signum).name
        super().__init__(f"{name} at env step {step:,}: checkpoint written; continue with: rl-align train --resume {folder}")


class StopSignals:
    """While active (main thread only), SIGINT / SIGTERM set ``signum`` instead of killing the process;
    the loop checks it at each iteration boundary. A second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    active = 0  # a run nested in another (the auto reference) leaves the signals to the outer run

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread() and StopSignals.active == 0:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        StopSignals.active += 1
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        StopSignals.active -= 1
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _loop_checkpoint(folder: Path, agent: Agent, env, obs: np.ndarray, tracker: EpisodeTracker, loop: dict) -> None:
    """Agent state plus everything the loop needs to continue exactly: env state and observations, torch
    RNG, episode tracker, eval/checkpoint counters. Written only at iteration boundaries."""
    state = agent.state_dict()
    state["loop"] = {
        **loop, "env": env.get_state(), "obs": torch.as_tensor(obs), "torch_rng": torch.get_rng_state(),
        "tracker": {"ret": torch.as_tensor(tracker.ret), "cost": torch.as_tensor(tracker.cost), "len": torch.as_tensor(tracker.len)},
        "arrays": {k: torch.as_tensor(v) for k, v in vars(agent).items() if isinstance(v, np.ndarray) and k not in ("act_low", "act_high")},
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
    Everything that can fail on bad input is built before the folder is made. SIGINT / SIGTERM are
    deferred from the start to the end of the current iteration (see :class:`Interrupted`)."""
    with StopSignals() as stop:
        return _train(cfg, folder, quiet, resume, stop)


def _train(cfg: RunConfig, folder: Path | None, quiet: bool, resume: bool, stop: StopSignals) -> tuple[Path, dict]:
    agent, env = build_agent(cfg)
    if hasattr(agent, "prepare"):
        agent.prepare(cfg)
    saved = None
    if resume:
        saved = load_checkpoint(folder)
        if "loop" not in saved:
            raise UserError(f"{folder}/checkpoints/last.pt holds no training-loop state (not written by an interruptible run); start a new run")
        agent.load_state_dict(saved)
        _truncate_progress(Path(folder) / "progress.csv", agent.env_steps)
    folder = create_run_folder(cfg) if folder is None else Path(folder)
    logger = Logger(folder)
    run = cfg.run
    ckpt_every = run.checkpoint_every or max(1, run.steps // 10)
    progress = Progress(run.steps, start=agent.env_steps, enabled=run.progress and not quiet)
    t_start = time.perf_counter()
    history: deque = deque(maxlen=100)
    agent.episode_history = history
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
        for k, v in saved["loop"]["arrays"].items():
            setattr(agent, k, v.numpy().copy())
        torch.set_rng_state(saved["loop"]["torch_rng"])
    wall_before = loop["wall_time_s"]

    def checkpoint() -> None:
        loop.update(history=list(history), wall_time_s=wall_before + time.perf_counter() - t_start)
        _loop_checkpoint(folder, agent, env, obs, tracker, loop)

    notes: list[str] = []
    try:
        while agent.env_steps < run.steps:
            t0 = time.perf_counter()
            obs = agent.collect(env, obs, tracker)
            t_collect = time.perf_counter() - t0
            agent.last_episodes = tracker.pop()
            history.extend(agent.last_episodes)
            metrics = agent.update()
            loop["iteration"] += 1
            check_finite(agent, metrics, agent.env_steps)
            loop["labelled"] = loop["labelled"] or not metrics.get("train/skipped")
            if not loop["labelled"] and not notes and agent.oracle is not None and agent.oracle.remaining() == 0:
                notes.append(f"the oracle's query budget (env.oracle.budget={agent.oracle.config.budget}) was spent before the first "
                             "update, so the policy does not change; raise env.oracle.budget")
                print(f"rl-align: note: {notes[-1]}", file=sys.stderr)
            dt = time.perf_counter() - t0
            steps_it = agent.buffer.T * agent.buffer.N
            logger.record_dict(metrics)
            logger.record("time/sps", steps_it / dt)
            logger.record("time/collect_fraction", t_collect / dt)
            logger.record("rollout/x_velocity", float(agent.buffer.features[..., 0].mean()))
            if agent.last_episodes:
                eps = np.asarray(agent.last_episodes)
                logger.record("rollout/ep_return", eps[:, 0].mean())
                logger.record("rollout/ep_cost", eps[:, 1].mean())
                logger.record("rollout/ep_length", eps[:, 2].mean())
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
    finally:
        progress.close()
        env.close()
    final = eval_metrics(agent, cfg)
    logger.record_dict(final)
    logger.dump(agent.env_steps)
    logger.close()
    loop["finished"] = True
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
    return folder, summary
