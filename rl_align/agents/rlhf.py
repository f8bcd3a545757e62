"""Classical RLHF: a Bradley-Terry reward model learned from segment comparisons, optimized by PPO.

The pipeline of the ``imitation`` library and PEBBLE-style methods, on the shared buffer: each
iteration labels ``queries_per_update`` new segment pairs of the current rollout (spending the oracle's
budget), adds them to a growing preference dataset, refits the reward model

    P(s1 > s2) = sigmoid(R_hat(s1) - R_hat(s2)),   R_hat(s) = sum_t r_hat(s_t, a_t)       (Bradley-Terry)

by cross-entropy against the labels (ties are targets of 1/2), and hands PPO the learned per-step reward,
normalized by its running statistics, minus an optional InstructGPT-style reverse-KL penalty to the
reference (the policy it started from, ``init``):

    r_t = norm(r_hat(s_t, a_t)) - kl_coef * [log pi(a_t|s_t) - log pi_ref(a_t|s_t)]

(a per-step sample of KL(pi || pi_ref), so "implicit vs explicit reward under the same reverse KL" is one
comparison with SAIL-RevKL). PPO's update is reused as is: only ``training_rewards`` changes. The true
reward reaches the agent only through the oracle's labels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.agents import register
from rl_align.agents.ppo import PPO, PPOConfig
from rl_align.errors import UserError
from rl_align.labels.learn import rlhf_preferences
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
    kl_coef: float = 0.0  # per-step reverse-KL penalty to pi_ref (the init policy), InstructGPT-style
    ref_agent: str = "ppo"  # preset that trains the reference when init is auto
    ref_steps: int = 50_000  # env steps of that reference's PPO run

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segment_len < 1 or self.segment_len > self.n_steps:
            raise UserError(f"agent.segment_len={self.segment_len} must be between 1 and agent.n_steps={self.n_steps}")
        for k in ("queries_per_update", "rm_ensemble", "rm_epochs", "rm_batch", "holdout_every"):
            if getattr(self, k) < 1:
                raise UserError(f"agent.{k} must be >= 1, got {getattr(self, k)}")
        if self.kl_coef < 0:
            raise UserError(f"agent.kl_coef must be >= 0, got {self.kl_coef}")
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

    def segment_return(self, obs: torch.Tensor, act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self(obs, act) * mask).sum(-1)  # R_hat(s) = sum_t r_hat(s_t, a_t) over the real steps

    def fit(self, opt: torch.optim.Optimizer, s1: tuple, s2: tuple, labels: torch.Tensor, epochs: int, batch: int,
            rng: np.random.Generator) -> float:
        """Bradley-Terry cross-entropy on pairs ``(s1[k], s2[k])`` with targets ``labels [P]``; mean loss."""
        losses = []
        n = len(labels)
        for _ in range(epochs):
            for idx in np.array_split(rng.permutation(n), max(1, n // batch)):
                logits = self.segment_return(*(x[idx] for x in s1)) - self.segment_return(*(x[idx] for x in s2))
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
                     "mask1": np.zeros((0, H), np.float32), "obs2": np.zeros((0, H, obs_dim), np.float32),
                     "act2": np.zeros((0, H, act_dim), np.float32), "mask2": np.zeros((0, H), np.float32),
                     "label": np.zeros(0, np.float32)}
        self.kl_sample = 0.0
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)  # pi_ref: the policy the run starts from

    def modules(self) -> dict:
        return {**super().modules(), "reward_model": self.reward_model, "rm_optimizer": self.rm_optimizer, "rhat_rms": self.rhat_rms,
                "ref_policy": self.ref_policy}

    def prepare(self, cfg) -> None:
        """Start from ``init`` (``auto``: the same PPO reference SAIL's ``ref: auto`` uses); it is pi_ref."""
        from rl_align.agents.sail import auto_reference

        if self.config.init:
            self.start_from(auto_reference(cfg) if self.config.init == "auto" else self.config.init)
            self.freeze_obs_rms = True  # pi and pi_ref see states through the reference's normalizer
        self.ref_policy.load_state_dict(self.policy.state_dict())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "preference_data": {k: torch.as_tensor(v) for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.data = {k: v.numpy() for k, v in state["preference_data"].items()}

    def _collect_preferences(self) -> dict[str, float]:
        """Label new pairs of this rollout's segments (within the budget) and add them to the dataset.
        Before they join it, the reward model ranks them: its held-out accuracy on the fresh rollout."""
        c, buf = self.config, self.buffer
        if self.oracle.config.kind == "human":  # labels a person gave in a label store (rl_align/labels/learn.py)
            return rlhf_preferences(self)
        seg = buf.segments(c.segment_len)
        remaining = self.oracle.remaining()
        want = c.queries_per_update if remaining is None else min(c.queries_per_update, remaining)
        if len(seg) < 2 or want == 0:
            return {"rlhf/new_pairs": 0.0}
        i, j = buf.pairs(len(seg), want, self.rng)
        s1, s2 = seg.take(i), seg.take(j)
        labels = self.oracle.label(s1, s2)
        keep = np.isfinite(labels)  # skipped queries carry nothing; ties stay as targets of 1/2
        t_idx = seg.start[:, None] + np.minimum(np.arange(c.segment_len)[None], seg.mask.sum(-1, keepdims=True) - 1)
        raw = buf.raw_obs[t_idx, seg.env[:, None]]  # [M, H, obs_dim], padding after a fall repeats the last state
        new = {"obs1": raw[i[keep]], "act1": seg.actions[i[keep]], "mask1": seg.mask[i[keep]].astype(np.float32),
               "obs2": raw[j[keep]], "act2": seg.actions[j[keep]], "mask2": seg.mask[j[keep]].astype(np.float32),
               "label": labels[keep].astype(np.float32)}
        m = {"rlhf/new_pairs": float(keep.sum()), "pref/oracle_agreement": self.oracle.agreement(s1, s2, labels)}
        if keep.any():
            m["pref/heldout_accuracy"] = self.reward_model.accuracy(*self._tensors(new, np.ones(int(keep.sum()), bool)))
        for k, v in new.items():
            self.data[k] = np.concatenate([self.data[k], v])
        return m

    def _tensors(self, d: dict[str, np.ndarray], mask: np.ndarray) -> tuple[tuple, tuple, torch.Tensor]:
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        return ((t(self.normalize(d["obs1"][mask])), t(d["act1"][mask]), t(d["mask1"][mask])),
                (t(self.normalize(d["obs2"][mask])), t(d["act2"][mask]), t(d["mask2"][mask])), t(d["label"][mask]))

    def training_rewards(self) -> np.ndarray:
        """The learned reward for every step of the rollout, ``[T, N]``, normalized by its running
        statistics, minus ``kl_coef`` times the sampled log-ratio to pi_ref."""
        buf = self.buffer
        obs, act = torch.as_tensor(buf.obs, device=self.device), torch.as_tensor(buf.actions, device=self.device)
        with torch.no_grad():
            rhat = self.reward_model(obs, act).cpu().numpy()
            log_ratio = buf.logp - self.ref_policy.log_prob(obs, act).cpu().numpy()  # log pi_old(a|s) - log pi_ref(a|s)
        self.rhat_rms.update(rhat.reshape(-1))
        r = np.clip((rhat - self.rhat_rms.mean) / np.sqrt(self.rhat_rms.var + 1e-8), -10, 10)
        self.kl_sample = float(log_ratio.mean())
        return r - self.config.kl_coef * log_ratio

    def update(self) -> dict[str, float]:
        c = self.config
        m = self._collect_preferences()
        n = len(self.data["label"])
        holdout = np.arange(n) % c.holdout_every == c.holdout_every - 1
        m["rlhf/pairs"] = float(n)
        if (~holdout).any():
            s1, s2, y = self._tensors(self.data, ~holdout)
            m["rlhf/rm_loss"] = self.reward_model.fit(self.rm_optimizer, s1, s2, y, c.rm_epochs, c.rm_batch, self.rng)
            m["pref/train_accuracy"] = self.reward_model.accuracy(s1, s2, y)
        if holdout.any():
            m["rlhf/rm_accuracy"] = self.reward_model.accuracy(*self._tensors(self.data, holdout))
        metrics = super().update()  # PPO on the learned reward (training_rewards above)
        metrics.update(m)
        metrics["train/kl_ref_sample"] = self.kl_sample
        metrics["train/queries_used"] = float(self.oracle.queries)
        return metrics
