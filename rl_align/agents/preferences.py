"""What every preference agent shares (SAIL family, COMAL, RLHF): label pairs of a rollout's segments,
per-step segment log-probs, and the accuracy of a signal on labelled pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl_align.buffer import RolloutBuffer, Segments


@dataclass
class LabelledPairs:
    """Segments of one rollout ``[M]``, the queried pairs ``(i, j)`` ``[P]`` and the oracle's labels
    (1: first preferred, 0: second, 1/2: tie, nan: skipped), with the oracle's agreement with the true return."""

    seg: Segments
    i: np.ndarray
    j: np.ndarray
    labels: np.ndarray
    agreement: float


def label_pairs(buffer: RolloutBuffer, H: int, max_pairs: int | None, rng: np.random.Generator, oracle,
                shared_start: int = 1) -> LabelledPairs | None:
    """Cut ``buffer`` into ``H``-step segments, draw pairs (all, or ``max_pairs`` of them), ask ``oracle``.
    With ``shared_start = G > 1`` envs ``[kG, (k + 1) G)`` started each aligned window from one state
    (``VecEnv.copy_state``) and only segments of one group and window are paired: a pair then differs
    by its actions alone, as two responses to one prompt do. None when there is no pair to ask about."""
    seg = buffer.segments(H, aligned=shared_start > 1)
    if len(seg) < 2 or max_pairs == 0:
        return None
    key = seg.start * (buffer.N // shared_start) + seg.env // shared_start if shared_start > 1 else None
    i, j = buffer.pairs(len(seg), max_pairs, rng, key)
    if len(i) == 0:
        return None
    s1, s2 = seg.take(i), seg.take(j)
    labels = oracle.label(s1, s2)
    return LabelledPairs(seg, i, j, labels, oracle.agreement(s1, s2, labels))


def segment_logp(policy, obs: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.distributions.Normal]:
    """``log pi(a_t|s_t)`` per step ``[M, H]`` (zero on the padding after a fall) and the distribution."""
    dist = policy.dist(obs)
    return dist.log_prob(actions).sum(-1) * mask, dist


def pair_accuracy(h_i: torch.Tensor, h_j: torch.Tensor, pref1: torch.Tensor) -> float:
    """Share of labelled pairs whose preferred segment the signal ``h`` ranks higher; an equal score
    counts 1/2, tie labels (1/2) are left out."""
    decided = pref1 != 0.5
    if not bool(decided.any()):
        return float("nan")
    h_i, h_j, pref1 = h_i[decided], h_j[decided], pref1[decided]
    agree = torch.where(pref1 > 0.5, torch.sign(h_i - h_j), torch.sign(h_j - h_i))
    return float(((agree + 1) / 2).mean())
