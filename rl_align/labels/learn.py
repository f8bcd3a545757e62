"""How the agents learn from a label store (``env.oracle.kind: human``).

A person labels late and slowly, so nothing here waits: each update reads the labels that have arrived
(``Oracle.feed``) and, online (``env.oracle.post_pairs > 0``, as Christiano et al. 2017), first queues
pairs of the current rollout for labelling, spending the oracle's query budget.

- The SAIL family's DPO part, ``E[log sigmoid(h_w - h_l)]`` with
  ``h(s) = beta * sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)]`` (docs/design.md, "SAIL, SAIL-RevKL and online DPO"), runs on stored
  labelled pairs (the newest first, then a uniform sample of the older ones), with the reverse KL on their
  states. The shift part is on-policy by definition and a person's labels are of earlier policies, so it is
  off: with a label store the agent is offline / asynchronous DPO(-RevKL).
- RLHF's Bradley-Terry reward model adds the arrived pairs to its dataset, as it does with fresh labels.
- The PEBBLE family (``algo: sac``) queues the pairs each feedback session picks from its replay buffer
  (online) and adds the arrived pairs to its reward ensemble's labels.

``pi_ref``'s log-probs are recomputed by the learning agent under its own reference (the ones stored with
a pair are those of the policy that collected it), and states are normalized by the agent's normalizer.
"""

from __future__ import annotations

import numpy as np
import torch

from rl_align.agents.preferences import PreferenceBatch
from rl_align.buffer import Segments
from rl_align.errors import UserError
from rl_align.labels.store import SEGMENT_FIELDS


def segment_arrays(agent, seg) -> dict[str, np.ndarray]:
    """A rollout's segments as the store keeps them: raw observations (the padding after a fall repeats
    the last state), actions, mask, behaviour log-probs, ``pi_ref``'s log-probs, rewards and features."""
    ref = agent.reference() or agent.policy
    with torch.no_grad():
        obs, act = torch.as_tensor(seg.obs, device=agent.device), torch.as_tensor(seg.actions, device=agent.device)
        ref_logp = (ref.log_prob(obs, act).cpu().numpy() * seg.mask).astype(np.float32)
    return {"obs": seg.raw_obs, "actions": seg.actions, "mask": seg.mask, "logp": seg.logp,
            "ref_logp": ref_logp, "rewards": seg.rewards.astype(np.float32), "features": seg.features}


def post_rollout_pairs(agent, segment_len: int) -> int:
    """Online mode: queue up to ``post_pairs`` pairs of this rollout's segments (within the budget); returns how many."""
    oracle = agent.oracle
    want = oracle.config.post_pairs
    if oracle.remaining() is not None:
        want = min(want, oracle.remaining())
    seg = agent.buffer.segments(segment_len)
    if want == 0 or len(seg) < 2:
        return 0
    i, j = agent.buffer.pairs(len(seg), want, agent.rng)
    return oracle.queue(segment_arrays(agent, seg), i, j, source=f"trainer@{agent.env_steps}")


def stored_segments(side: dict[str, np.ndarray], rows: np.ndarray) -> Segments:
    """Rows of one side of the store's pairs as :class:`Segments` (what an oracle score is handed everywhere;
    the store keeps raw observations)."""
    return Segments.of(raw_obs=side["obs"][rows], **{f: side[f][rows] for f in SEGMENT_FIELDS if f != "obs"})


def check_segment_len(agent) -> None:
    """The store's segments and the agent's must have one length (the reward model and ``h`` sum over it)."""
    H = agent.oracle.feed.segment_len
    if H != agent.config.segment_len:
        raise UserError(f"the label store {agent.oracle.feed.path} holds {H}-step segments; set agent.segment_len={H}")


