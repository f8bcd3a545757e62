"""The Lagrangian layer for constrained RL, shared by every agent (docs/design.md, "Constrained RL").

    max_pi J_r(pi)  s.t.  J_c(pi) <= d,      L = J_r - lam (J_c - d),  lam >= 0

Three parts with one job each: the multiplier (a ``rl_align.multipliers`` object: PD, PID or OPD, which
sees only a cost number per iteration), the cost critic (GAE on the shared buffer's costs gives ``A_c``),
and this layer, which feeds the multiplier a fresh cost estimate every iteration and gives the policy
step its Lagrangian term:

    PPO    A_L = (A_r - lam_p A_c) / (1 + lam_p)
    SAIL   preference loss + lam_p * clipped cost surrogate on A_c

``lam_p`` is the multiplier's ``primal_value``: the current ``lam`` for PD / PID, OPD's extrapolated
``max(0, 2 lam_k - lam_{k-1})`` with primal optimism on.

Cost estimate of iteration k (never an old episode average): the rollout's per-step cost rate times the
episode horizon H (``env.max_episode_steps``, else the task's own limit),

    Jc_hat_k = H * sum_{t,i} c_{t,i} / (T N)          over the T x N steps of this rollout.

With 1000-step episodes ending in lockstep, most rollouts finish no episode; this estimate still comes
from this iteration's own T N steps. For tasks with early termination (Hopper, Walker2d, Ant) it is the
cost of a full-horizon episode at the current rate: the constraint reads "cost per step <= d / H", which
does not reward falling early to stop accruing cost. The episodes that did finish are logged beside it
(``safety/ep_cost``), not used by the multiplier.

One cost limit: ``env.cost.limit``, passed in by the agent at construction. Configured by the agent's
``constraint`` section (``agent.constraint.method=opd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from rl_align.errors import UserError
from rl_align.losses import clipped_surrogate
from rl_align.multipliers import OPD, PD, PID
from rl_align.nets import ValueNet

METHODS = ("none", "pd", "pid", "opd")


@dataclass
class ConstraintConfig:
    method: str = "none"  # none | pd | pid | opd
    limit: float | None = None  # removed: the one cost limit is env.cost.limit (kept so that setting it says so)
    lam_init: float = 0.0
    lam_lr: float = 0.05  # eta of pd / opd
    lam_max: float = 100.0  # upper projection bound, keeps a runaway multiplier finite
    kp: float = 0.1  # PID gains (Stooke et al. 2020 use costs normalized per episode; see the presets)
    ki: float = 0.01
    kd: float = 0.01
    primal_optimism: bool = True  # opd: the policy steps on max(0, 2 lam_k - lam_{k-1})
    dual_optimism: bool = True  # opd: the multiplier steps on 2 g_k - g_{k-1}

    def __post_init__(self) -> None:
        if self.limit is not None:
            raise UserError(f"agent.constraint.limit is gone: the cost limit is env.cost.limit (one field for training, evaluation "
                            f"and reports); use --set env.cost.limit={self.limit:g}")
        if self.method not in METHODS:
            raise UserError(f"agent.constraint.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for k in ("lam_init", "lam_lr", "kp", "ki", "kd"):
            if not getattr(self, k) >= 0:
                raise UserError(f"agent.constraint.{k} must be >= 0, got {getattr(self, k)}")
        if not 0 < self.lam_max < math.inf:
            raise UserError(f"agent.constraint.lam_max must be > 0 and finite, got {self.lam_max}")

    def multiplier(self, limit: float) -> PD:
        """The multiplier object of this rule for the cost limit ``limit``."""
        if self.method == "pid":
            return PID(limit, self.kp, self.ki, self.kd, self.lam_init, self.lam_max)
        if self.method == "opd":
            return OPD(limit, self.lam_lr, self.lam_init, self.lam_max, self.primal_optimism, self.dual_optimism)
        return PD(limit, self.lam_lr, self.lam_init, self.lam_max)


def episode_horizon(env_config) -> int:
    """H: ``env.max_episode_steps``, else the Gymnasium task's own limit (1000 for the MuJoCo tasks)."""
    if env_config.max_episode_steps is not None:
        return int(env_config.max_episode_steps)
    steps = gym.spec(env_config.task).max_episode_steps
    if steps is None:
        raise UserError(f"{env_config.task} has no episode limit; set env.max_episode_steps so the cost limit has a horizon")
    return int(steps)


