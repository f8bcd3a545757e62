"""What every preference agent shares (SAIL family, COMAL, RLHF): label pairs of a rollout's segments,
the typed batch of labelled pairs the preference objectives read, per-step segment log-probs, and the
accuracy of a signal on labelled pairs (docs/design.md, "Data flow")."""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class PreferenceBatch:
    """Labelled pairs of segments: the one contract between what produces pairs (a fresh rollout, the
    label store, the replay store) and what learns from them (the SAIL-family and INPO objectives, the
    diagnostics). Segments ``[M, H, ...]``, pairs ``(i, j)`` ``[P]`` indexing them, ``pref1 = 1`` where
    ``i`` is preferred. Segments ``[0, n_fresh_segments)`` and pairs ``[0, n_fresh_pairs)`` are this
    rollout's own; replayed ones follow them. The ``None`` fields are fixed at theta_old by the update
    (``dataclasses.replace``), before the epochs."""

    obs: torch.Tensor  # [M, H, obs_dim] normalized states
    actions: torch.Tensor  # [M, H, act_dim]
    mask: torch.Tensor  # [M, H] 1.0 on real steps, 0.0 on the padding after a fall
    old_logp: torch.Tensor  # [M, H] behaviour log-probs (0 on replayed segments: the shift part is fresh-only)
    ref_logp: torch.Tensor  # [M, H] pi_ref's log-probs, masked
    i: torch.Tensor  # [P] long
    j: torch.Tensor  # [P] long
    pref1: torch.Tensor  # [P] float: 1 (i preferred) or 0 (j preferred); ties and skips are not in a batch
    on_policy: bool = True  # the fresh segments were sampled by the policy being updated (False: a label store's)
    n_fresh_segments: int = -1  # -1: all
    n_fresh_pairs: int = -1  # -1: all
    n_labels: int = 0  # labelling statistics of the fresh pairs, logged
    n_ties: int = 0
    oracle_agreement: float = float("nan")
    ref_mu: torch.Tensor | None = None  # [M_fresh, H, act_dim] pi_ref's mean on the fresh states
    h_offset: torch.Tensor | None = None  # [M] center_h: E_{a ~ pi_old}[h] at each segment's states
    shift_w: torch.Tensor | None = None  # [M_fresh] the shift part's per-segment weights
    dpo_w: torch.Tensor | None = None  # [M_fresh] dpo_clip: the DPO part's per-segment gradient weights
    win: torch.Tensor | None = None  # [M] INPO: each segment's win rate against the batch

    def __post_init__(self) -> None:
        if self.n_fresh_segments < 0:
            object.__setattr__(self, "n_fresh_segments", len(self.obs))
        if self.n_fresh_pairs < 0:
            object.__setattr__(self, "n_fresh_pairs", len(self.pref1))

    @property
    def n_pairs(self) -> int:
        return len(self.pref1)

    def fixed(self, **fields) -> "PreferenceBatch":
        """A copy with quantities fixed at theta_old set (``ref_mu``, ``h_offset``, ``shift_w``, ``dpo_w``, ``win``)."""
        return dataclasses.replace(self, **fields)

    def extended(self, stored: "PreferenceBatch | None") -> "PreferenceBatch":
        """This fresh batch followed by ``stored`` pairs (replay): segments ``[M + R]``, pairs fresh then stored,
        the stored segments' ``old_logp`` 0 (they enter the DPO part only)."""
        if stored is None:
            return self
        dev, M = self.obs.device, len(self.obs)
        cat = lambda a, b: torch.cat([a, b.to(dev)])  # noqa: E731
        return dataclasses.replace(
            self, obs=cat(self.obs, stored.obs), actions=cat(self.actions, stored.actions), mask=cat(self.mask, stored.mask),
            ref_logp=cat(self.ref_logp, stored.ref_logp), old_logp=cat(self.old_logp, torch.zeros_like(stored.ref_logp)),
            i=cat(self.i, stored.i.to(dev) + M), j=cat(self.j, stored.j.to(dev) + M), pref1=cat(self.pref1, stored.pref1),
            n_fresh_segments=self.n_fresh_segments, n_fresh_pairs=self.n_fresh_pairs, win=None)


def segment_logp(policy, obs: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.distributions.Normal]:
    """``log pi(a_t|s_t)`` per step ``[M, H]`` (zero on the padding after a fall) and the distribution."""
    dist = policy.dist(obs)
    return dist.log_prob(actions).sum(-1) * mask, dist


def batch_logp(policy, b: PreferenceBatch, seg_idx: torch.Tensor) -> tuple[torch.Tensor, torch.distributions.Normal]:
    """Per-step log-probs ``[M, H]`` under ``policy`` filled on the segments ``seg_idx`` (sorted, unique;
    zero elsewhere and on the padding), and the policy's distribution on those segments."""
    if len(seg_idx) == len(b.obs):  # every segment: no scatter needed
        return segment_logp(policy, b.obs, b.actions, b.mask)
    logp_seg, dist = segment_logp(policy, b.obs[seg_idx], b.actions[seg_idx], b.mask[seg_idx])
    logp = torch.zeros(b.obs.shape[:2], device=b.obs.device).index_put((seg_idx,), logp_seg)
    return logp, dist


def pair_accuracy(h_i: torch.Tensor, h_j: torch.Tensor, pref1: torch.Tensor) -> float:
    """Share of labelled pairs whose preferred segment the signal ``h`` ranks higher; an equal score
    counts 1/2, tie labels (1/2) are left out."""
    decided = pref1 != 0.5
    if not bool(decided.any()):
        return float("nan")
    h_i, h_j, pref1 = h_i[decided], h_j[decided], pref1[decided]
    agree = torch.where(pref1 > 0.5, torch.sign(h_i - h_j), torch.sign(h_j - h_i))
    return float(((agree + 1) / 2).mean())
