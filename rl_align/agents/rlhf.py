"""Classical RLHF: a Bradley-Terry reward model learned from segment comparisons, optimized by PPO.

The pipeline of the ``imitation`` library and PEBBLE-style methods, on the shared buffer: each
iteration labels ``queries_per_update`` new segment pairs of the current rollout (spending the oracle's
budget), adds them to a growing preference dataset, refits the reward model

    P(s1 > s2) = sigmoid(R_hat(s1) - R_hat(s2)),   R_hat(s) = sum_t r_hat(s_t, a_t)       (Bradley-Terry)

by cross-entropy against the labels (ties are targets of 1/2), and hands PPO the learned per-step reward,
normalized by its running statistics. PPO's update is reused as is: only ``training_rewards`` changes.
The true reward reaches the agent only through the oracle's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.agents import register
from rl_align.agents.ppo import PPO, PPOConfig
from rl_align.errors import UserError
from rl_align.nets import RunningMeanStd, mlp


@dataclass
class RLHFConfig(PPOConfig):
    n_envs: int = 8
    n_steps: int = 256
    minibatch: int = 256
    segment_len: int = 50
    queries_per_update: int = 100  # new labelled pairs per iteration (until the oracle's budget is spent)
    rm_hidden: list[int] = field(default_factory=lambda: [64, 64])
    rm_ensemble: int = 1  # members with different initializations; the reward is their mean
    rm_epochs: int = 3  # passes over the whole preference dataset per iteration
    rm_lr: float = 3e-4
    rm_batch: int = 64
    holdout_every: int = 10  # every k-th labelled pair is held out to measure the model's accuracy

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segment_len < 1 or self.segment_len > self.n_steps:
            raise UserError(f"agent.segment_len={self.segment_len} must be between 1 and agent.n_steps={self.n_steps}")
        for k in ("queries_per_update", "rm_ensemble", "rm_epochs", "rm_batch", "holdout_every"):
            if getattr(self, k) < 1:
                raise UserError(f"agent.{k} must be >= 1, got {getattr(self, k)}")
        if self.rm_lr <= 0:
            raise UserError(f"agent.rm_lr must be > 0, got {self.rm_lr}")


class RewardModel(torch.nn.Module):
    """``r_hat(s, a)``: an ensemble of MLPs on (normalized observation, action), averaged."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], members: int) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(mlp(obs_dim + act_dim, 1, hidden, "relu", 1.0, True) for _ in range(members))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Per-step reward ``[...]`` for ``obs [..., obs_dim]``, ``act [..., act_dim]``."""
        x = torch.cat([obs, act], -1)
        return torch.stack([m(x).squeeze(-1) for m in self.members]).mean(0)

    def segment_return(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self(obs, act).sum(-1)  # R_hat(s) = sum_t r_hat(s_t, a_t)

    def fit(self, opt: torch.optim.Optimizer, s1: tuple, s2: tuple, labels: torch.Tensor, epochs: int, batch: int,
            rng: np.random.Generator) -> float:
        """Bradley-Terry cross-entropy on pairs ``(s1[k], s2[k])`` with targets ``labels [P]``; mean loss."""
        losses = []
        n = len(labels)
        for _ in range(epochs):
            for idx in np.array_split(rng.permutation(n), max(1, n // batch)):
                logits = self.segment_return(s1[0][idx], s1[1][idx]) - self.segment_return(s2[0][idx], s2[1][idx])
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx])  # -[y log P + (1-y) log(1-P)]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def accuracy(self, s1: tuple, s2: tuple, labels: torch.Tensor) -> float:
        """Share of non-tie pairs whose preferred segment gets the higher predicted return."""
        decided = labels != 0.5
        if not decided.any():
            return float("nan")
        pred = self.segment_return(*s1) > self.segment_return(*s2)
        return float((pred[decided] == (labels[decided] > 0.5)).float().mean())


@register("rlhf")
class RLHF(PPO):
    config_cls = RLHFConfig
    config: RLHFConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.oracle is None:
            raise UserError("rlhf learns its reward from preference labels: the env needs an oracle section")
        c = self.config
        obs_dim, act_dim = self.buffer.obs.shape[-1], self.buffer.actions.shape[-1]
        self.reward_model = RewardModel(obs_dim, act_dim, c.rm_hidden, c.rm_ensemble).to(self.device)
        self.rm_optimizer = torch.optim.Adam(self.reward_model.parameters(), lr=c.rm_lr)
        self.rhat_rms = RunningMeanStd(())
        # the growing preference dataset: raw observations (normalized when used), actions, labels
        H = c.segment_len
        self.data = {"obs1": np.zeros((0, H, obs_dim), np.float32), "act1": np.zeros((0, H, act_dim), np.float32),
                     "obs2": np.zeros((0, H, obs_dim), np.float32), "act2": np.zeros((0, H, act_dim), np.float32),
                     "label": np.zeros(0, np.float32)}
        self.rm_metrics: dict[str, float] = {}

    def modules(self) -> dict:
        return {**super().modules(), "reward_model": self.reward_model, "rm_optimizer": self.rm_optimizer, "rhat_rms": self.rhat_rms}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "preference_data": {k: torch.as_tensor(v) for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.data = {k: v.numpy() for k, v in state["preference_data"].items()}

    def _collect_preferences(self) -> int:
        """Label new pairs of this rollout's segments (within the budget); returns how many were added."""
        c, buf = self.config, self.buffer
        seg = buf.segments(c.segment_len)
        remaining = self.oracle.remaining()
        want = c.queries_per_update if remaining is None else min(c.queries_per_update, remaining)
        if len(seg) < 2 or want == 0:
            return 0
        i, j = buf.pairs(len(seg), want, self.rng)
        labels = self.oracle.label(seg.take(i), seg.take(j))
        keep = np.isfinite(labels)  # skipped queries carry nothing; ties stay as targets of 1/2
        t_idx = seg.start[:, None] + np.arange(c.segment_len)[None]
        raw = buf.raw_obs[t_idx, seg.env[:, None]]  # [M, H, obs_dim]
        for side, idx in (("1", i[keep]), ("2", j[keep])):
            self.data["obs" + side] = np.concatenate([self.data["obs" + side], raw[idx]])
            self.data["act" + side] = np.concatenate([self.data["act" + side], seg.actions[idx]])
        self.data["label"] = np.concatenate([self.data["label"], labels[keep].astype(np.float32)])
        return int(keep.sum())

    def _tensors(self, mask: np.ndarray) -> tuple[tuple, tuple, torch.Tensor]:
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        d = self.data
        return ((t(self.normalize(d["obs1"][mask])), t(d["act1"][mask])), (t(self.normalize(d["obs2"][mask])), t(d["act2"][mask])),
                t(d["label"][mask]))

    def training_rewards(self) -> np.ndarray:
        """The learned reward for every step of the rollout, ``[T, N]``, normalized by its running statistics."""
        buf = self.buffer
        with torch.no_grad():
            rhat = self.reward_model(torch.as_tensor(buf.obs, device=self.device), torch.as_tensor(buf.actions, device=self.device)).cpu().numpy()
        self.rhat_rms.update(rhat.reshape(-1))
        return np.clip((rhat - self.rhat_rms.mean) / np.sqrt(self.rhat_rms.var + 1e-8), -10, 10)

    def update(self) -> dict[str, float]:
        c = self.config
        added = self._collect_preferences()
        n = len(self.data["label"])
        holdout = np.arange(n) % c.holdout_every == c.holdout_every - 1
        m: dict[str, float] = {"rlhf/pairs": float(n), "rlhf/new_pairs": float(added)}
        if (~holdout).any():
            s1, s2, y = self._tensors(~holdout)
            m["rlhf/rm_loss"] = self.reward_model.fit(self.rm_optimizer, s1, s2, y, c.rm_epochs, c.rm_batch, self.rng)
            m["rlhf/rm_train_accuracy"] = self.reward_model.accuracy(s1, s2, y)
        if holdout.any():
            m["rlhf/rm_accuracy"] = self.reward_model.accuracy(*self._tensors(holdout))
        metrics = super().update()  # PPO on the learned reward (training_rewards above)
        metrics.update(m)
        metrics["train/queries_used"] = float(self.oracle.queries)
        return metrics
