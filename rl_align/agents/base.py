"""What every agent shares, and the on-policy side.

:class:`Agent`: the config, the seeded generators, the observation normalizer, the policy's acting copy,
what the agent starts from, the step counters and the checkpoint state. The training loop calls only
``collect`` (gather env steps; an off-policy agent also learns there) and ``update`` (finish the
iteration, return scalars to log).

:class:`OnPolicyAgent`: the rollout buffer, the value nets, the Lagrangian layer, one optimizer and
``collect`` of ``n_steps`` per env (PPO, RLHF, the SAIL family, COMAL). The off-policy agent (SAC and the
PEBBLE family, rl_align/agents/sac.py) carries none of it. An algorithm subclasses one of the two."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rl_align.agents.lagrangian import ConstraintConfig, Lagrangian, split_optimizer_state
from rl_align.buffer import RolloutBuffer
from rl_align.envs import VecEnv
from rl_align.errors import UserError
from rl_align.nets import ACTIVATIONS, GaussianPolicy, RunningMeanStd, ValueNet, adam_kwargs, clip_grad_norm_, numpy_forward


@dataclass
class AgentConfig:
    """Fields common to every agent: envs, networks, optimizer step size, discount."""

    n_envs: int = 1
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    lr: float = 3e-4
    gamma: float = 0.99
    normalize_obs: bool = True

    def __post_init__(self) -> None:
        if self.n_envs < 1:
            raise UserError(f"agent.n_envs must be >= 1, got {self.n_envs}")
        if self.lr <= 0:
            raise UserError(f"agent.lr must be > 0, got {self.lr}")
        if not 0 <= self.gamma <= 1:
            raise UserError(f"agent.gamma must be in [0, 1], got {self.gamma}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"agent.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if any(h < 1 for h in self.hidden):
            raise UserError(f"agent.hidden sizes must be >= 1, got {self.hidden}")


@dataclass
class OnPolicyConfig(AgentConfig):
    """The on-policy side: rollout shape, GAE, epochs over each rollout, PPO's clip, the Lagrangian layer."""

    n_steps: int = 2048  # steps per env per rollout
    log_std_init: float = 0.0
    ortho_init: bool = True
    lr_schedule: str = "constant"  # constant | linear (to 0 at the end of the run)
    gae_lambda: float = 0.95
    epochs: int = 10
    minibatch: int = 64
    clip: float = 0.2
    max_grad_norm: float = 0.5
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)  # the Lagrangian layer (method: none | pd | pid | opd)

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("n_steps", "epochs", "minibatch"):
            if getattr(self, k) is not None and getattr(self, k) < 1:  # (None: renamed in a subclass, refused there)
                raise UserError(f"agent.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("clip", "max_grad_norm"):
            if getattr(self, k) <= 0:
                raise UserError(f"agent.{k} must be > 0, got {getattr(self, k)}")
        if not 0 <= self.gae_lambda <= 1:
            raise UserError(f"agent.gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.lr_schedule not in ("constant", "linear"):
            raise UserError(f"agent.lr_schedule must be constant or linear, got {self.lr_schedule!r}")


class Agent:
    """Base of every algorithm. Subclasses build ``self.policy`` (with ``dist_params(obs) -> (mu, log_std)``,
    the Gaussian before any squashing) and write ``collect`` and ``update``."""

    config_cls = AgentConfig
    policy: torch.nn.Module

    def __init__(self, config: AgentConfig, env: VecEnv, seed: int, device: str = "cpu", oracle=None, total_steps: int = 1) -> None:
        self.config, self.device, self.oracle = config, torch.device(device), oracle
        self.obs_dim, self.act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        self.act_low, self.act_high = env.action_space.low, env.action_space.high
        torch.manual_seed(seed)
        self.obs_rms = RunningMeanStd((self.obs_dim,))
        self.rng = np.random.default_rng(seed)
        self.act_rng = np.random.default_rng(seed + 1)  # action noise: its own stream
        self.env_steps = 0
        self.total_steps = total_steps  # the run's budget, for schedules
        self.updates = 0
        self.freeze_obs_rms = False  # preference agents see states through pi_ref's frozen normalizer

    # ---- what the agent starts from ----------------------------------------------------------------
    def start_spec(self) -> str | None:
        """What this agent's weights start from, as configured: a run folder or checkpoint, ``sb3:<zip>``,
        ``auto`` (the cached PPO reference) or None. The training loop resolves it (``train.prepare``)."""
        return None

    def prepare(self, start: dict | None, source: str = "") -> None:
        """Called once before training with the resolved start (``{"policy", "obs_rms"}``) or None."""
        if start is not None:
            self.load_start(start, source)

    def load_start(self, state: dict, source: str) -> None:
        """Copy the policy and observation normalizer of ``state`` (an "SFT" start) read from ``source``."""
        if "policy" not in state or "obs_rms" not in state:
            raise UserError(f"{source} holds no policy; give a run folder or checkpoint written by rl-align train")
        try:
            self.policy.load_state_dict(state["policy"])
        except RuntimeError:
            raise UserError(f"the policy at {source} has a different network than agent.hidden={self.config.hidden}; "
                            "set agent.hidden / agent.activation to match it") from None
        self.obs_rms.load_state_dict(state["obs_rms"])

    def freeze_normalizer(self) -> None:
        """Stop updating the observation normalizer (acting for someone else: collecting pairs to label)."""
        self.freeze_obs_rms = True

    def reference(self) -> torch.nn.Module | None:
        """The policy evaluation measures this agent against (win rate, KL): pi_ref, or None."""
        return None

    def moving_reference(self) -> torch.nn.Module | None:
        """A reference that moves during training (COMAL's prox centre, a lagged SAC reference), for
        ``eval/kl_to_current_ref``; or None."""
        return None

    # ---- acting ---------------------------------------------------------------------------------
    def normalize(self, raw_obs: np.ndarray) -> np.ndarray:
        return self.obs_rms.normalize(raw_obs) if self.config.normalize_obs else raw_obs.astype(np.float32)

    def actor(self, policy: torch.nn.Module | None = None) -> "NumpyActor":
        """A NumPy snapshot of ``policy`` (default: the agent's own) for acting (see ``nets.numpy_forward``)."""
        return NumpyActor(self.policy if policy is None else policy)

    def act(self, raw_obs: np.ndarray, deterministic: bool = False, actor: "NumpyActor | None" = None,
            rng: np.random.Generator | None = None) -> np.ndarray:
        """Env-ready actions ``[N, act_dim]`` (clipped to the bounds) from raw observations; action noise
        from ``rng`` (default: the agent's own stream)."""
        actor = actor or self.actor()
        obs = self.normalize(raw_obs)
        action = actor.mean(obs) if deterministic else actor.sample(obs, rng if rng is not None else self.act_rng)[0]
        return np.clip(action, self.act_low, self.act_high)

    # ---- one iteration of the training loop ---------------------------------------------------------
    def collect(self, env: VecEnv, raw_obs: np.ndarray, tracker: "EpisodeTracker") -> np.ndarray:
        """Step ``env`` from ``raw_obs`` for one iteration (recording finished episodes in ``tracker``);
        returns the next raw observations."""
        raise NotImplementedError

    def update(self, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        """Finish the iteration; ``episodes`` are the ``(return, cost, length)`` of the episodes that ended
        in it. Returns scalars to log (``train/``, ``pref/``, ``safety/``...)."""
        raise NotImplementedError

    def iteration_features(self) -> np.ndarray:
        """The per-step features ``[..., 3]`` (x-velocity, height, ||a||^2) of the last iteration's steps."""
        raise NotImplementedError

    # ---- checkpoints -------------------------------------------------------------------------------
    def modules(self) -> dict:
        """Everything with a ``state_dict`` that a checkpoint holds."""
        return {"policy": self.policy, "obs_rms": self.obs_rms}

    def state_dict(self) -> dict:
        state = {k: m.state_dict() for k, m in self.modules().items()}
        state.update(env_steps=self.env_steps, updates=self.updates, rng=self.rng.bit_generator.state,
                     act_rng=self.act_rng.bit_generator.state)
        if self.oracle is not None:
            state["oracle"] = self.oracle.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state[k])
        self.env_steps, self.updates = int(state["env_steps"]), int(state["updates"])
        self.rng.bit_generator.state = state["rng"]
        self.act_rng.bit_generator.state = state["act_rng"]
        if self.oracle is not None and "oracle" in state:
            self.oracle.load_state_dict(state["oracle"])


class OnPolicyAgent(Agent):
    """The on-policy side: Gaussian policy + value nets, the shared rollout buffer filled by ``collect``
    (``n_steps`` per env), the Lagrangian layer, one Adam optimizer. Subclasses write ``update``."""

    config_cls = OnPolicyConfig
    config: OnPolicyConfig

    def __init__(self, config: OnPolicyConfig, env: VecEnv, seed: int, device: str = "cpu", oracle=None, total_steps: int = 1,
                 cost_limit: float | None = None, horizon: int | None = None) -> None:
        """``cost_limit`` (``env.cost.limit``) and ``horizon`` (the episode length H) come from the training
        loop; a constrained agent needs both."""
        super().__init__(config, env, seed, device, oracle, total_steps)
        c, obs_dim, act_dim = config, self.obs_dim, self.act_dim
        self.policy = GaussianPolicy(obs_dim, act_dim, c.hidden, c.activation, c.log_std_init, c.ortho_init).to(self.device)
        self.value = ValueNet(obs_dim, c.hidden, c.activation, c.ortho_init).to(self.device)
        self.buffer = RolloutBuffer(c.n_steps, env.n_envs, obs_dim, act_dim)
        self.optimizer = torch.optim.Adam(list(self.policy.parameters()) + list(self.value.parameters()), lr=c.lr, eps=1e-5, **adam_kwargs(self.device))
        self.lagrangian: Lagrangian | None = None
        self._trained: list[torch.nn.Parameter] | None = None  # trained_parameters(), built on first use
        if c.constraint.method != "none":
            if cost_limit is None or horizon is None:
                raise ValueError("a constrained agent needs cost_limit (env.cost.limit) and horizon from the training loop")
            self.lagrangian = Lagrangian(c.constraint, cost_limit, horizon, obs_dim, c.hidden, c.activation, c.ortho_init, c.lr, self.device)

    def actor(self, policy: torch.nn.Module | None = None) -> "NumpyActor":
        """A NumPy snapshot for acting: the current policy and critics, or ``policy`` alone (e.g. pi_ref,
        seen through this agent's normalizer)."""
        if policy is not None:
            return NumpyActor(policy)
        return NumpyActor(self.policy, self.value, self.lagrangian.cost_value if self.lagrangian is not None else None)

    # ---- rollout ----------------------------------------------------------------------------------
    def collect(self, env: VecEnv, raw_obs: np.ndarray, tracker: "EpisodeTracker") -> np.ndarray:
        """Fill ``self.buffer`` with ``n_steps`` vector steps from ``raw_obs``; returns the next raw obs.
        Log-probs are of the unclipped sample; the env gets the action clipped to its bounds."""
        buf, actor = self.buffer, self.actor()
        for t in range(buf.T):
            raw_obs = self.before_step(env, raw_obs, tracker, t, actor)
            if self.config.normalize_obs and not self.freeze_obs_rms:
                self.obs_rms.update(raw_obs)
            obs = self.normalize(raw_obs)
            action, buf.logp[t] = actor.sample(obs, self.action_noise())
            buf.values[t], buf.cost_values[t] = actor.values(obs)
            step = env.step(np.clip(action, self.act_low, self.act_high))
            buf.obs[t], buf.raw_obs[t], buf.actions[t] = obs, raw_obs, action
            buf.rewards[t], buf.costs[t], buf.features[t] = step.rewards, step.costs, step.features
            buf.terminated[t], buf.truncated[t] = step.terminated, step.truncated
            buf.final_values[t] = buf.final_cost_values[t] = 0.0
            if step.truncated.any():  # bootstrap from the observation that ended the episode
                idx = np.flatnonzero(step.truncated)
                buf.final_values[t, idx], buf.final_cost_values[t, idx] = actor.values(self.normalize(step.final_obs[idx]))
            tracker.step(step.rewards, step.costs, step.terminated | step.truncated)
            raw_obs = step.obs
        buf.last_obs[:] = self.normalize(raw_obs)
        buf.last_values[:], buf.last_cost_values[:] = actor.values(buf.last_obs)
        self.env_steps += buf.T * buf.N
        return raw_obs

    def iteration_features(self) -> np.ndarray:
        return self.buffer.features

    def action_noise(self):
        """Where the rollout's action noise comes from (``standard_normal``): the agent's own stream."""
        return self.act_rng

    def before_step(self, env: VecEnv, raw_obs: np.ndarray, tracker: "EpisodeTracker", t: int, actor: "NumpyActor") -> np.ndarray:
        """A hook at the top of rollout step ``t``: the raw observations to act on (no change by default;
        the preference agents branch envs from a shared state here, ``shared_start``)."""
        return raw_obs

    # ---- optimizer helpers -------------------------------------------------------------------------
    def set_lr(self) -> float:
        frac = 1.0 - min(1.0, self.env_steps / max(1, self.total_steps)) if self.config.lr_schedule == "linear" else 1.0
        lr = self.config.lr * max(frac, 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.lagrangian is not None:
            self.lagrangian.set_lr(lr)
        return lr

    def step_optimizer(self, loss: torch.Tensor, params: list[torch.nn.Parameter] | None = None) -> float:
        """Backward, clip the gradient norm (over this agent's parameters and the Lagrangian layer's, one
        global norm, or over ``params``), Adam steps; returns the pre-clip gradient norm."""
        everything = self.trained_parameters()
        for p in everything:  # zero_grad(set_to_none=True) of both optimizers
            p.grad = None
        loss.backward()
        norm = clip_grad_norm_(params if params is not None else everything, self.config.max_grad_norm)
        self.optimizer.step()
        if self.lagrangian is not None:
            self.lagrangian.step()
        return float(norm)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of this agent's optimizer, then the Lagrangian layer's (fixed after construction)."""
        if self._trained is None:
            self._trained = [p for g in self.optimizer.param_groups for p in g["params"]] + (
                self.lagrangian.parameters() if self.lagrangian is not None else [])
        return self._trained

    def minibatches(self, n: int, size: int):
        """Shuffled index minibatches over ``n`` samples from the agent's seeded generator."""
        perm = torch.as_tensor(self.rng.permutation(n), device=self.device)
        for start in range(0, n, size):
            yield perm[start : start + size]

    # ---- checkpoints -------------------------------------------------------------------------------
    def modules(self) -> dict:
        mods = {**super().modules(), "value": self.value}
        if self.lagrangian is not None:
            mods.update(self.lagrangian.modules())
        return mods

    def state_dict(self) -> dict:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.lagrangian is not None and "cost_optimizer" not in state:  # written when the cost critic was a group of ours
            own, cost = split_optimizer_state(state["optimizer"])
            state = {**state, "optimizer": own, "cost_optimizer": cost}
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])


class NumpyActor:
    """Acting copy of a policy (and critics), in NumPy: ``mean``, ``sample`` (with log-prob), ``values``."""

    def __init__(self, policy: GaussianPolicy, value: ValueNet | None = None, cost_value: ValueNet | None = None) -> None:
        self.mean = numpy_forward(policy.mean)
        self.log_std = policy.log_std.detach().cpu().numpy().astype(np.float64)
        self.std = np.exp(self.log_std)
        self.value = numpy_forward(value.net) if value is not None else None
        self.cost_value = numpy_forward(cost_value.net) if cost_value is not None else None

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``a = mu(s) + std * eps`` and ``log pi(a|s)``, ``[N, act_dim]`` and ``[N]``."""
        mu = self.mean(obs)
        eps = rng.standard_normal(mu.shape)
        logp = (-0.5 * eps**2 - self.log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        return (mu + self.std * eps).astype(np.float32), logp

    def values(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = self.value(obs)[:, 0]
        c = self.cost_value(obs)[:, 0] if self.cost_value is not None else np.zeros_like(v)
        return v, c


class EpisodeTracker:
    """Sums reward, cost and length of the episodes running in each env; keeps the finished ones."""

    def __init__(self, n_envs: int) -> None:
        self.ret, self.cost, self.len = np.zeros(n_envs), np.zeros(n_envs), np.zeros(n_envs, int)
        self.finished: list[tuple[float, float, int]] = []

    def step(self, rewards: np.ndarray, costs: np.ndarray, done: np.ndarray) -> None:
        self.ret += rewards
        self.cost += costs
        self.len += 1
        for i in np.flatnonzero(done):
            self.finished.append((float(self.ret[i]), float(self.cost[i]), int(self.len[i])))
            self.ret[i] = self.cost[i] = self.len[i] = 0

    def copy(self, src: int, dst: list[int]) -> None:
        """Envs ``dst`` now continue env ``src``'s episode (``VecEnv.copy_state``): they inherit its sums."""
        for k in dst:
            self.ret[k], self.cost[k], self.len[k] = self.ret[src], self.cost[src], self.len[src]

    def pop(self) -> list[tuple[float, float, int]]:
        out, self.finished = self.finished, []
        return out