class Lagrangian:
    """Multiplier + cost critic attached to an agent; ``limit`` is ``env.cost.limit``, ``horizon`` the
    episode length H the per-step cost rate is scaled by."""

    def __init__(self, config: ConstraintConfig, agent, limit: float, horizon: int) -> None:
        self.config, self.limit, self.horizon = config, float(limit), int(horizon)
        self.multiplier = config.multiplier(self.limit)
        c = agent.config
        agent.cost_value = ValueNet(agent.buffer.obs.shape[-1], c.hidden, c.activation, c.ortho_init).to(agent.device)
        agent.optimizer.add_param_group({"params": list(agent.cost_value.parameters())})
        self.primal_lam = self.multiplier.primal_value  # the multiplier of the latest policy step
        self.cum_violation = 0.0
        self.iterations = 0
        self.advantages: torch.Tensor | None = None

    @property
    def lam(self) -> float:
        return self.multiplier.value

    def cost_estimate(self, costs: np.ndarray) -> float:
        """``Jc_hat = H * mean per-step cost`` of this rollout's ``costs [T, N]`` (see the module docstring)."""
        return self.horizon * float(np.mean(costs))

    # ---- hooks the agents call ----------------------------------------------------------------------
    def before_update(self, agent, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        """Dual step on this rollout's cost estimate, then the Lagrangian advantages for the primal step;
        ``episodes`` (``(return, cost, length)`` of those that ended in the rollout) are only logged."""
        buf = agent.buffer
        jc = self.cost_estimate(buf.costs)
        self.multiplier.update(jc)
        self.primal_lam = lam_p = self.multiplier.primal_value
        viol = max(0.0, jc - self.limit)
        self.cum_violation += viol
        self.iterations += 1
        m = {"safety/cost_estimate": jc, "safety/estimate_steps": float(buf.costs.size), "safety/violation": viol,
             "safety/lambda": self.lam, "safety/lambda_prev": self.multiplier.lam_prev, "safety/primal_lambda": lam_p,
             "safety/primal_shift": lam_p - self.lam, "safety/cum_violation": self.cum_violation, "safety/limit": self.limit}
        if episodes:  # finished episodes, logged beside the estimate (not used by the multiplier)
            ep_costs = np.asarray([e[1] for e in episodes])
            m.update({"safety/ep_cost": float(ep_costs.mean()), "safety/over_budget_share": float((ep_costs > self.limit).mean())})
        a_l = (buf.advantages - lam_p * buf.cost_advantages) / (1.0 + lam_p)  # A_L = (A_r - lam A_c) / (1 + lam)
        self.advantages = torch.as_tensor(a_l.reshape(-1), dtype=torch.float32, device=agent.device)
        return m

    def cost_value_loss(self, agent, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """``0.5 (V_c(s) - R_c)^2`` on the minibatch: the cost critic learns beside the reward critic."""
        return 0.5 * ((agent.cost_value(batch["obs"][idx]) - batch["cost_returns"][idx]) ** 2).mean()

    def sail_cost_loss(self, agent, batch: dict[str, torch.Tensor], n_minibatches: int) -> torch.Tensor:
        """For preference agents: ``lam_p`` times the clipped cost surrogate on a random minibatch of steps,
        plus the cost critic's loss (minimized beside the preference loss)."""
        n = batch["obs"].shape[0]
        idx = torch.as_tensor(agent.rng.choice(n, size=max(1, n // n_minibatches), replace=False), device=agent.device)
        a_c = batch["cost_advantages"][idx]
        a_c = (a_c - a_c.mean()) / (a_c.std() + 1e-8) if len(idx) > 1 else a_c
        logp = agent.policy.log_prob(batch["obs"][idx], batch["actions"][idx])
        cost_surr, _, _ = clipped_surrogate(logp, batch["logp"][idx], -a_c, agent.config.clip)  # minimizing lowers cost
        return self.primal_lam * cost_surr + 0.5 * self.cost_value_loss(agent, batch, idx)

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier.state_dict(), "primal_lam": self.primal_lam,
                "cum_violation": self.cum_violation, "iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        if "multiplier" not in state:  # a checkpoint written before the multiplier objects: only lam carries over
            state = {"multiplier": {**self.multiplier.state_dict(), "lam": state["lam"], "lam_prev": state["lam"]},
                     "primal_lam": state["lam"], "cum_violation": state["cum_violation"], "iterations": state["iterations"]}
        self.multiplier.load_state_dict(state["multiplier"])
        self.primal_lam = float(state["primal_lam"])
        self.cum_violation, self.iterations = float(state["cum_violation"]), int(state["iterations"])
