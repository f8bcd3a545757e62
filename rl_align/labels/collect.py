"""Fill a label store and answer it without a person.

- :func:`collect_pairs`: pairs of segments from a policy's stochastic rollouts (the shared buffer's
  ``segments`` and ``pairs``), queued in a store (``rl-align label collect``), clips rendered unless asked not to;
- :func:`answer_queued`: the synthetic stand-in for a person (``rl-align label answer``): any built-in oracle
  answers the queued pairs through the same store path as the page, optionally at a human-like rate.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from rl_align.buffer import Segments
from rl_align.envs.oracles import Oracle, OracleConfig
from rl_align.errors import UserError
from rl_align.labels.store import SEGMENT_FIELDS, AnswerConflict, LabelStore

DEFAULT_PROMPT = "Which clip shows more of what you want? Use the arrow keys: left, right, up for equal, down if you can't tell."


def collect_from_agent(agent, env_config, store: LabelStore, n_pairs: int, seed: int, segment_len: int,
                       per_rollout: float = 1.0) -> list[int]:
    """Queue ``n_pairs`` pairs of ``segment_len``-step segments from ``agent``'s stochastic rollouts on fresh
    envs (seeds ``seed + i``), at most ``per_rollout`` times as many pairs from one rollout as it has segments
    (each segment in about ``2 * per_rollout`` pairs: many pairs of few segments teach little); the agent's
    normalizer stays frozen. Returns the pair ids."""
    from rl_align.agents.base import EpisodeTracker
    from rl_align.envs import make_vec_env
    from rl_align.labels.learn import segment_arrays

    if segment_len > agent.buffer.T:
        raise UserError(f"--segment-len {segment_len} is longer than the agent's rollout ({agent.buffer.T} steps per env)")
    agent.freeze_normalizer()
    env = make_vec_env(env_config, agent.buffer.N, seed=seed)
    obs, ids = env.reset(), []
    tracker = EpisodeTracker(agent.buffer.N)
    try:
        while len(ids) < n_pairs:
            obs = agent.collect(env, obs, tracker)
            seg = agent.buffer.segments(segment_len)
            if len(seg) < 2:
                continue
            i, j = agent.buffer.pairs(len(seg), min(n_pairs - len(ids), max(1, int(per_rollout * len(seg)))), agent.rng)
            ids += store.add_pairs(segment_arrays(agent, seg), i, j, source=f"collect@{agent.env_steps}")
    finally:
        env.close()
    return ids


def collect_pairs(run: Path, store_path: Path, n_pairs: int, segment_len: int | None = None, seed: int = 0,
                  prompt: str | None = None, render: bool = True, out=sys.stdout) -> LabelStore:
    """``rl-align label collect``: ``n_pairs`` pairs from the run's policy into ``store_path`` (created if new).
    Everything that can be refused (the counts, the segment length against the run's rollout, the store's task
    and length, the clip writer, a folder that cannot be written) is checked before the store is touched."""
    from rl_align.evaluation import load_agent

    if n_pairs < 1:
        raise UserError(f"--pairs must be >= 1, got {n_pairs}")
    if segment_len is not None and segment_len < 1:
        raise UserError(f"--segment-len must be >= 1, got {segment_len}")
    cfg, agent = load_agent(Path(run))
    H = segment_len if segment_len is not None else getattr(cfg.agent, "segment_len", 50)
    if H > agent.buffer.T:
        raise UserError(f"--segment-len {H} is longer than the run's rollout ({agent.buffer.T} steps per env); give at most {agent.buffer.T}")
    if store_path.exists():
        store = LabelStore(store_path)
        if store.meta["task"] != cfg.env.task or store.segment_len != H:
            raise UserError(f"{store_path} holds {store.segment_len}-step segments of {store.meta['task']}; "
                            f"this run gives {H}-step segments of {cfg.env.task}: use another --store")
    else:
        if render:
            from rl_align.labels.render import check_writer

            check_writer()
        from rl_align.envs import make_env

        probe = make_env(cfg.env)
        fps = 1.0 / probe.unwrapped.dt
        probe.close()
        store = LabelStore.create(store_path, cfg.env.task, prompt or DEFAULT_PROMPT, H, fps)
    t0 = time.perf_counter()
    ids = collect_from_agent(agent, cfg.env, store, n_pairs, seed=seed + 400_000, segment_len=H)
    print(f"queued {len(ids)} pairs of {H}-step segments in {store_path} ({time.perf_counter() - t0:.1f} s)", file=out)
    if render:
        from rl_align.labels.render import ClipRenderer, ensure_clips

        renderer, t0 = ClipRenderer(cfg.env.task), time.perf_counter()
        for k, pair in enumerate(store.queued(limit=len(ids) + store.counts()["queued"])):
            if pair["id"] in ids:
                ensure_clips(store, renderer, pair)
            if (k + 1) % 20 == 0:
                print(f"  clips of {k + 1} pairs rendered", file=out)
        renderer.close()
        print(f"rendered clips in {time.perf_counter() - t0:.1f} s ({(time.perf_counter() - t0) / len(ids):.2f} s per pair)", file=out)
    return store


def _segments(side: dict[str, np.ndarray]) -> Segments:
    """One stored segment as a batch of one :class:`Segments` (the store keeps raw observations)."""
    return Segments.of(raw_obs=side["obs"][None], **{f: side[f][None] for f in SEGMENT_FIELDS if f != "obs"})


def answer_queued(store: LabelStore, oracle: Oracle, labeller: str, interval: float = 0.0, limit: int | None = None,
                  follow: bool = False, poll: float = 0.5, out=None, client: str | None = None, lease: float | None = None) -> int:
    """Answer queued pairs with ``oracle`` (1 -> left, 0 -> right, 1/2 -> equal, skipped -> skip), claiming one
    pair at a time (a lease of ``lease`` seconds, default ``2 * interval + 60``, as ``labeller`` on ``client``,
    default this process), so other labellers of the store get other pairs; waits ``interval`` seconds before
    each answer; ``follow`` keeps waiting for new pairs. Returns the count of answers stored."""
    names = {1.0: "left", 0.0: "right", 0.5: "equal"}
    client = f"pid{os.getpid()}" if client is None else client
    lease = 2 * interval + 60.0 if lease is None else lease
    done = 0
    while limit is None or done < limit:
        pair = store.claim(labeller, client, lease)
        if pair is None:
            if not follow:
                break
            time.sleep(poll)
            continue
        value = float(oracle.label(_segments(store.segment(pair["seg1"])), _segments(store.segment(pair["seg2"])))[0])
        if interval > 0:
            time.sleep(interval)
        try:
            store.set_label(pair["id"], names.get(value, "skip"), labeller, client)
        except AnswerConflict:  # our lease ran out and someone else answered it first: theirs counts
            continue
        done += 1
        if out is not None and done % 50 == 0:
            print(f"answered {done} pairs", file=out)
    return done


def synthetic_oracle(score: str, temperature: float, seed: int) -> Oracle:
    """A Bradley-Terry teacher on ``score`` (reward, forward, backward or package.module:function)."""
    return Oracle(OracleConfig(kind="bradley-terry", score=score, temperature=temperature), seed=seed)
