"""Classical RLHF: a Bradley-Terry reward model learned from segment comparisons, optimized by PPO.

The pipeline of the ``imitation`` library and PEBBLE-style methods, on the shared buffer: each
iteration labels ``queries_per_update`` new segment pairs of the current rollout (spending the oracle's
budget), adds them to a growing preference dataset, refits the reward model

    P(s1 > s2) = sigmoid(R_hat(s1) - R_hat(s2)),   R_hat(s) = sum_t r_hat(s_t, a_t)       (Bradley-Terry)

by cross-entropy against the labels (ties are targets of 1/2), and hands PPO the learned per-step reward,
normalized by its running statistics, minus an optional InstructGPT-style reverse-KL penalty to the
reference (the policy it started from, ``init``):

    r_t = norm(r_hat(s_t, a_t)) - revkl_coef * [log pi(a_t|s_t) - log pi_ref(a_t|s_t)]

(a per-step sample of KL(pi || pi_ref), so "implicit vs explicit reward under the same reverse KL" is one
comparison with SAIL-RevKL, whose coefficient has the same name; docs/design.md, "RLHF"). Composition, not a subclass: ``algo: rlhf`` is the PPO agent whose reward
component is :class:`LearnedReward` (built by ``RLHFConfig.reward_component``). The true reward reaches
the agent only through the oracle's labels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.agents import register
from rl_align.agents.ppo import PPO, PPOConfig
from rl_align.agents.preferences import label_pairs, pair_accuracy
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
    revkl_coef: float = 0.0  # per-step reverse-KL penalty to pi_ref (the init policy), InstructGPT-style
    kl_coef: float | None = None  # removed: the reverse-KL coefficient is revkl_coef in every agent (kept so that setting it says so)
    ref_agent: str = "ppo"  # preset that trains the reference when init is auto
    ref_steps: int = 50_000  # env steps of that reference's PPO run
    win_rate_episodes: int = 4  # matched rollouts per evaluation for the win rate against pi_ref

    def __post_init__(self) -> None:
        if self.kl_coef is not None:
            raise UserError(f"agent.kl_coef is agent.revkl_coef (the reverse-KL penalty to pi_ref has one name in every agent); "
                            f"use --set agent.revkl_coef={self.kl_coef:g}")
        super().__post_init__()
        if self.segment_len < 1 or self.segment_len > self.n_steps:
            raise UserError(f"agent.segment_len={self.segment_len} must be between 1 and agent.n_steps={self.n_steps}")
        for k in ("queries_per_update", "rm_ensemble", "rm_epochs", "rm_batch", "holdout_every"):
            if getattr(self, k) < 1:
                raise UserError(f"agent.{k} must be >= 1, got {getattr(self, k)}")
        if self.revkl_coef < 0:
            raise UserError(f"agent.revkl_coef must be >= 0, got {self.revkl_coef}")
        if self.rm_lr <= 0:
            raise UserError(f"agent.rm_lr must be > 0, got {self.rm_lr}")

    def reward_component(self, agent) -> "LearnedReward":
        return LearnedReward(self, agent)


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
        return pair_accuracy(self.segment_return(*s1), self.segment_return(*s2), labels)


class LearnedReward:
    """PPO's reward component for RLHF: the preference dataset, the reward model and its optimizer, the
    reward normalizer and pi_ref for the KL penalty. ``before_update`` spends queries and refits."""

    def __init__(self, config: RLHFConfig, agent) -> None:
        if agent.oracle is None:
            raise UserError("rlhf learns its reward from preference labels: the env needs an oracle section")
        self.config, self.oracle = config, agent.oracle
        obs_dim, act_dim = agent.buffer.obs.shape[-1], agent.buffer.actions.shape[-1]
        self.model = RewardModel(obs_dim, act_dim, config.rm_hidden, config.rm_ensemble).to(agent.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.rm_lr)
        self.rhat_rms = RunningMeanStd(())
        # the growing preference dataset: raw observations (normalized when used), actions, labels
        H = config.segment_len
        self.data = {"obs1": np.zeros((0, H, obs_dim), np.float32), "act1": np.zeros((0, H, act_dim), np.float32),
                     "mask1": np.zeros((0, H), np.float32), "obs2": np.zeros((0, H, obs_dim), np.float32),
                     "act2": np.zeros((0, H, act_dim), np.float32), "mask2": np.zeros((0, H), np.float32),
                     "label": np.zeros(0, np.float32)}
        self.log_ratio = np.zeros(0)  # of the current rollout, set by before_update
        self.ref_policy = copy.deepcopy(agent.policy).requires_grad_(False)  # pi_ref: the policy the run starts from

    def modules(self) -> dict:
        return {"reward_model": self.model, "rm_optimizer": self.optimizer, "rhat_rms": self.rhat_rms, "ref_policy": self.ref_policy}

    def prepare(self, agent, started: bool) -> None:
        """pi_ref <- the policy the run starts from (``init``); a started policy keeps its normalizer frozen."""
        agent.freeze_obs_rms = started  # pi and pi_ref see states through the reference's normalizer
        self.ref_policy.load_state_dict(agent.policy.state_dict())

    def reference(self) -> torch.nn.Module:
        return self.ref_policy

    def state_dict(self) -> dict:
        return {"preference_data": {k: torch.as_tensor(v) for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.data = {k: v.numpy() for k, v in state["preference_data"].items()}

    def _collect(self, agent) -> dict[str, float]:
        """Label new pairs of this rollout's segments (within the budget) and add them to the dataset.
        Before they join it, the reward model ranks them: its held-out accuracy on the fresh rollout."""
        c = self.config
        if self.oracle.config.kind == "human":  # labels a person gave in a label store (rl_align/labels/learn.py)
            m, new = rlhf_preferences(agent)
        else:
            remaining = self.oracle.remaining()
            want = c.queries_per_update if remaining is None else min(c.queries_per_update, remaining)
            lp = label_pairs(agent.buffer, c.segment_len, want, agent.rng, self.oracle)
            if lp is None:
                return {"rlhf/new_pairs": 0.0}
            seg, i, j, labels = lp.seg, lp.i, lp.j, lp.labels
            keep = np.isfinite(labels)  # skipped queries carry nothing; ties stay as targets of 1/2
            new = {"obs1": seg.raw_obs[i[keep]], "act1": seg.actions[i[keep]], "mask1": seg.mask[i[keep]].astype(np.float32),
                   "obs2": seg.raw_obs[j[keep]], "act2": seg.actions[j[keep]], "mask2": seg.mask[j[keep]].astype(np.float32),
                   "label": labels[keep].astype(np.float32)}
            m = {"rlhf/new_pairs": float(keep.sum()), "pref/oracle_agreement": lp.agreement}
        if new is None:
            return m
        if len(new["label"]):
            m["pref/heldout_accuracy"] = self.model.accuracy(*self._tensors(agent, new, np.ones(len(new["label"]), bool)))
        for k, v in new.items():
            self.data[k] = np.concatenate([self.data[k], v])
        return m

    def _tensors(self, agent, d: dict[str, np.ndarray], mask: np.ndarray) -> tuple[tuple, tuple, torch.Tensor]:
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=agent.device)  # noqa: E731
        return ((t(agent.normalize(d["obs1"][mask])), t(d["act1"][mask]), t(d["mask1"][mask])),
                (t(agent.normalize(d["obs2"][mask])), t(d["act2"][mask]), t(d["mask2"][mask])), t(d["label"][mask]))

    def before_update(self, agent) -> dict[str, float]:
        """New labels, then the reward model refit on every pair but the held-out ones."""
        c = self.config
        m = self._collect(agent)
        n = len(self.data["label"])
        holdout = np.arange(n) % c.holdout_every == c.holdout_every - 1
        m["rlhf/pairs"] = float(n)
        if (~holdout).any():
            s1, s2, y = self._tensors(agent, self.data, ~holdout)
            m["rlhf/rm_loss"] = self.model.fit(self.optimizer, s1, s2, y, c.rm_epochs, c.rm_batch, agent.rng)
            m["pref/train_accuracy"] = self.model.accuracy(s1, s2, y)
        if holdout.any():
            m["rlhf/rm_accuracy"] = self.model.accuracy(*self._tensors(agent, self.data, holdout))
        buf = agent.buffer
        with torch.no_grad():  # log pi_old(a|s) - log pi_ref(a|s): a per-step sample of KL(pi || pi_ref)
            ref_logp = self.ref_policy.log_prob(torch.as_tensor(buf.obs, device=agent.device), torch.as_tensor(buf.actions, device=agent.device))
        self.log_ratio = buf.logp - ref_logp.cpu().numpy()
        m["train/kl_ref_sample"] = float(self.log_ratio.mean())
        return m

    def rewards(self, agent) -> np.ndarray:
        """The learned reward for every step of the rollout, ``[T, N]``, normalized by its running
        statistics, minus ``revkl_coef`` times the sampled log-ratio to pi_ref."""
        buf = agent.buffer
        with torch.no_grad():
            rhat = self.model(torch.as_tensor(buf.obs, device=agent.device), torch.as_tensor(buf.actions, device=agent.device)).cpu().numpy()
        self.rhat_rms.update(rhat.reshape(-1))
        r = np.clip((rhat - self.rhat_rms.mean) / np.sqrt(self.rhat_rms.var + 1e-8), -10, 10)
        return r - self.config.revkl_coef * self.log_ratio


register("rlhf", RLHFConfig)(PPO)
