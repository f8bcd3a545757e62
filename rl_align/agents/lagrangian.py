"""The Lagrangian layer for constrained RL, shared by every agent (DESIGN.md, "Constrained RL").

    max_pi J_r(pi)  s.t.  J_c(pi) <= d,      L = J_r - lam (J_c - d),  lam >= 0

A cost critic gives cost advantages ``A_c`` (GAE on the shared buffer's costs). PPO's policy step uses
``A_L = (A_r - lam A_c) / (1 + lam)``; SAIL adds ``lam`` times the clipped cost surrogate to its
preference loss. The multiplier moves once per iteration on ``g_k = Jc_hat_k - d`` (mean cost of the
episodes that finished in the rollout):

    pd   lam <- max(0, lam + eta g_k)                                  projected gradient ascent
    pid  lam <- max(0, Kp g_k + I_k + Kd max(0, Jc_k - Jc_{k-1})),     I_k = max(0, I_{k-1} + Ki g_k)
         (Stooke, Achiam & Abbeel 2020; the integral is clamped at 0: anti-windup)
    opd  lam <- max(0, lam + eta (2 g_k - g_{k-1}))                    optimistic dual step
         primal on 2 A_L^k - A_L^{k-1}, A_L^{k-1} from the previous iteration's critics and multiplier
         evaluated on the current samples (Li, Ju & Shroff 2026). ``primal_optimism`` /
         ``dual_optimism`` switch each half off; both off is exactly ``pd``.

Configured by the agent's ``constraint`` section (``agent.constraint.method=opd``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from rl_align.buffer import gae
from rl_align.errors import UserError
from rl_align.nets import ValueNet, numpy_forward

METHODS = ("none", "pd", "pid", "opd")


@dataclass
class ConstraintConfig:
    method: str = "none"  # none | pd | pid | opd
    limit: float | None = None  # cost limit d per episode; None: the env's cost.limit
    lam_init: float = 0.0
    lam_lr: float = 0.05  # eta of pd / opd
    lam_max: float = 100.0  # upper projection bound, keeps a runaway multiplier finite
    kp: float = 0.1  # PID gains (Stooke et al. 2020 use costs normalized per episode; see the presets)
    ki: float = 0.01
    kd: float = 0.01
    primal_optimism: bool = True  # opd: primal step on 2 A_L^k - A_L^{k-1}
    dual_optimism: bool = True  # opd: dual step on 2 g_k - g_{k-1}

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"agent.constraint.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for k in ("lam_init", "lam_lr", "kp", "ki", "kd"):
            if getattr(self, k) < 0:
                raise UserError(f"agent.constraint.{k} must be >= 0, got {getattr(self, k)}")
        if self.limit is not None and self.limit < 0:
            raise UserError(f"agent.constraint.limit must be >= 0 (a cost budget per episode), got {self.limit}")
        if self.lam_max <= 0:
            raise UserError(f"agent.constraint.lam_max must be > 0, got {self.lam_max}")


class Lagrangian:
    """Multiplier, cost critic and (for OPD) the previous iteration's snapshot, attached to an agent."""

    def __init__(self, config: ConstraintConfig, agent) -> None:
        self.config = config
        c = agent.config
        agent.cost_value = ValueNet(agent.buffer.obs.shape[-1], c.hidden, c.activation, c.ortho_init).to(agent.device)
        agent.optimizer.add_param_group({"params": list(agent.cost_value.parameters())})
        self.limit = config.limit  # set from the env by the trainer when None
        self.lam = float(config.lam_init)
        self.g_prev: float | None = None  # g_{k-1}
        self.integral = 0.0  # PID I term
        self.jc_prev: float | None = None  # PID D term
        self.cum_violation = 0.0
        self.iterations = 0
        self.snapshot: dict | None = None  # critics + multiplier that produced the previous rollout's A_L
        self.advantages: torch.Tensor | None = None

    # ---- dual -------------------------------------------------------------------------------------
    def dual_step(self, jc: float) -> float:
        """Move ``lam`` on the episode cost ``jc`` of this iteration; returns the new ``lam``."""
        c, g = self.config, jc - self.limit
        if c.method == "pid":
            self.integral = max(0.0, self.integral + c.ki * g)  # anti-windup: I never goes below 0
            deriv = max(0.0, jc - self.jc_prev) if self.jc_prev is not None else 0.0
            lam = c.kp * g + self.integral + c.kd * deriv
            self.jc_prev = jc
        elif c.method == "opd" and c.dual_optimism and self.g_prev is not None:
            lam = self.lam + c.lam_lr * (2 * g - self.g_prev)  # optimistic: predicted gradient 2 g_k - g_{k-1}
        else:
            lam = self.lam + c.lam_lr * g  # projected gradient ascent on Jc - d
        self.g_prev = g
        self.lam = float(min(max(lam, 0.0), c.lam_max))
        return self.lam

    # ---- hooks the agents call ----------------------------------------------------------------------
    def before_update(self, agent) -> dict[str, float]:
        """Dual step on this rollout's episode cost, then the Lagrangian advantages for the primal step."""
        episodes = agent.last_episodes or list(getattr(agent, "episode_history", []))[-10:]
        m: dict[str, float] = {}
        lam_prev = self.lam
        if episodes:
            costs = np.asarray([e[1] for e in episodes])
            jc = float(costs.mean())
            self.dual_step(jc)
            viol = max(0.0, jc - self.limit)
            self.cum_violation += viol
            m.update({"safety/ep_cost": jc, "safety/violation": viol, "safety/over_budget_share": float((costs > self.limit).mean())})
        self.iterations += 1
        buf = agent.buffer
        a_l = self._lagrangian_advantage(buf.advantages, buf.cost_advantages, self.lam)
        c = self.config
        current = self._critic_snapshot(agent, self.lam)
        if c.method == "opd" and c.primal_optimism and self.snapshot is not None:
            prev = self.snapshot
            adv_prev = self._advantages_with(prev, agent)
            a_l = 2 * a_l - adv_prev  # optimistic primal: 2 A_L^k - A_L^{k-1}
            m["safety/optimism_shift"] = float(np.abs(a_l - adv_prev).mean())
        if c.method == "opd":
            self.snapshot = current
        self.advantages = torch.as_tensor(a_l.reshape(-1), dtype=torch.float32, device=agent.device)
        m.update({"safety/lambda": self.lam, "safety/lambda_prev": lam_prev, "safety/cum_violation": self.cum_violation,
                  "safety/limit": float(self.limit)})
        return m

    def policy_advantages(self, agent, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.advantages

    def cost_value_loss(self, agent, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """``0.5 (V_c(s) - R_c)^2`` on the minibatch: the cost critic learns beside the reward critic."""
        return 0.5 * ((agent.cost_value(batch["obs"][idx]) - batch["cost_returns"][idx]) ** 2).mean()

    def sail_cost_loss(self, agent, batch: dict[str, torch.Tensor], n_minibatches: int) -> torch.Tensor:
        """For preference agents: ``lam`` times the clipped cost surrogate on a random minibatch of steps,
        plus the cost critic's loss (minimized beside the preference loss)."""
        from rl_align.agents.ppo import clipped_surrogate

        n = batch["obs"].shape[0]
        idx = torch.as_tensor(agent.rng.choice(n, size=max(1, n // n_minibatches), replace=False), device=agent.device)
        a_c = batch["cost_advantages"][idx]
        a_c = (a_c - a_c.mean()) / (a_c.std() + 1e-8) if len(idx) > 1 else a_c
        logp = agent.policy.log_prob(batch["obs"][idx], batch["actions"][idx])
        cost_surr, _, _ = clipped_surrogate(logp, batch["logp"][idx], -a_c, agent.config.clip)  # minimizing lowers cost
        return self.lam * cost_surr + 0.5 * self.cost_value_loss(agent, batch, idx)

    def after_update(self, agent) -> dict[str, float]:
        return {}

    # ---- pieces --------------------------------------------------------------------------------------
    @staticmethod
    def _lagrangian_advantage(a_r: np.ndarray, a_c: np.ndarray, lam: float) -> np.ndarray:
        return (a_r - lam * a_c) / (1.0 + lam)  # A_L = (A_r - lam A_c) / (1 + lam)

    @staticmethod
    def _critic_snapshot(agent, lam: float) -> dict:
        """Copies of the critics that produced this rollout's values, and the multiplier."""
        return {"value": copy.deepcopy(agent.value.state_dict()), "cost": copy.deepcopy(agent.cost_value.state_dict()), "lam": lam}

    def _advantages_with(self, snap: dict, agent) -> np.ndarray:
        """``A_L^{k-1}``: GAE of the current samples under the snapshot critics and multiplier. (At a
        truncation the bootstrap value is the current critic's: the final observation is not stored.)"""
        buf, c = agent.buffer, agent.config
        T, N = buf.T, buf.N
        obs = buf.obs.reshape(T * N, -1)
        critic = copy.deepcopy(agent.value)
        critic.load_state_dict(snap["value"])
        value = numpy_forward(critic.net)
        critic.load_state_dict(snap["cost"])
        cost = numpy_forward(critic.net)
        v, vc = value(obs)[:, 0].reshape(T, N), cost(obs)[:, 0].reshape(T, N)
        lv, lvc = value(buf.last_obs)[:, 0], cost(buf.last_obs)[:, 0]
        args = (buf.terminated, buf.truncated, c.gamma, c.gae_lambda)
        a_r, _ = gae(agent.gae_rewards, v, lv, buf.final_values, *args)
        a_c, _ = gae(buf.costs, vc, lvc, buf.final_cost_values, *args)
        return self._lagrangian_advantage(a_r, a_c, snap["lam"])

    def state_dict(self) -> dict:
        return {"lam": self.lam, "g_prev": self.g_prev, "integral": self.integral, "jc_prev": self.jc_prev,
                "cum_violation": self.cum_violation, "iterations": self.iterations, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
