"""SAC (Haarnoja et al. 2018) on the replay buffer, and the off-policy preference agents built on it:
PEBBLE (a learned reward from a few hundred labels) and SAIL-RevKL in the form its paper ran on MuJoCo
(a KL term in the actor loss). See docs/design.md, "Off-policy preference learning".

Per gradient step, on a batch ``(s, a, r, s', d)`` from the replay buffer (``r``: the true reward for
``reward: env``, else the learned one; during PEBBLE's unsupervised phase the state-entropy reward):

    critic   L_Q = sum_i E[(Q_i(s, a) - y)^2],  y = r + gamma (1 - d) (min_i Qbar_i(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
    actor    L_pi = E[alpha log pi(a|s) - min_i Q_i(s, a) + revkl_coef * KL(pi(.|s) || pi_ref(.|s))],  a ~ pi (reparameterized)
    alpha    L_a = -E[log alpha * (log pi(a|s) + target_entropy)]
    targets  Qbar <- (1 - tau) Qbar + tau Q

``actor_step: npg`` replaces the actor's Adam step by the natural-gradient step of the paper's TRPO ablation
(its public code's ``sac_revkl_npg.py``): ``x = (F + damping I)^-1 g`` by conjugate gradient, ``g`` the
gradient of ``L_pi`` and ``F`` the Hessian of ``KL(pi_old || pi)`` at ``pi_old``, then
``theta <- theta - sqrt(2 max_kl / x^T (F + damping I) x) x``, halved once if the measured KL passes
``2 max_kl``; no line search.

The KL between two tanh-squashed Gaussians equals the KL of their pre-squash Gaussians (tanh is a
bijection), so it is closed form; ``revkl_direction: forward`` computes ``KL(pi_ref || pi)`` instead, which
is what the paper's public code does. ``revkl_coef = 0`` is PEBBLE exactly.

The training loop's iteration is ``log_every`` env steps; inside it the agent acts, stores, runs the
feedback schedule and takes ``updates_per_step`` gradient steps per env step, interleaved as in SAC.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rl_align.agents import register
from rl_align.agents.base import Agent, AgentConfig, EpisodeTracker, adam_kwargs
from rl_align.agents.pebble import RewardEnsemble, StateEntropy, select_queries
from rl_align.buffer import ReplayBuffer
from rl_align.envs import VecEnv
from rl_align.errors import UserError
from rl_align.labels.learn import arrived_labels, post_pairs
from rl_align.nets import Ensemble, SquashedGaussianPolicy, bounded_log_std, gaussian_kl, numpy_forward

QUERIES = ("uniform", "disagreement", "entropy")


def conjugate_gradient(Av, b: torch.Tensor, iters: int, tol: float = 1e-10) -> torch.Tensor:
    """``x ~= A^-1 b`` for a symmetric positive definite ``A`` given as the product ``Av(v)``, from ``x = 0``."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iters):
        if rr < tol:
            break
        Ap = Av(p)
        step = rr / (p @ Ap)
        x, r = x + step * p, r - step * Ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    return x


def fisher_product(policy: SquashedGaussianPolicy, obs: torch.Tensor, damping: float):
    """``v -> (F + damping I) v`` over the policy's flat parameters, and the policy's ``(mu, log_std)`` at
    ``obs`` now. ``F``, the Hessian of ``E_s KL(pi_old || pi)`` at ``pi_old``, is ``E_s J^T diag(1/std^2, 2) J``
    with ``J`` the Jacobian of ``(mu, log_std)`` (the KL's gradient is zero there); ``J v`` comes from
    differentiating ``J^T u`` in ``u``, so each product is two backward passes through graphs built once."""
    params = list(policy.parameters())
    flat = lambda tensors: torch.cat([t.reshape(-1) for t in tensors])  # noqa: E731
    out = torch.cat(policy(obs), -1)  # [B, 2 act_dim]: (mu, log_std)
    old = out.detach().chunk(2, -1)
    fisher = torch.cat([torch.exp(-2 * old[1]), torch.full_like(old[1], 2.0)], -1) / len(obs)
    u = torch.zeros_like(out, requires_grad=True)
    jt_u = flat(torch.autograd.grad(out, params, grad_outputs=u, create_graph=True))  # J^T u, linear in u

    def fvp(v: torch.Tensor) -> torch.Tensor:
        jv = torch.autograd.grad(jt_u, u, grad_outputs=v, retain_graph=True)[0]
        return flat(torch.autograd.grad(out, params, grad_outputs=fisher * jv, retain_graph=True)) + damping * v

    return fvp, old