def sail_batch(agent) -> PreferenceBatch | None:
    """The SAIL family's batch from the store, off-policy (``on_policy=False``: no shift part): up to ``pairs_per_update`` decided (left / right) pairs, those labelled since the last
    update first. ``old_logp`` is the current policy's, so the approximate KL measures this update's move."""
    c, oracle = agent.config, agent.oracle
    check_segment_len(agent)
    post_rollout_pairs(agent, c.segment_len)
    n_new = oracle.feed.poll()
    d = oracle.feed.data
    labels = d["label"]
    decided = np.flatnonzero((labels == 0.0) | (labels == 1.0))
    if len(decided) == 0:
        return None
    n = oracle.config.pairs_per_update
    new = decided[decided >= len(labels) - n_new][::-1][:n]
    old = decided[decided < len(labels) - n_new]
    pick = np.concatenate([new, agent.rng.choice(old, size=min(len(old), n - len(new)), replace=False)]).astype(np.int64)
    P = len(pick)
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32, device=agent.device)  # noqa: E731
    first, second = d["first"], d["second"]
    raw = np.concatenate([first["obs"][pick], second["obs"][pick]])  # segments [2P, H, obs_dim]: firsts, then seconds
    obs, act = t(agent.normalize(raw)), t(np.concatenate([first["actions"][pick], second["actions"][pick]]))
    mask = t(np.concatenate([first["mask"][pick], second["mask"][pick]]))
    with torch.no_grad():
        ref_logp = agent.ref_policy.log_prob(obs, act) * mask
        old_logp = agent.policy.log_prob(obs, act) * mask
    lab = labels[pick]
    sel = lambda side: stored_segments(side, pick)  # noqa: E731
    return PreferenceBatch(obs=obs, actions=act, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                           i=torch.arange(P, device=agent.device), j=torch.arange(P, 2 * P, device=agent.device), pref1=t(lab),
                           on_policy=False, n_labels=int(n_new), n_ties=int((labels[len(labels) - n_new:] == 0.5).sum()),
                           oracle_agreement=oracle.agreement(sel(first), sel(second), lab))


def rlhf_preferences(agent) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """RLHF's read of a store: queue this rollout's pairs (online), then return the labels that arrived as
    rows of the reward model's dataset (``obs1 act1 mask1 obs2 act2 mask2 label``; ties as targets of 1/2,
    skips dropped), or None if none arrived, with the metrics of the read. The reward component adds them."""
    c, oracle = agent.config, agent.oracle
    check_segment_len(agent)
    posted = post_rollout_pairs(agent, c.segment_len)
    n_new = oracle.feed.poll()
    d = oracle.feed.data
    rows = np.arange(len(d["label"]) - n_new, len(d["label"]))
    rows = rows[np.isfinite(d["label"][rows])]
    m = {"rlhf/new_pairs": float(len(rows)), "human/posted": float(posted)}
    if len(rows) == 0:
        return m, None
    first, second = d["first"], d["second"]
    new = {"obs1": first["obs"][rows], "act1": first["actions"][rows], "mask1": first["mask"][rows].astype(np.float32),
           "obs2": second["obs"][rows], "act2": second["actions"][rows], "mask2": second["mask"][rows].astype(np.float32),
           "label": d["label"][rows].astype(np.float32)}
    sel = lambda side: stored_segments(side, rows)  # noqa: E731
    m["pref/oracle_agreement"] = oracle.agreement(sel(first), sel(second), d["label"][rows])
    return m, new


def post_pairs(oracle, s1: Segments, s2: Segments, env_steps: int) -> int:
    """Queue the pairs ``(s1[k], s2[k])`` chosen from an off-policy agent's replay buffer (its segments carry
    no behaviour or reference log-probs: stored as 0); returns how many."""
    segs = {f: np.concatenate([getattr(s1, f), getattr(s2, f)]) for f in ("actions", "mask", "rewards", "features")}
    segs["obs"] = np.concatenate([s1.raw_obs, s2.raw_obs])
    segs["logp"] = segs["ref_logp"] = np.zeros(segs["mask"].shape, np.float32)
    segs["rewards"], segs["features"] = segs["rewards"].astype(np.float32), segs["features"].astype(np.float32)
    P = len(s1)
    return oracle.queue(segs, np.arange(P), np.arange(P, 2 * P), source=f"trainer@{env_steps}")


def arrived_labels(agent, oracle) -> tuple[Segments | None, Segments | None, np.ndarray]:
    """The pairs labelled since the last poll as ``(first, second, labels)`` (observations normalized as the
    agent sees them; skipped pairs dropped), for a reward model to add."""
    check_segment_len(agent)
    n_new = oracle.feed.poll()
    d = oracle.feed.data
    rows = np.arange(len(d["label"]) - n_new, len(d["label"]))
    rows = rows[np.isfinite(d["label"][rows])]
    if len(rows) == 0:
        return None, None, np.zeros(0)
    first, second = stored_segments(d["first"], rows), stored_segments(d["second"], rows)
    for seg in (first, second):
        seg.obs = agent.normalize(seg.raw_obs)
    return first, second, d["label"][rows].astype(np.float64)
