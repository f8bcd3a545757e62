"""PPO on the true reward (Schulman et al. 2017): the baseline and the maker of reference policies.

Clipped surrogate ``L = E[min(rho A, clip(rho, 1-eps, 1+eps) A)]``, value loss, entropy bonus,
gradient-norm clipping, optional reward scaling (SB3 VecNormalize-style) and linear learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl_align.agents import register
from rl_align.agents.base import Agent, AgentConfig
from rl_align.errors import UserError
from rl_align.nets import RunningMeanStd


@dataclass
class PPOConfig(AgentConfig):
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    normalize_advantage: bool = True
    normalize_reward: bool = False  # divide rewards by the running std of the discounted return
    clip_value: float | None = None  # clip the value update as in the PPO paper's code; None: off
    target_kl: float | None = None  # stop the epoch loop early when approx KL exceeds it
    init: str | None = None  # run folder or checkpoint whose policy and obs normalizer this run starts from

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vf_coef < 0 or self.ent_coef < 0:
            raise UserError("agent.vf_coef and agent.ent_coef must be >= 0")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip loss to *minimize*, ``-E[min(rho A, clip(rho) A)]``; also approx KL and clip fraction."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator (Schulman 2020)
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, approx_kl, clipfrac


@register("ppo")
class PPO(Agent):
    config_cls = PPOConfig
    config: PPOConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ret_rms = RunningMeanStd(())
        self.ret_acc = np.zeros(self.buffer.N)  # running discounted return per env, for reward scaling

    def modules(self) -> dict:
        return {**super().modules(), "ret_rms": self.ret_rms}

    def prepare(self, cfg) -> None:
        if self.config.init:
            self.start_from(self.config.init)

    def training_rewards(self) -> np.ndarray:
        """Rewards the critic learns from, ``[T, N]``: raw, or divided by the running std of the
        discounted return (updated here with this rollout's returns)."""
        buf = self.buffer
        if not self.config.normalize_reward:
            return buf.rewards
        returns = np.empty_like(buf.rewards)
        for t in range(buf.T):
            self.ret_acc = self.ret_acc * self.config.gamma + buf.rewards[t]
            returns[t] = self.ret_acc
            self.ret_acc[buf.done[t]] = 0.0
        self.ret_rms.update(returns.reshape(-1))
        return np.clip(buf.rewards / np.sqrt(self.ret_rms.var + 1e-8), -10, 10)

    def policy_advantages(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Advantages the policy step uses: ``A_r``, or the Lagrangian combination when constrained."""
        if self.lagrangian is not None:
            return self.lagrangian.policy_advantages(self, batch)
        return batch["advantages"]

    def update(self) -> dict[str, float]:
        c, buf = self.config, self.buffer
        lr = self.set_lr()
        self.gae_rewards = self.training_rewards()
        buf.compute_gae(c.gamma, c.gae_lambda, rewards=self.gae_rewards)
        metrics: dict[str, float] = {}
        if self.lagrangian is not None:
            metrics.update(self.lagrangian.before_update(self))
        batch = buf.flat(self.device)
        adv_all = self.policy_advantages(batch)
        n = buf.T * buf.N
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
                    loss = loss + c.vf_coef * self.lagrangian.cost_value_loss(self, batch, idx)
                stats["grad_norm"].append(self.step_optimizer(loss))
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
                if c.target_kl is not None and float(approx_kl) > 1.5 * c.target_kl:
                    stop = True
                    break
            if stop:
                break
        self.updates += 1
        if self.lagrangian is not None:
            metrics.update(self.lagrangian.after_update(self))
        y, v = buf.returns.reshape(-1), buf.values.reshape(-1)
        explained = 1 - np.var(y - v) / np.var(y) if np.var(y) > 0 else float("nan")
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in stats.items()})
        metrics.update({"train/explained_variance": float(explained), "train/lr": lr, "train/log_std": self.policy.log_std.mean().item()})
        return metrics

    def value_loss(self, net: torch.nn.Module, obs: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor) -> torch.Tensor:
        """``0.5 * (V(s) - R)^2``, optionally clipped around the behaviour-time values."""
        v = net(obs)
        if self.config.clip_value is None:
            return 0.5 * ((v - returns) ** 2).mean()
        v_clipped = old_values + (v - old_values).clamp(-self.config.clip_value, self.config.clip_value)
        return 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