@dataclass
class SACConfig(AgentConfig):
    """SAC with stable-baselines3's defaults; the preference pipeline and the KL term off by default."""

    hidden: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    lr: float = 3e-4  # actor and critics
    alpha_lr: float | None = None  # the temperature's step size; None: lr
    normalize_obs: bool = False
    batch: int = 256
    buffer_size: int = 1_000_000  # capped at the run's steps
    learning_starts: int = 100  # env steps of uniform random actions before the first update
    updates_per_step: float = 1.0  # gradient steps per env step
    tau: float = 0.005
    target_every: int = 1  # gradient steps between Polyak updates
    init_temperature: float = 1.0
    target_entropy: float | None = None  # None: -act_dim
    log_std_bounds: list[float] = field(default_factory=lambda: [-5.0, 2.0])
    log_every: int = 1000  # env steps per training-loop iteration (one logged row)
    # the preference pipeline (PEBBLE): the reward is learned from the env's oracle
    reward: str = "env"  # env (the true reward) | preferences (learned from the env's oracle)
    segment_len: int = 50
    feedback_every: int = 5000  # env steps between feedback sessions
    queries_per_feedback: int = 10
    query: str = "disagreement"  # uniform | disagreement | entropy (the first session is always uniform)
    query_pool: int = 10  # candidates per query: the pool holds query_pool * queries_per_feedback pairs
    query_window: int = 100_000  # candidates come from the last this many env steps
    unsup_steps: int = 0  # PEBBLE's unsupervised pre-training on the state-entropy reward, after learning_starts
    entropy_k: int = 5
    reset_updates: int = 100  # gradient steps right after the critic is reset at the first feedback
    rm_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    rm_ensemble: int = 3
    rm_lr: float = 3e-4
    rm_batch: int = 128
    rm_epochs: int = 200  # at most, per feedback session (stops when the train accuracy reaches rm_stop_accuracy)
    rm_stop_accuracy: float = 0.97
    rm_output: str = "tanh"  # tanh (B-Pref's: each member in [-1, 1]) | linear (unbounded: no saturation at the top)
    # SAIL-RevKL off-policy: the KL term of the actor loss
    revkl_coef: float = 0.0
    revkl_direction: str = "reverse"  # reverse: KL(pi || pi_ref); forward: KL(pi_ref || pi), the paper's code
    ref: str = "lagged"  # lagged | init | <run folder or checkpoint of an sac run> | sb3:<SB3 SAC model.zip>
    ref_every: int = 50_000  # lagged: pi_ref <- pi every this many env steps after ref_start
    ref_start: int = 5_000
    win_rate_episodes: int = 4
    # the actor's step: adam, or the paper's natural-gradient step (sac_revkl_npg.py) in a KL trust region
    actor_step: str = "adam"  # adam | npg
    npg_max_kl: float = 0.01
    npg_cg_iters: int = 10
    npg_damping: float = 0.1
    recent_batch: int = 0  # > 0: each gradient step after the unsupervised phase trains on the newest this many transitions (the npg script)

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("batch", "buffer_size", "target_every", "log_every", "segment_len", "feedback_every", "queries_per_feedback",
                  "query_pool", "query_window", "entropy_k", "rm_ensemble", "rm_batch", "rm_epochs", "ref_every", "win_rate_episodes",
                  "npg_cg_iters"):
            if getattr(self, k) < 1:
                raise UserError(f"agent.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("learning_starts", "unsup_steps", "reset_updates", "ref_start", "recent_batch"):
            if getattr(self, k) < 0:
                raise UserError(f"agent.{k} must be >= 0, got {getattr(self, k)}")
        if not 0 < self.tau <= 1:
            raise UserError(f"agent.tau must be in (0, 1], got {self.tau}")
        if self.updates_per_step <= 0 or self.init_temperature <= 0 or self.rm_lr <= 0 or (self.alpha_lr is not None and self.alpha_lr <= 0):
            raise UserError("agent.updates_per_step, agent.init_temperature, agent.rm_lr and agent.alpha_lr must be > 0")
        if self.revkl_coef < 0:
            raise UserError(f"agent.revkl_coef must be >= 0, got {self.revkl_coef}")
        if self.reward not in ("env", "preferences"):
            raise UserError(f"agent.reward must be env (the true reward) or preferences, got {self.reward!r}")
        if self.query not in QUERIES:
            raise UserError(f"agent.query must be one of {', '.join(QUERIES)}, got {self.query!r}")
        if self.rm_output not in ("tanh", "linear"):
            raise UserError(f"agent.rm_output must be tanh or linear, got {self.rm_output!r}")
        if self.actor_step not in ("adam", "npg"):
            raise UserError(f"agent.actor_step must be adam or npg (the natural-gradient step), got {self.actor_step!r}")
        if self.npg_max_kl <= 0 or self.npg_damping < 0:
            raise UserError(f"agent.npg_max_kl must be > 0 and agent.npg_damping >= 0, got {self.npg_max_kl} and {self.npg_damping}")
        if self.revkl_direction not in ("reverse", "forward"):
            raise UserError(f"agent.revkl_direction must be reverse or forward, got {self.revkl_direction!r}")
        if len(self.log_std_bounds) != 2 or self.log_std_bounds[0] >= self.log_std_bounds[1]:
            raise UserError(f"agent.log_std_bounds must be [low, high] with low < high, got {self.log_std_bounds}")
        if not 0 < self.rm_stop_accuracy <= 1:
            raise UserError(f"agent.rm_stop_accuracy must be in (0, 1], got {self.rm_stop_accuracy}")


class SquashedActor:
    """NumPy acting copy of a :class:`SquashedGaussianPolicy`: ``mean`` (``tanh(mu)``) and ``sample``, in
    the policy's ``[-1, 1]`` units (the agent scales to the action bounds)."""

    def __init__(self, policy: SquashedGaussianPolicy) -> None:
        self.trunk = numpy_forward(policy.trunk)
        self.bounds = policy.log_std_min, policy.log_std_max, policy.log_std_bound

    def _params(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, raw = np.split(self.trunk(obs), 2, axis=-1)
        return mu, bounded_log_std(raw, *self.bounds)

    def mean(self, obs: np.ndarray) -> np.ndarray:
        return np.tanh(self._params(obs)[0])

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, None]:
        mu, log_std = self._params(obs)
        return np.tanh(mu + np.exp(log_std) * rng.standard_normal(mu.shape)).astype(np.float32), None


class Temperature(torch.nn.Module):
    """SAC's learned ``alpha = exp(log_alpha)``."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.log_alpha = torch.nn.Parameter(torch.tensor(float(np.log(init))))


@register("sac")
class SAC(Agent):
    """SAC; with ``reward: preferences`` the PEBBLE family (and SAIL-RevKL with ``revkl_coef > 0``)."""

    config_cls = SACConfig
    config: SACConfig

    def __init__(self, config: SACConfig, env: VecEnv, seed: int, device: str = "cpu", oracle=None, total_steps: int = 1) -> None:
        super().__init__(config, env, seed, device, oracle, total_steps)
        c, obs_dim, act_dim = config, self.obs_dim, self.act_dim
        if c.reward == "preferences" and oracle is None:
            raise UserError("agent.reward=preferences learns from the env's oracle: give the env an oracle section")
        self.policy = SquashedGaussianPolicy(obs_dim, act_dim, c.hidden, c.activation, tuple(c.log_std_bounds)).to(self.device)
        self.critic = Ensemble(2, obs_dim + act_dim, 1, c.hidden, c.activation).to(self.device)  # twin Q
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.temperature = Temperature(c.init_temperature).to(self.device)
        kw = adam_kwargs(self.device)
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=c.lr, **kw)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr, **kw)
        self.alpha_opt = torch.optim.Adam(self.temperature.parameters(), lr=c.alpha_lr or c.lr, **kw)
        self.target_entropy = -float(act_dim) if c.target_entropy is None else c.target_entropy
        self.replay = ReplayBuffer(min(c.buffer_size, max(total_steps, c.batch)), env.n_envs, obs_dim, act_dim)
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False) if c.revkl_coef > 0 else None
        self.ref_net = None  # pi_ref's own network, when it is not the policy's (an SB3 SAC model)
        self.reward_model = (RewardEnsemble(obs_dim, act_dim, c.rm_hidden, c.rm_ensemble, c.rm_lr, c.rm_output).to(self.device)
                             if c.reward == "preferences" else None)
        self.entropy = StateEntropy(c.entropy_k)
        self.act_scale, self.act_shift = (self.act_high - self.act_low) / 2, (self.act_high + self.act_low) / 2
        self.update_debt = 0.0  # fractional gradient steps owed (updates_per_step * env steps taken)
        self.feedback_sessions = 0
        self._metrics: dict[str, list[float]] = {}
        self._features: list[np.ndarray] = []
        self._actor: SquashedActor | None = None

    # ---- acting -----------------------------------------------------------------------------------
    def actor(self, policy: torch.nn.Module | None = None) -> SquashedActor:
        return SquashedActor(self.policy if policy is None else policy)

    def act(self, raw_obs: np.ndarray, deterministic: bool = False, actor: SquashedActor | None = None,
            rng: np.random.Generator | None = None) -> np.ndarray:
        """Env-ready actions ``[N, act_dim]``: the squashed action scaled to the bounds."""
        actor = actor or self.actor()
        obs = self.normalize(raw_obs)
        a = actor.mean(obs) if deterministic else actor.sample(obs, rng if rng is not None else self.act_rng)[0]
        return self._to_env(a)

    def _to_env(self, a: np.ndarray) -> np.ndarray:
        return np.clip(a * self.act_scale + self.act_shift, self.act_low, self.act_high)

    def reference(self) -> torch.nn.Module | None:
        """A fixed pi_ref is what evaluation measures against; a lagged one moves (``moving_reference``)."""
        return self.ref_policy if self.ref_policy is not None and self.config.ref != "lagged" else None

    def moving_reference(self) -> torch.nn.Module | None:
        return self.ref_policy if self.config.ref == "lagged" else None

    def start_spec(self) -> str | None:
        c = self.config
        return c.ref if self.ref_policy is not None and c.ref not in ("lagged", "init") else None

    def prepare(self, start: dict | None, source: str = "") -> None:
        """A fixed reference read from a run folder or checkpoint of an sac run, or from an SB3 SAC zip
        (``start["net"]``: its own network, which need not be the agent's); the policy is unchanged."""
        if start is None:
            return
        if "net" in start:  # sb3.agent_state of an SB3 SAC model
            self._own_reference(start["net"])
        try:
            self.ref_policy.load_state_dict(start["policy"])
        except (RuntimeError, KeyError):
            raise UserError(f"agent.ref={source} holds no sac policy of this size (agent.hidden={self.config.hidden}); "
                            "give a run folder written by an sac run of the same network") from None

    def _own_reference(self, net: dict) -> None:
        """pi_ref as a network of its own shape (``net``: SquashedGaussianPolicy's keyword arguments)."""
        obs_dim, act_dim = self.obs_rms.mean.shape[0], self.act_low.shape[0]
        self.ref_net = net
        self.ref_policy = SquashedGaussianPolicy(obs_dim, act_dim, **net).to(self.device).requires_grad_(False)

    # ---- one iteration: act, store, feedback, learn ---------------------------------------------------
    def collect(self, env: VecEnv, raw_obs: np.ndarray, tracker: EpisodeTracker) -> np.ndarray:
        c, N = self.config, env.n_envs
        self._features = []
        for _ in range(max(1, c.log_every // N)):
            before = self.env_steps
            if self.env_steps < c.learning_starts:  # uniform random actions first (SAC's warm-up)
                a = self.rng.uniform(-1.0, 1.0, size=(N, self.act_dim)).astype(np.float32)
            else:
                if self._actor is None:
                    self._actor = self.actor()
                a = self._actor.sample(self.normalize(raw_obs), self.act_rng)[0]
            if c.normalize_obs:
                self.obs_rms.update(raw_obs)
            step = env.step(self._to_env(a))
            done = step.terminated | step.truncated
            next_obs = np.where(done[:, None], step.final_obs, step.obs)
            learned = self.reward_model.predict(self.normalize(raw_obs), a) if self.reward_model is not None and self.reward_model.n_labels() else 0.0
            self.replay.add(raw_obs, next_obs, a, step.rewards, step.costs, step.features, step.terminated, step.truncated, learned)
            tracker.step(step.rewards, step.costs, done)
            self._features.append(step.features)
            raw_obs = step.obs
            self.env_steps += N
            self._schedule(before)
            if self.env_steps >= c.learning_starts:
                self.update_debt += N * c.updates_per_step
                while self.update_debt >= 1:
                    self.update_debt -= 1
                    self._record(self.gradient_step())
        return raw_obs

    def _crossed(self, before: int, every: int, offset: int = 0) -> bool:
        """Whether the env steps ``(before, env_steps]`` reach a multiple of ``every`` past ``offset``."""
        return (self.env_steps - offset) // every > (before - offset) // every and self.env_steps > offset

    def _schedule(self, before: int) -> None:
        """PEBBLE's feedback schedule and the lagged reference, at env step boundaries."""
        c = self.config
        if self.ref_policy is not None and c.ref == "lagged" and self.env_steps > c.ref_start and self._crossed(before, c.ref_every):
            self.ref_policy.load_state_dict(self.policy.state_dict())  # pi_ref <- pi: the proximal-point anchor moves
        if self.reward_model is None:
            return
        first = c.learning_starts + c.unsup_steps
        if before < first <= self.env_steps:
            self.feedback("uniform")
            self.critic = Ensemble(2, self.obs_dim + self.act_dim, 1, c.hidden, c.activation).to(self.device)  # reset Q after the unsupervised phase
            self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr, **adam_kwargs(self.device))
            for _ in range(c.reset_updates):
                self._record(self.gradient_step())
        elif self.env_steps > first and self._crossed(before, c.feedback_every, first) and self.oracle.remaining() != 0:
            self.feedback(c.query)

    def feedback(self, how: str) -> None:
        """One feedback session: pick pairs from a candidate pool of the replay buffer, ask the oracle (a
        person's label store: queue them and read what has been labelled), refit the reward ensemble on
        every label so far, relabel the whole replay buffer."""
        c, rm, t0 = self.config, self.reward_model, time.perf_counter()
        human = self.oracle.config.kind == "human"
        want = c.queries_per_feedback if not human else self.oracle.config.post_pairs
        want = want if self.oracle.remaining() is None else min(want, self.oracle.remaining())
        pool = want * (1 if how == "uniform" else c.query_pool)
        s1 = self.replay.segments(pool, c.segment_len, self.rng, c.query_window // self.replay.N) if want else None
        s2 = self.replay.segments(pool, c.segment_len, self.rng, c.query_window // self.replay.N) if want else None
        if s1 is not None:
            s1, s2 = self._normalized(s1), self._normalized(s2)
            pick = select_queries(rm, s1, s2, want, how, self.rng)
            s1, s2 = s1.take(pick), s2.take(pick)
        m: dict[str, float] = {}
        if human:  # queue the chosen pairs for a person, learn from whatever labels have arrived
            m["human/posted"] = float(post_pairs(self.oracle, s1, s2, self.env_steps)) if s1 is not None else 0.0
            s1, s2, labels = arrived_labels(self, self.oracle)
        elif s1 is not None:
            labels = self.oracle.label(s1, s2)
        else:
            return
        if s1 is None or len(labels) == 0:
            self._record(m)
            return
        m.update({"pebble/new_labels": float(np.isfinite(labels).sum()), "pref/oracle_agreement": self.oracle.agreement(s1, s2, labels)})
        if rm.n_labels():  # before the new labels join: the model's accuracy on pairs it never saw
            m["pref/heldout_accuracy"] = rm.accuracy(s1, s2, labels)
        rm.add(s1, s2, labels)
        if rm.n_labels():
            m.update(rm.fit(c.rm_epochs, c.rm_batch, c.rm_stop_accuracy, self.rng))
            self.replay.relabel(lambda o, a: rm.predict(self.normalize(o), a))
        self.feedback_sessions += 1
        m["pebble/labels"] = float(rm.n_labels())
        m["time/feedback_s"] = time.perf_counter() - t0
        self._record(m)

    def _normalized(self, seg):
        if self.config.normalize_obs:
            seg.obs = self.normalize(seg.obs)
        return seg

    # ---- one gradient step ---------------------------------------------------------------------------
    def gradient_step(self) -> dict[str, float]:
        c = self.config
        pretraining = self.reward_model is not None and self.env_steps < c.learning_starts + c.unsup_steps
        recent = c.recent_batch and not pretraining  # the npg script samples its unsupervised phase uniformly
        t, n = self.replay.recent_index(c.recent_batch) if recent else self.replay.sample_index(c.batch, self.rng)
        rb, dev = self.replay, self.device
        obs = torch.as_tensor(self.normalize(rb.obs[t, n]), device=dev)
        next_obs = torch.as_tensor(self.normalize(rb.next_obs[t, n]), device=dev)
        act = torch.as_tensor(rb.actions[t, n], device=dev)
        not_term = torch.as_tensor(1.0 - rb.terminated[t, n].astype(np.float32), device=dev)
        if pretraining:  # PEBBLE's unsupervised phase: the state-entropy reward, no task reward at all
            reward = self.entropy(obs, torch.as_tensor(self.normalize(rb.recent(10_000)), device=dev))
        elif self.reward_model is not None:
            reward = torch.as_tensor(rb.learned[t, n], device=dev)
        else:
            reward = torch.as_tensor(rb.rewards[t, n], dtype=torch.float32, device=dev)
        alpha = self.temperature.log_alpha.exp().detach()
        with torch.no_grad():  # y = r + gamma (1 - d) (min_i Qbar_i(s', a') - alpha log pi(a'|s'))
            a2, logp2, _ = self.policy.sample(next_obs)
            q_next = self.critic_target(torch.cat([next_obs, a2], -1)).squeeze(-1).min(0).values
            y = reward + c.gamma * not_term * (q_next - alpha * logp2)
        q = self.critic(torch.cat([obs, act], -1)).squeeze(-1)  # [2, B]
        critic_loss = ((q - y) ** 2).mean(-1).sum()  # sum of the twin critics' MSEs
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        a, logp, (mu, log_std) = self.policy.sample(obs)
        self.critic.requires_grad_(False)  # the actor's loss needs dQ/da, not the critics' weight gradients
        q_pi = self.critic(torch.cat([obs, a], -1)).squeeze(-1).min(0).values
        actor_loss = (alpha * logp - q_pi).mean()  # E[alpha log pi(a|s) - min_i Q_i(s, a)]
        m = {}
        if self.ref_policy is not None:
            kl = self.revkl_term(obs, mu, log_std)
            actor_loss = actor_loss + c.revkl_coef * kl  # + lambda KL(pi || pi_ref)
            m["train/kl_ref"] = float(kl.detach())
        if c.actor_step == "npg":
            m.update(self.natural_step(obs, actor_loss))
        else:
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
        self.critic.requires_grad_(True)

        alpha_loss = -(self.temperature.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        self.updates += 1
        if self.updates % c.target_every == 0:  # Qbar <- (1 - tau) Qbar + tau Q
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), c.tau)
        self._actor = None  # the acting copy is stale
        m.update({"train/critic_loss": float(critic_loss.detach()), "train/actor_loss": float(actor_loss.detach()),
                  "train/alpha": float(alpha), "train/entropy": float(-logp.detach().mean()), "train/q": float(q.detach().mean()),
                  "train/batch_reward": float(reward.mean())})
        return m

    def natural_step(self, obs: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
        """The natural-gradient actor step (the module docstring): ``x = (F + damping I)^-1 g`` by conjugate
        gradient (:func:`fisher_product`), then a step of quadratic KL ``max_kl``, halved once if the
        measured KL passes twice that."""
        c, params = self.config, list(self.policy.parameters())
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        fvp, (old_mu, old_log_std) = fisher_product(self.policy, obs, c.npg_damping)
        x = conjugate_gradient(fvp, g, c.npg_cg_iters)
        xFx = float(x @ fvp(x))
        if not math.isfinite(xFx) or xFx <= 0:  # no trust region to scale to: skip this actor step
            return {"train/npg_skipped": 1.0}
        old = torch.nn.utils.parameters_to_vector(params).detach()

        @torch.no_grad()
        def step(scale: float) -> float:  # theta <- theta_old - scale x; the KL it moved, measured
            torch.nn.utils.vector_to_parameters(old - scale * x, params)
            return float(gaussian_kl(old_mu, old_log_std, *self.policy(obs)).mean())

        scale = math.sqrt(2 * c.npg_max_kl / xFx)
        kl = step(scale)
        if kl > 2 * c.npg_max_kl:  # one backoff, as the paper's code; not a line search
            scale *= 0.5
            kl = step(scale)
        return {"train/npg_kl": kl, "train/npg_scale": scale, "train/npg_skipped": 0.0}

    def revkl_term(self, obs: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        """``E_s KL(pi(.|s) || pi_ref(.|s))`` (``forward``: ``KL(pi_ref || pi)``), the pre-squash Gaussians' KL."""
        with torch.no_grad():
            mu_ref, log_std_ref = self.ref_policy.dist_params(obs)
        if self.config.revkl_direction == "forward":
            return gaussian_kl(mu_ref, log_std_ref, mu, log_std).mean()
        return gaussian_kl(mu, log_std, mu_ref, log_std_ref).mean()

    def _record(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._metrics.setdefault(k, []).append(v)

    def update(self, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        """The iteration's gradient steps happened in ``collect``; this reports their means."""
        out = {k: float(np.mean(v)) for k, v in self._metrics.items()}
        for k, reduce in (("pebble/labels", max), ("time/feedback_s", sum)):
            if k in self._metrics:
                out[k] = float(reduce(self._metrics[k]))
        self._metrics = {}
        out["train/replay_size"] = float(len(self.replay))
        if self.reward_model is not None and self.reward_model.n_labels():  # logged only: the agent never trains on it
            out["pref/reward_corr"] = self.replay.reward_corr(max(1, self.config.log_every // self.replay.N))
        if not out.get("train/critic_loss") and self.env_steps < self.config.learning_starts:
            out["train/skipped"] = 1.0
        return out

    def iteration_features(self) -> np.ndarray:
        return np.asarray(self._features) if self._features else np.zeros((1, 1, 3), np.float32)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def modules(self) -> dict:
        mods = {**super().modules(), "critic": self.critic, "critic_target": self.critic_target, "temperature": self.temperature,
                "actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "alpha_opt": self.alpha_opt, "replay": self.replay,
                "entropy": self.entropy}
        if self.ref_policy is not None:
            mods["ref_policy"] = self.ref_policy
        if self.reward_model is not None:
            mods["reward_model"] = self.reward_model
        return mods

    def state_dict(self) -> dict:
        return {**super().state_dict(), "update_debt": self.update_debt, "feedback_sessions": self.feedback_sessions, "ref_net": self.ref_net}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ref_net"):  # a reference of its own shape (an SB3 SAC model): built before its weights load
            self._own_reference(state["ref_net"])
        super().load_state_dict(state)
        self.update_debt, self.feedback_sessions = float(state["update_debt"]), int(state["feedback_sessions"])
        self._actor = None
