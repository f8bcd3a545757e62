"""PPO on the true reward (Schulman et al. 2017): the baseline and the maker of reference policies.

Clipped surrogate ``L = E[min(rho A, clip(rho, 1-eps, 1+eps) A)]``, value loss, entropy bonus,
gradient-norm clipping, optional reward scaling (SB3 VecNormalize-style) and linear learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl_align.agents import register
from rl_align.agents.base import OnPolicyAgent, OnPolicyConfig
from rl_align.diagnostics import halves_cosine
from rl_align.errors import UserError
from rl_align.losses import clipped_surrogate
from rl_align.nets import RunningMeanStd


@dataclass
class PPOConfig(OnPolicyConfig):
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    normalize_advantage: bool = True
    normalize_reward: bool = False  # divide rewards by the running std of the discounted return
    clip_value: float | None = None  # clip the value update as in the PPO paper's code; None: off
    target_kl: float | None = None  # stop the epoch loop early when approx KL exceeds it
    init: str | None = None  # run folder or checkpoint whose policy and obs normalizer this run starts from
    diag_every: int = 0  # grad/pg_halves_cos every this many updates (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vf_coef < 0 or self.ent_coef < 0 or self.diag_every < 0:
            raise UserError("agent.vf_coef, agent.ent_coef and agent.diag_every must be >= 0")

    def reward_component(self, agent) -> "EnvReward":
        """The component that turns a rollout into PPO's rewards (RLHFConfig returns a learned one)."""
        return EnvReward(self, agent.buffer.N)


class EnvReward:
    """PPO's reward component for the true reward: raw, or divided by the running std of the discounted
    return (SB3 VecNormalize-style). RLHF swaps in a learned reward (rl_align.agents.rlhf)."""

    def __init__(self, config: PPOConfig, n_envs: int) -> None:
        self.config = config
        self.ret_rms = RunningMeanStd(())
        self.ret_acc = np.zeros(n_envs)  # running discounted return per env, for reward scaling

    def modules(self) -> dict:
        return {"ret_rms": self.ret_rms}

    def prepare(self, agent, started: bool) -> None:
        pass

    def reference(self) -> torch.nn.Module | None:
        return None

    def before_update(self, agent) -> dict[str, float]:
        return {}

    def rewards(self, agent) -> np.ndarray:
        """Rewards the critic learns from, ``[T, N]`` (the running std updated with this rollout's returns)."""
        buf = agent.buffer
        if not self.config.normalize_reward:
            return buf.rewards
        returns = np.empty_like(buf.rewards)
        for t in range(buf.T):
            self.ret_acc = self.ret_acc * self.config.gamma + buf.rewards[t]
            returns[t] = self.ret_acc
            self.ret_acc[buf.done[t]] = 0.0
        self.ret_rms.update(returns.reshape(-1))
        return np.clip(buf.rewards / np.sqrt(self.ret_rms.var + 1e-8), -10, 10)

    def state_dict(self) -> dict:
        return {"ret_acc": torch.as_tensor(self.ret_acc)}

    def load_state_dict(self, state: dict) -> None:
        self.ret_acc = state["ret_acc"].numpy().copy()


@register("ppo")
class PPO(OnPolicyAgent):
    """PPO on the reward its ``reward`` component gives (the true reward; a learned one for ``rlhf``)."""

    config_cls = PPOConfig
    config: PPOConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reward = self.config.reward_component(self)

    def modules(self) -> dict:
        return {**super().modules(), **self.reward.modules()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reward": self.reward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])

    def start_spec(self) -> str | None:
        return self.config.init

    def prepare(self, start: dict | None, source: str = "") -> None:
        super().prepare(start, source)
        self.reward.prepare(self, start is not None)

    def reference(self) -> torch.nn.Module | None:
        return self.reward.reference()

    def update(self, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        c, buf = self.config, self.buffer
        metrics: dict[str, float] = self.reward.before_update(self)  # RLHF: new labels, reward-model fit
        lr = self.set_lr()
        buf.compute_gae(c.gamma, c.gae_lambda, rewards=self.reward.rewards(self))
        batch = buf.flat(self.device)
        adv_all = batch["advantages"]  # A_r
        if self.lagrangian is not None:
            metrics.update(self.lagrangian.dual_step(buf.costs, episodes))
            adv_all = self.lagrangian.advantages(buf.advantages, buf.cost_advantages)  # A_L = (A_r - lam A_c) / (1 + lam)
        n = buf.T * buf.N
        if c.diag_every and self.updates % c.diag_every == 0:
            metrics["grad/pg_halves_cos"] = self.halves_cosine(batch, adv_all)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "grad_norm")}
        stop = False
        for _ in range(c.epochs):
            for idx in self.minibatches(n, c.minibatch):
                adv = adv_all[idx]
                if c.normalize_advantage and len(idx) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                dist = self.policy.dist(batch["obs"][idx])
                logp = dist.log_prob(batch["actions"][idx]).sum(-1)
                pg_loss, approx_kl, clipfrac = clipped_surrogate(logp, batch["logp"][idx], adv, c.clip)
                v_loss = self.value_loss(self.value, batch["obs"][idx], batch["returns"][idx], batch["values"][idx])
                entropy = dist.entropy().sum(-1).mean()
                loss = pg_loss + c.vf_coef * v_loss - c.ent_coef * entropy
                if self.lagrangian is not None:
                    loss = loss + c.vf_coef * self.lagrangian.cost_value_loss(batch["obs"][idx], batch["cost_returns"][idx])
                stats["grad_norm"].append(self.step_optimizer(loss))
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
                if c.target_kl is not None and float(approx_kl) > 1.5 * c.target_kl:
                    stop = True
                    break
            if stop:
                break
        self.updates += 1
        y, v = buf.returns.reshape(-1), buf.values.reshape(-1)
        explained = 1 - np.var(y - v) / np.var(y) if np.var(y) > 0 else float("nan")
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in stats.items()})
        metrics.update({"train/explained_variance": float(explained), "train/lr": lr, "train/log_std": self.policy.log_std.mean().item()})
        return metrics

    def halves_cosine(self, batch: dict[str, torch.Tensor], adv: torch.Tensor) -> float:
        """``grad/pg_halves_cos``: the policy gradient at theta_old on the first and on the second half of the
        rollout's steps (advantages normalized within each half), in the mean network's weights: the anchor
        for SAIL's ``grad/dpo_halves_cos``."""
        late = torch.arange(len(adv), device=adv.device) // self.buffer.N >= self.buffer.T // 2  # flat index t * N + n

        def pg(half: int) -> torch.Tensor:
            idx = torch.nonzero(late == bool(half)).flatten()
            a = (adv[idx] - adv[idx].mean()) / (adv[idx].std() + 1e-8)
            return (self.policy.log_prob(batch["obs"][idx], batch["actions"][idx]) * a).mean()

        return halves_cosine(pg, list(self.policy.mean.parameters()))

    def value_loss(self, net: torch.nn.Module, obs: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor) -> torch.Tensor:
        """``0.5 * (V(s) - R)^2``, optionally clipped around the behaviour-time values."""
        v = net(obs)
        if self.config.clip_value is None:
            return 0.5 * ((v - returns) ** 2).mean()
        v_clipped = old_values + (v - old_values).clamp(-self.config.clip_value, self.config.clip_value)
        return 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
