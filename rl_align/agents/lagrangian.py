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

One cost limit: ``env.cost.limit``, which the training loop hands the agent at construction
(``cost_limit``, beside the horizon). Configured by the agent's ``constraint`` section, one dataclass per
rule holding only that rule's fields (``agent.constraint.method=opd``).

The layer owns its cost critic and that critic's Adam; it writes nothing into the agent. The agent adds
what the layer returns (``advantages``, ``cost_value_loss``, ``cost_surrogate_loss``) to its own step, and
clips the gradient norm over its parameters and the layer's together (``parameters``), then steps both
optimizers: one global norm, as when the critic was a parameter group of the agent's optimizer, so the
numbers are the same (Adam is per parameter: two optimizers over the split groups step as one did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import gymnasium as gym
import numpy as np
import torch

from rl_align.errors import UserError
from rl_align.losses import clipped_surrogate
from rl_align.multipliers import OPD, PD, PID
from rl_align.nets import ValueNet, adam_kwargs

METHODS = ("none", "pd", "pid", "opd")


@dataclass
class ConstraintConfig:
    """``method: none``: no constraint. Each rule's config subclasses this one with its own fields only."""

    method: str = "none"  # none | pd | pid | opd
    limit: float | None = None  # removed: the one cost limit is env.cost.limit (kept so that setting it says so)

    def __post_init__(self) -> None:
        if self.limit is not None:
            raise UserError(f"agent.constraint.limit is gone: the cost limit is env.cost.limit (one field for training, evaluation "
                            f"and reports); use --set env.cost.limit={self.limit:g}")
        if self.method not in METHODS:
            raise UserError(f"agent.constraint.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("lam_init", "lam_lr", "kp", "ki", "kd") and not v >= 0:
                raise UserError(f"agent.constraint.{f.name} must be >= 0, got {v}")
        if hasattr(self, "lam_max") and not 0 < self.lam_max < math.inf:
            raise UserError(f"agent.constraint.lam_max must be > 0 and finite, got {self.lam_max}")

    @classmethod
    def variant(cls, data: dict, key: str) -> type:
        """The config class of the rule ``data["method"]`` names (``config.build`` asks); a field of another
        rule is refused in one line naming this rule's."""
        method = data.get("method", "none")
        if method not in RULES:
            raise UserError(f"{key}.method must be one of {', '.join(METHODS)}, got {method!r}")
        rule = RULES[method]
        names = [f.name for f in fields(rule) if f.name != "limit"]
        for k in data:
            if k not in names and k != "limit":
                raise UserError(f"{key}.{k} is not a field of the {method} rule; its fields: {', '.join(names)}")
        return rule

    @staticmethod
    def own_fields(data: dict) -> dict:
        """``data`` less the fields its rule does not have (a run folder's config.yaml written when one
        config held every rule's fields)."""
        names = {f.name for f in fields(RULES.get(data.get("method", "none"), ConstraintConfig))}
        return {k: v for k, v in data.items() if k in names}

    def multiplier(self, limit: float) -> PD:
        """The multiplier object of this rule for the cost limit ``limit``."""
        raise UserError("agent.constraint.method=none has no multiplier")


@dataclass
class PDConfig(ConstraintConfig):
    """Projected gradient ascent: ``lam <- clip(lam + lam_lr (Jc - d))``."""

    method: str = "pd"
    lam_init: float = 0.0
    lam_lr: float = 0.05  # eta
    lam_max: float = 100.0  # upper projection bound, keeps a runaway multiplier finite

    def multiplier(self, limit: float) -> PD:
        return PD(limit, self.lam_lr, self.lam_init, self.lam_max)


@dataclass
class OPDConfig(PDConfig):
    """Optimistic primal-dual: PD's fields and the two optimism switches."""

    method: str = "opd"
    primal_optimism: bool = True  # the policy steps on max(0, 2 lam_k - lam_{k-1})
    dual_optimism: bool = True  # the multiplier steps on 2 g_k - g_{k-1}

    def multiplier(self, limit: float) -> PD:
        return OPD(limit, self.lam_lr, self.lam_init, self.lam_max, self.primal_optimism, self.dual_optimism)


@dataclass
class PIDConfig(ConstraintConfig):
    """PID-Lagrangian gains (Stooke et al. 2020 use costs normalized per episode; see the presets)."""

    method: str = "pid"
    lam_init: float = 0.0
    kp: float = 0.1
    ki: float = 0.01
    kd: float = 0.01
    lam_max: float = 100.0

    def multiplier(self, limit: float) -> PD:
        return PID(limit, self.kp, self.ki, self.kd, self.lam_init, self.lam_max)


RULES: dict[str, type[ConstraintConfig]] = {"none": ConstraintConfig, "pd": PDConfig, "opd": OPDConfig, "pid": PIDConfig}


def episode_horizon(env_config) -> int:
    """H: ``env.max_episode_steps``, else the Gymnasium task's own limit (1000 for the MuJoCo tasks)."""
    if env_config.max_episode_steps is not None:
        return int(env_config.max_episode_steps)
    steps = gym.spec(env_config.task).max_episode_steps
    if steps is None:
        raise UserError(f"{env_config.task} has no episode limit; set env.max_episode_steps so the cost limit has a horizon")
    return int(steps)


class Lagrangian:
    """Multiplier + cost critic (and its optimizer). ``limit`` is ``env.cost.limit``, ``horizon`` the episode
    length H the per-step cost rate is scaled by; ``lr`` the critic's step size (the agent's schedule sets it)."""

    def __init__(self, config: ConstraintConfig, limit: float, horizon: int, obs_dim: int, hidden: list[int], activation: str,
                 ortho_init: bool, lr: float, device: torch.device) -> None:
        self.config, self.limit, self.horizon, self.device = config, float(limit), int(horizon), device
        self.multiplier = config.multiplier(self.limit)
        self.cost_value = ValueNet(obs_dim, hidden, activation, ortho_init).to(device)
        self.optimizer = torch.optim.Adam(self.cost_value.parameters(), lr=lr, eps=1e-5, **adam_kwargs(device))
        self.primal_lam = self.multiplier.primal_value  # the multiplier of the latest policy step
        self.cum_violation = 0.0
        self.iterations = 0

    @property
    def lam(self) -> float:
        return self.multiplier.value

    def cost_estimate(self, costs: np.ndarray) -> float:
        """``Jc_hat = H * mean per-step cost`` of this rollout's ``costs [T, N]`` (see the module docstring)."""
        return self.horizon * float(np.mean(costs))

    # ---- the dual step -------------------------------------------------------------------------------
    def dual_step(self, costs: np.ndarray, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        """The multiplier's step on this rollout's cost estimate (``costs [T, N]``); ``episodes``
        (``(return, cost, length)`` of those that ended in the rollout) are only logged."""
        jc = self.cost_estimate(costs)
        self.multiplier.update(jc)
        self.primal_lam = lam_p = self.multiplier.primal_value
        viol = max(0.0, jc - self.limit)
        self.cum_violation += viol
        self.iterations += 1
        m = {"safety/cost_estimate": jc, "safety/estimate_steps": float(costs.size), "safety/violation": viol,
             "safety/lambda": self.lam, "safety/lambda_prev": self.multiplier.lam_prev, "safety/primal_lambda": lam_p,
             "safety/primal_shift": lam_p - self.lam, "safety/cum_violation": self.cum_violation, "safety/limit": self.limit}
        if episodes:  # finished episodes, logged beside the estimate (not used by the multiplier)
            ep_costs = np.asarray([e[1] for e in episodes])
            m.update({"safety/ep_cost": float(ep_costs.mean()), "safety/over_budget_share": float((ep_costs > self.limit).mean())})
        return m

    # ---- what the agent adds to its primal step ----------------------------------------------------------
    def advantages(self, adv: np.ndarray, cost_adv: np.ndarray) -> torch.Tensor:
        """PPO's ``A_L = (A_r - lam_p A_c) / (1 + lam_p)``, flat ``[T N]``, from ``adv`` and ``cost_adv`` ``[T, N]``."""
        a_l = (adv - self.primal_lam * cost_adv) / (1.0 + self.primal_lam)
        return torch.as_tensor(a_l.reshape(-1), dtype=torch.float32, device=self.device)

    def cost_value_loss(self, obs: torch.Tensor, cost_returns: torch.Tensor) -> torch.Tensor:
        """``0.5 (V_c(s) - R_c)^2`` over ``obs [B, obs_dim]``: the cost critic learns beside the reward critic."""
        return 0.5 * ((self.cost_value(obs) - cost_returns) ** 2).mean()

    def cost_surrogate_loss(self, policy: torch.nn.Module, batch: dict[str, torch.Tensor], idx: torch.Tensor, clip: float) -> torch.Tensor:
        """For an agent whose own loss has no cost advantage (the preference agents): ``lam_p`` times PPO's
        clipped surrogate on ``-A_c`` over the steps ``idx`` of ``batch`` (normalized there), plus half the
        cost critic's loss on them."""
        a_c = batch["cost_advantages"][idx]
        a_c = (a_c - a_c.mean()) / (a_c.std() + 1e-8) if len(idx) > 1 else a_c
        logp = policy.log_prob(batch["obs"][idx], batch["actions"][idx])
        cost_surr, _, _ = clipped_surrogate(logp, batch["logp"][idx], -a_c, clip)  # minimizing lowers cost
        return self.primal_lam * cost_surr + 0.5 * self.cost_value_loss(batch["obs"][idx], batch["cost_returns"][idx])

    # ---- the critic's optimizer, stepped with the agent's ---------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """The cost critic's parameters: the agent clips its gradient norm over its own and these together."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.optimizer.step()

    # ---- checkpoints -------------------------------------------------------------------------------
    def modules(self) -> dict:
        """What a checkpoint holds of the layer: its multiplier state, the cost critic and its optimizer."""
        return {"lagrangian": self, "cost_value": self.cost_value, "cost_optimizer": self.optimizer}

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


def split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """An agent optimizer's state written when the cost critic was its second parameter group, as
    ``(agent's, cost critic's)`` optimizer states (the critic's parameters renumbered from 0)."""
    own, cost = state["param_groups"]
    ids = list(cost["params"])
    agent = {"state": {i: s for i, s in state["state"].items() if i in set(own["params"])}, "param_groups": [own]}
    layer = {"state": {k: state["state"][i] for k, i in enumerate(ids) if i in state["state"]},
             "param_groups": [{**cost, "params": list(range(len(ids)))}]}
    return agent, layer
