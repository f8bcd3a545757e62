"""Preference oracles: label pairs of segments. Only oracles read the true reward.

A label is ``1.0`` (first segment preferred), ``0.0`` (second), ``0.5`` (tie) or ``nan`` (skipped,
or not asked because the query budget is spent). Segments arrive as :class:`rl_align.buffer.Segments`
everywhere (training, the win rate, a label store's pairs): ``rewards [M, H]``, ``features [M, H, 3]``
(x-velocity, torso height, ``||a||^2``), ``mask [M, H]``, ``obs``, ``raw_obs``, ``actions`` and the rest
of its fields. A user score or feature function that raises stops the run with one line naming it.

The ``human`` kind labels nothing itself: a person (or the synthetic labeller) answers pairs queued in a
label store (rl_align/labels), and the agents read what has arrived through ``Oracle.feed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rl_align.envs.costs import load_dotted
from rl_align.errors import UserError
from rl_align.labels.store import LabelFeed, LabelStore

SCORES = ("reward", "forward", "backward")


@dataclass
class OracleConfig:
    """Which teacher labels segment pairs. See docs/design.md, "Preference oracle"."""

    kind: str = "bradley-terry"  # bradley-terry | general | human
    score: str = "reward"  # reward | forward | backward | package.module:function (segments -> [M])
    temperature: float = 1.0  # BT: P = sigmoid((R1 - R2) / T); 0 gives the deterministic teacher
    discount: float = 1.0  # myopic teacher: R = sum_k g^(H-1-k) r_k
    skip_threshold: float | None = None  # B-Pref skip: no label when both returns are below it
    equal_threshold: float = 0.0  # B-Pref equal: label 1/2 when |R1 - R2| < it
    mistake_prob: float = 0.0  # B-Pref mistake: flip the label with this probability
    budget: int | None = None  # total queries allowed; None: unlimited
    # general (non-BT) oracle: P = sigmoid(k * (w . (z1 - z2) + z1^T S z2)), S = -S^T
    weights: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0])
    skew: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])
    feature_scale: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    feature_offset: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # z = (f - offset) / scale: S is not shift-invariant
    sharpness: float = 1.0  # k
    features: str = "mean"  # mean | package.module:function (segments -> [M, F])
    # human: labels a person gave in a label store (rl-align label); the agents learn from the labelled pairs
    store: str | None = None  # the store's file (rl-align label collect makes one)
    post_pairs: int = 0  # online: pairs of each rollout the trainer queues for labelling (0: offline, labels already there)
    pairs_per_update: int = 512  # SAIL family: labelled pairs its DPO part draws per update (the newest first)

    def __post_init__(self) -> None:
        if self.kind not in ("bradley-terry", "general", "human"):
            raise UserError(f"unknown oracle kind {self.kind!r}; use bradley-terry, general or human")
        if self.kind == "human" and not self.store:
            raise UserError("env.oracle.kind=human needs env.oracle.store=<label store file> (rl-align label collect makes one)")
        if self.post_pairs < 0 or self.pairs_per_update < 1:
            raise UserError("env.oracle.post_pairs must be >= 0 and env.oracle.pairs_per_update >= 1")
        if self.temperature < 0:
            raise UserError(f"env.oracle.temperature must be >= 0 (0 is the deterministic teacher), got {self.temperature}")
        if not 0 < self.discount <= 1:
            raise UserError(f"env.oracle.discount must be in (0, 1], got {self.discount}")
        if not 0 <= self.mistake_prob <= 1:
            raise UserError(f"env.oracle.mistake_prob must be in [0, 1], got {self.mistake_prob}")
        if self.equal_threshold < 0:
            raise UserError(f"env.oracle.equal_threshold must be >= 0, got {self.equal_threshold}")
        if self.budget is not None and self.budget < 0:
            raise UserError(f"env.oracle.budget must be >= 0 or null, got {self.budget}")
        if self.sharpness <= 0:
            raise UserError(f"env.oracle.sharpness must be > 0, got {self.sharpness}")
        if self.kind == "general":
            S = np.asarray(self.skew, dtype=float)
            n = len(self.weights)
            if S.shape != (n, n) or len(self.feature_scale) != n or len(self.feature_offset) != n:
                raise UserError(f"env.oracle.skew must be {n}x{n} and feature_scale, feature_offset of length {n} to match weights")
            if not np.allclose(S, -S.T, atol=1e-12):
                raise UserError("env.oracle.skew must be skew-symmetric (S = -S^T) so that P(a,b) = 1 - P(b,a)")
        if self.score not in SCORES and ":" not in self.score and "." not in self.score:
            raise UserError(f"unknown oracle score {self.score!r}; use one of {', '.join(SCORES)} or package.module:function")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Oracle:
    """A seeded teacher that counts its queries and enforces its budget."""

    def __init__(self, config: OracleConfig, seed: int = 0) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.queries = 0
        self._user_score = None if config.score in SCORES else load_dotted(config.score, "oracle score")
        self._user_features = None if config.features == "mean" else load_dotted(config.features, "oracle features")
        self.feed = LabelFeed(LabelStore(config.store)) if config.kind == "human" else None  # what a person has labelled

    # ---- scores -------------------------------------------------------------------------------
    def returns(self, seg: Any) -> np.ndarray:
        """Discounted segment score ``R = sum_k g^(H-1-k) r_k``, ``[M]``."""
        if self._user_score is not None:
            return self._call_user(self._user_score, self.config.score, "oracle score", seg)
        if self.config.score == "reward":
            per_step = seg.rewards
        else:
            sign = 1.0 if self.config.score == "forward" else -1.0
            per_step = sign * seg.features[..., 0]
        H = per_step.shape[-1]
        weights = self.config.discount ** np.arange(H - 1, -1, -1, dtype=np.float64)
        return np.asarray(per_step, dtype=np.float64) @ weights

    @staticmethod
    def _call_user(fn, path: str, what: str, seg: Any) -> np.ndarray:
        """``fn(seg)`` as float64; an exception inside it becomes one line naming the function and the error."""
        try:
            return np.asarray(fn(seg), dtype=np.float64)
        except Exception as exc:  # the user's code: any error is theirs to fix, shown without our traceback
            first = (str(exc).strip().splitlines() or [""])[0]
            fields = ", ".join(getattr(seg, "__dataclass_fields__", ()))
            raise UserError(f"the {what} {path} raised {type(exc).__name__}: {first} (segments have the fields {fields})") from None

    def features(self, seg: Any) -> np.ndarray:
        """Normalized segment features ``z(s)``, ``[M, F]`` (x-velocity, height, -control effort)."""
        if self._user_features is not None:
            return self._call_user(self._user_features, self.config.features, "oracle features", seg)
        mask = getattr(seg, "mask", None)  # segments padded after a fall average only their real steps
        w = np.ones(np.shape(seg.features)[:-1]) if mask is None else np.asarray(mask, dtype=np.float64)
        f = (np.asarray(seg.features, dtype=np.float64) * w[..., None]).sum(axis=-2) / np.maximum(w.sum(-1), 1)[..., None]
        f[..., 2] = -f[..., 2]
        return (f - np.asarray(self.config.feature_offset)) / np.asarray(self.config.feature_scale)

    def preference_prob(self, seg1: Any, seg2: Any) -> np.ndarray:
        """``P(s1 > s2)``, ``[M]``, before noise. Deterministic teachers give 0, 1/2 or 1."""
        c = self.config
        if c.kind == "human":  # no model of the person: win rates under this oracle are unknown
            return np.full(len(seg1.rewards), np.nan)
        if c.kind == "general":
            z1, z2 = self.features(seg1), self.features(seg2)
            w, S = np.asarray(c.weights), np.asarray(c.skew)
            return _sigmoid(c.sharpness * ((z1 - z2) @ w + np.einsum("mi,ij,mj->m", z1, S, z2)))
        d = self.returns(seg1) - self.returns(seg2)
        if c.temperature == 0:
            return 0.5 * (1.0 + np.sign(d))
        return _sigmoid(d / c.temperature)

    # ---- labels -------------------------------------------------------------------------------
    def remaining(self) -> int | None:
        return None if self.config.budget is None else max(0, self.config.budget - self.queries)

    def label(self, seg1: Any, seg2: Any) -> np.ndarray:
        """Labels for M pairs, ``[M]``; pairs past the budget are not asked and come back ``nan``."""
        c = self.config
        M = len(seg1.rewards)
        if c.kind == "human":  # a person answers through the store, later (rl_align.labels.learn)
            return np.full(M, np.nan)
        asked = M if self.remaining() is None else min(M, self.remaining())
        self.queries += asked
        labels = np.full(M, np.nan)
        if asked == 0:
            return labels
        p = self.preference_prob(seg1, seg2)[:asked]
        if c.kind == "bradley-terry" and c.temperature == 0:
            lab = p.copy()  # deterministic teacher: 1, 0, or 1/2 on equal returns
        else:
            lab = (self.rng.random(asked) < p).astype(np.float64)
        if c.kind == "bradley-terry" and (c.equal_threshold > 0 or c.skip_threshold is not None):
            r1, r2 = self.returns(seg1)[:asked], self.returns(seg2)[:asked]
            lab = np.where(np.abs(r1 - r2) < c.equal_threshold, 0.5, lab)
            if c.skip_threshold is not None:
                lab = np.where(np.maximum(r1, r2) < c.skip_threshold, np.nan, lab)
        if c.mistake_prob > 0:
            flip = (self.rng.random(asked) < c.mistake_prob) & (lab != 0.5)
            lab = np.where(flip, 1.0 - lab, lab)
        labels[:asked] = lab
        return labels

    def queue(self, segments: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray, source: str) -> int:
        """The ``human`` kind: queue pairs of ``segments`` (the store's fields) in the label store, each one a
        query spent against the budget; returns how many were queued."""
        if self.feed is None:
            raise ValueError(f"only the human oracle queues pairs for a person; this one is {self.config.kind}")
        n = len(self.feed.queue(segments, i, j, source))
        self.queries += n
        return n

    def agreement(self, seg1: Any, seg2: Any, labels: np.ndarray) -> float:
        """Share of decided labels (0 or 1) that pick the segment of higher true return (sum of rewards):
        1 for the deterministic teacher on the reward, lower for noisy, myopic or intransitive ones.
        A diagnostic of the teacher; the agents never see the reward through it."""
        decided = (labels == 0.0) | (labels == 1.0)
        if not decided.any():
            return float("nan")
        diff = np.asarray(seg1.rewards, dtype=np.float64).sum(-1) - np.asarray(seg2.rewards, dtype=np.float64).sum(-1)
        agree = np.where(labels == 1.0, np.sign(diff), -np.sign(diff))[decided]
        return float(((agree + 1) / 2).mean())

    def state_dict(self) -> dict:
        state = {"queries": self.queries, "rng": self.rng.bit_generator.state}
        if self.feed is not None:
            state["feed"] = self.feed.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.queries = int(state["queries"])
        self.rng.bit_generator.state = state["rng"]
        if self.feed is not None and "feed" in state:
            self.feed.load_state_dict(state["feed"])
