"""SAIL, SAIL-RevKL and online iterative DPO: learning from preference labels only (docs/design.md,
"SAIL, SAIL-RevKL and online DPO").

The objective, ``J = dpo + shift_coef * shift - revkl_coef * revkl (+ bc_coef * bc)``, is a pure
function of (policy, reference, batch, coefficients) in :mod:`rl_align.agents.sail_objective`; this
module is the agent around it: the rollout (with ``shared_start`` branches and antithetic noise), the
labelled pairs of its segments as a :class:`~rl_align.agents.preferences.PreferenceBatch` (or a label
store's, rl_align/labels/learn.py), the replay store, and the update's orchestration: what is fixed at
theta_old, the epochs of minibatches of pairs, the optimizer, the diagnostics. The agent never reads
``buffer.rewards``: only the oracle does (and the label-agreement diagnostic, which asks the oracle).

Constrained variant: when ``self.lagrangian`` is set (rl_align.agents.lagrangian), each minibatch's loss
also adds ``lam`` times the clipped cost surrogate on a minibatch of steps and the cost critic's loss
(docs/design.md, "Constrained RL"); it enters beside ``-J``, not inside it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from rl_align.agents import register
from rl_align.agents.base import OnPolicyAgent, OnPolicyConfig
from rl_align.agents.preferences import PreferenceBatch, label_pairs, pair_accuracy
from rl_align.agents.sail_objective import SAILCoefficients, SAILObjective
from rl_align.diagnostics import DiagnosticsConfig, PLDiagnostics
from rl_align.errors import UserError
from rl_align.labels.learn import sail_batch
from rl_align.nets import policy_kl


@dataclass
class SAILConfig(OnPolicyConfig):
    n_envs: int = 8
    n_steps: int = 250
    epochs: int = 10
    minibatch_pairs: int = 100  # labelled pairs per minibatch
    minibatch: int | None = None  # removed: PPO's minibatch counts steps, this one pairs (kept so that setting it says so)
    beta: float = 0.1  # implicit-reward scale
    revkl_coef: float = 0.0  # lambda of SAIL-RevKL, per segment-summed KL (the units of beta); 0 is SAIL
    revkl_std: bool = True  # False: penalize only the mean part of the Gaussian KL
    shift_coef: float = 1.0  # weight of the distribution-shift part; 0 is online iterative DPO
    baseline: bool = True  # leave-one-out baseline in the shift part's per-segment weights
    normalize_shift: bool = True  # normalize the shift weights like advantages (False: the exact-gradient scale)
    segment_len: int = 50
    pairs_per_batch: int | None = None  # None: all pairs of segments in the rollout
    shared_start: int = 1  # G > 1: groups of G envs start every segment window from one state; pairs within a group
    antithetic: bool = False  # with shared_start: envs 2m + 1 act with the negated noise of envs 2m (mirrored branches)
    replay: int = 0  # the DPO part also draws on the labelled pairs of this many earlier rollouts
    replay_ratio: float = 1.0  # stored pairs per fresh pair in each update (when replay > 0)
    loser_weight: float = 1.0  # CPL's conservative margin h_w - loser_weight * h_l (1: plain DPO)
    bc_coef: float = 0.0  # weight of a behaviour-cloning term on the winners' log-likelihood
    target_kl: float | None = None  # stop the epochs when approx KL to the behaviour policy passes 1.5 x this
    center_h: bool = False  # DPO part on h minus its expectation under pi_old at each segment's states (see the module doc)
    log_std_min: float | None = None  # floor on the policy's log-std, kept by projection after each step (None: no floor)
    dpo_clip: bool = False  # the DPO part as its gradient at theta_old behind PPO's per-step clipped ratios (a trust region)
    ref: str = "auto"  # auto | init | path to a run folder or checkpoint
    ref_agent: str = "ppo"  # preset that trains the auto reference
    ref_steps: int = 50_000  # env steps of the auto reference's PPO run
    kl_limit: float = 200.0  # stop the run when the per-state KL(pi || pi_ref) exceeds this
    max_grad_norm: float = 0.5
    diag_every: int = 5  # per-term gradient diagnostics every this many updates (0: off); pref/ accuracies every update
    curvature_every: int = 25  # PL gap (f_star by maximization) and Hessian eigenvalues every this many updates (0: off)
    diag_pairs: int = 64  # pairs in the fixed batch the diagnostics use
    f_star: float | None = None
    win_rate_episodes: int = 4  # matched rollouts per evaluation for the win rate against pi_ref

    def __post_init__(self) -> None:
        if self.minibatch is not None:
            raise UserError(f"agent.minibatch is agent.minibatch_pairs for the preference agents (it counts labelled pairs, "
                            f"PPO's counts steps); use --set agent.minibatch_pairs={self.minibatch}")
        super().__post_init__()
        if self.minibatch_pairs < 1:
            raise UserError(f"agent.minibatch_pairs must be >= 1, got {self.minibatch_pairs}")
        for k in ("revkl_coef", "shift_coef", "kl_limit", "ref_steps", "diag_every", "curvature_every", "replay", "replay_ratio", "bc_coef"):
            if getattr(self, k) < 0:
                raise UserError(f"agent.{k} must be >= 0, got {getattr(self, k)}")
        if self.beta <= 0:
            raise UserError(f"agent.beta must be > 0, got {self.beta}")
        if not 0 < self.loser_weight <= 1:
            raise UserError(f"agent.loser_weight must be in (0, 1] (1 is plain DPO, CPL uses 0.5), got {self.loser_weight}")
        if self.dpo_clip and self.replay:
            raise UserError("agent.dpo_clip needs the behaviour log-probs of every pair's segments: it works on fresh pairs only, set agent.replay=0")
        if self.target_kl is not None and self.target_kl <= 0:
            raise UserError(f"agent.target_kl must be > 0 or null (no early stop), got {self.target_kl}")
        if self.segment_len < 1 or self.segment_len > self.n_steps:
            raise UserError(f"agent.segment_len={self.segment_len} must be between 1 and agent.n_steps={self.n_steps} (a segment lies inside one rollout)")
        if self.shared_start < 1 or self.n_envs % self.shared_start or (self.shared_start > 1 and self.n_steps % self.segment_len):
            raise UserError(f"agent.shared_start={self.shared_start} must be >= 1 and divide agent.n_envs={self.n_envs}; "
                            f"above 1 agent.segment_len={self.segment_len} must divide agent.n_steps={self.n_steps}")
        if self.antithetic and self.shared_start % 2:
            raise UserError(f"agent.antithetic pairs envs 2m and 2m + 1 of a group: it needs an even agent.shared_start, got {self.shared_start}")
        if self.pairs_per_batch is not None and self.pairs_per_batch < 1:
            raise UserError(f"agent.pairs_per_batch must be >= 1 or null (all pairs), got {self.pairs_per_batch}")
        if self.diag_pairs < 2 or self.win_rate_episodes < 1:
            raise UserError("agent.diag_pairs must be >= 2 and agent.win_rate_episodes >= 1")

    def make_objective(self) -> SAILObjective:
        """The objective component, its coefficients read once here (COMALConfig returns its inner solver's)."""
        return SAILObjective(SAILCoefficients.of(self))

    def make_schedule(self, agent):
        """The reference schedule component: none, pi_ref stays fixed (COMALConfig returns its outer loop)."""
        return None


class Antithetic:
    """Action noise with rows ``2m + 1`` the negation of rows ``2m`` (``antithetic``): two branches from
    one state then try mirrored actions first, and their label is the sign of a finite difference.
    Each row alone is still ``N(0, I)``, so each branch is on-policy."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        eps = self.rng.standard_normal(shape)
        eps[1::2] = -eps[0::2]
        return eps


class PairStore:
    """The labelled pairs of the last ``window`` rollouts, with what the DPO part needs to recompute
    ``h``: each segment's states, actions, mask and ``pi_ref`` log-probs. A component with its own state."""

    FIELDS = ("obs", "actions", "ref_logp", "mask")

    def __init__(self, window: int) -> None:
        self.window = window
        self.rollouts: list[dict[str, torch.Tensor]] = []

    def add(self, b: PreferenceBatch) -> None:
        if self.window == 0:
            return
        self.rollouts.append({**{k: getattr(b, k) for k in self.FIELDS}, "i": b.i, "j": b.j, "pref1": b.pref1})
        del self.rollouts[: -self.window]

    def clear(self) -> None:
        self.rollouts = []

    def sample(self, n: int, rng: np.random.Generator) -> PreferenceBatch | None:
        """``n`` stored pairs drawn uniformly without replacement, as one batch of segments with pair
        indices (``old_logp`` 0: stored pairs enter the DPO part only)."""
        if not self.rollouts or n == 0:
            return None
        offsets = np.concatenate([[0], np.cumsum([len(r["obs"]) for r in self.rollouts])[:-1]])
        seg = {k: torch.cat([r[k] for r in self.rollouts]) for k in self.FIELDS}
        i = torch.cat([r["i"] + int(o) for r, o in zip(self.rollouts, offsets)])
        j = torch.cat([r["j"] + int(o) for r, o in zip(self.rollouts, offsets)])
        pref1 = torch.cat([r["pref1"] for r in self.rollouts])
        pick = torch.as_tensor(rng.choice(len(pref1), size=min(n, len(pref1)), replace=False), device=pref1.device)
        return PreferenceBatch(old_logp=torch.zeros_like(seg["ref_logp"]), i=i[pick], j=j[pick], pref1=pref1[pick], on_policy=False, **seg)

    def state_dict(self) -> dict:
        return {"rollouts": [{k: v.cpu() for k, v in r.items()} for r in self.rollouts]}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = [dict(r) for r in state["rollouts"]]


@register("sail")
class SAIL(OnPolicyAgent):
    config_cls = SAILConfig
    config: SAILConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.oracle is None:
            raise UserError("SAIL learns from preference labels: the env needs an oracle section")
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)  # pi_ref; `init` until prepare()
        c = self.config
        self.diagnostics = PLDiagnostics(DiagnosticsConfig(every=c.curvature_every, f_star=c.f_star))
        self.store = PairStore(c.replay)
        self.objective = c.make_objective()  # SAILObjective; COMAL's INPO objective
        self.schedule = c.make_schedule(self)  # None; COMAL's reference schedule (moves pi_ref between updates)

    def modules(self) -> dict:
        extra = self.schedule.modules() if self.schedule is not None else {}
        return {**super().modules(), "ref_policy": self.ref_policy, "diagnostics": self.diagnostics, "store": self.store, **extra}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.schedule is not None:
            state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"] if "schedule" in state else state["comal"])  # "comal": older checkpoints

    # ---- the reference policy ---------------------------------------------------------------------
    def start_spec(self) -> str | None:
        """``ref``: ``auto`` (the shipped or cached PPO reference), a run folder / checkpoint / ``sb3:`` zip,
        or ``init`` (pi_ref is the freshly initialized policy: nothing to load)."""
        return None if self.config.ref == "init" else self.config.ref

    def prepare(self, start: dict | None, source: str = "") -> None:
        """pi_ref <- the resolved reference; the policy starts from its weights and both see states through
        its frozen normalizer. Without one (``ref: init``) pi_ref is the initial policy."""
        if start is not None:
            self.load_start(start, source)
            self.freeze_obs_rms = True
        self.ref_policy.load_state_dict(self.policy.state_dict())
        if self.schedule is not None:
            self.schedule.prepare(self)

    def reference(self) -> torch.nn.Module:
        """pi_ref; with a reference schedule, the reference the run started from."""
        return self.schedule.reference() if self.schedule is not None else self.ref_policy

    def moving_reference(self) -> torch.nn.Module | None:
        return self.ref_policy if self.schedule is not None else None

    # ---- the rollout ------------------------------------------------------------------------------
    def before_step(self, env, raw_obs: np.ndarray, tracker, t: int, actor) -> np.ndarray:
        """``shared_start``: at each window start, the envs of a group take their first env's state (the
        paired segments then share their start, the "prompt"). A branched env's own trajectory ends
        here: its previous step is marked truncated and bootstrapped from the state it left (for the cost critic)."""
        G, buf = self.config.shared_start, self.buffer
        if G == 1 or t % self.config.segment_len:
            return raw_obs
        raw_obs = raw_obs.copy()
        for lead in range(0, env.n_envs, G):
            dst = list(range(lead + 1, lead + G))
            cut = [k for k in dst if t > 0 and not (buf.terminated[t - 1, k] or buf.truncated[t - 1, k])]  # (an ended episode is cut already)
            if cut:
                buf.truncated[t - 1, cut] = True
                buf.final_values[t - 1, cut], buf.final_cost_values[t - 1, cut] = actor.values(self.normalize(raw_obs[cut]))
            raw_obs[dst] = env.copy_state(lead, dst)
            tracker.copy(lead, dst)
        return raw_obs

    def action_noise(self):
        return Antithetic(self.act_rng) if self.config.antithetic else self.act_rng

    # ---- the batch --------------------------------------------------------------------------------
    def _batch(self) -> PreferenceBatch | None:
        """Label pairs of this rollout's segments: the segments and the valid (non-tie, non-skipped) pairs,
        with the oracle's agreement with the true return (a diagnostic it computes). With a label store,
        its labelled pairs instead (off-policy: no shift part; rl_align/labels/learn.py)."""
        c = self.config
        if self.oracle.config.kind == "human":
            return sail_batch(self)
        lp = label_pairs(self.buffer, c.segment_len, c.pairs_per_batch, self.rng, self.oracle, c.shared_start)
        if lp is None:
            return None
        seg, i, j, labels = lp.seg, lp.i, lp.j, lp.labels
        valid = (labels == 0.0) | (labels == 1.0)  # ties and skipped queries carry no direction
        if not valid.any():
            return None
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        obs, act, mask = t(seg.obs), t(seg.actions), t(seg.mask)
        with torch.no_grad():
            ref_logp = self.ref_policy.log_prob(obs, act) * mask  # [M, H]
        return PreferenceBatch(obs=obs, actions=act, mask=mask, old_logp=t(seg.logp), ref_logp=ref_logp,
                               i=torch.as_tensor(i[valid], device=self.device), j=torch.as_tensor(j[valid], device=self.device),
                               pref1=t(labels[valid]), n_labels=int(np.isfinite(labels).sum()), n_ties=int((labels == 0.5).sum()),
                               oracle_agreement=lp.agreement)

    def _with_replay(self, fresh: PreferenceBatch) -> PreferenceBatch:
        """The fresh batch extended by stored pairs (``replay_ratio`` per fresh pair): fresh segments and pairs first."""
        c = self.config
        return fresh.extended(self.store.sample(int(round(c.replay_ratio * fresh.n_pairs)), self.rng) if c.replay else None)

    # ---- the update -------------------------------------------------------------------------------
    def update(self, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        """Collect-time work done, one update: label, fix what stays fixed at theta_old, then epochs of
        minibatches of pairs maximizing J (minus the Lagrangian cost term when constrained)."""
        c, J = self.config, self.objective
        lr = self.set_lr()
        metrics: dict[str, float] = {"train/lr": lr}
        if self.lagrangian is not None:
            self.buffer.compute_gae(c.gamma, c.gae_lambda, rewards=np.zeros_like(self.buffer.costs))  # never the true reward: only cost advantages are used
            metrics.update(self.lagrangian.dual_step(self.buffer.costs, episodes))
        fresh = self._batch()
        self.updates += 1
        if fresh is None:  # no valid pair: skip, or Adam's momentum would still move the weights
            metrics["train/skipped"] = 1.0
            return self._scheduled(metrics, float("nan"))
        fresh, f = J.prepare(self.policy, self.ref_policy, fresh)
        b, t0 = J.at_theta_old(self.policy, self.ref_policy, self._with_replay(fresh))
        metrics["pref/heldout_accuracy"] = J.heldout_accuracy(b, t0)
        M, P, P_fresh = b.n_fresh_segments, b.n_pairs, b.n_fresh_pairs
        fresh_idx = torch.arange(P_fresh, device=self.device)
        d_idx = fresh_idx[: c.diag_pairs]
        if c.diag_every > 0 and (self.updates - 1) % c.diag_every == 0:
            metrics.update(J.term_gradients(self.policy, self.ref_policy, b, d_idx, self._cost_part()))
        if self.diagnostics.due(self.updates - 1):
            metrics.update(self.diagnostics.measure(J.fixed_batch_objective(self.ref_policy, b, d_idx), self.policy))
        params = list(self.policy.parameters())
        before = torch.nn.utils.parameters_to_vector(params).detach().clone()
        flat = self.buffer.flat(self.device) if self.lagrangian is not None else None
        stats = {k: [] for k in ("dpo", "shift", "revkl", "grad_norm", "approx_kl")}
        n_mb = max(1, -(-P // c.minibatch_pairs))
        stop, epochs_run = False, 0
        for _ in range(c.epochs):
            for idx in self.minibatches(P, c.minibatch_pairs):
                terms = J.terms(self.policy, self.ref_policy, b, idx)
                loss = -J.objective(terms)
                if self.lagrangian is not None:
                    loss = loss + self.lagrangian.cost_surrogate_loss(self.policy, flat, self.cost_steps(flat, n_mb), c.clip)
                stats["grad_norm"].append(self.step_optimizer(loss))
                with torch.no_grad():
                    if c.log_std_min is not None:  # projected step onto {log_std >= floor}
                        self.policy.log_std.clamp_(min=c.log_std_min)
                    log_ratio = (terms["logp"][:M] - b.old_logp[:M]) * b.mask[:M]
                    approx_kl = float((((log_ratio.exp() - 1) - log_ratio) * b.mask[:M]).sum() / b.mask[:M].sum())
                for k in ("dpo", "shift", "revkl"):
                    stats[k].append(float(terms[k].detach()))
                stats["approx_kl"].append(approx_kl)
                if c.target_kl is not None and approx_kl > 1.5 * c.target_kl:
                    stop = True
                    break
            epochs_run += 1
            if stop:
                break
        self.store.add(fresh)
        with torch.no_grad():
            h = J.terms(self.policy, self.ref_policy, b, fresh_idx)["h"]
            metrics["pref/train_accuracy"] = pair_accuracy(h[fresh.i], h[fresh.j], fresh.pref1)
            kl_ref = policy_kl(self.policy, self.ref_policy, torch.as_tensor(self.buffer.obs.reshape(-1, self.buffer.obs.shape[-1]), device=self.device))
            entropy = float(self.policy.dist(torch.as_tensor(self.buffer.obs[0], device=self.device)).entropy().sum(-1).mean())
            update_norm = float((torch.nn.utils.parameters_to_vector(params) - before).norm())
        if kl_ref > c.kl_limit:
            raise UserError(f"KL(pi || pi_ref) = {kl_ref:.1f} exceeded agent.kl_limit={c.kl_limit} at env step {self.env_steps}; "
                            "lower agent.lr or raise agent.beta / agent.revkl_coef (last good checkpoint kept)")
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in stats.items()})
        metrics.update({
            "train/valid_pairs": float(P_fresh), "train/replayed_pairs": float(P - P_fresh), "train/ties": float(fresh.n_ties),
            "train/epochs": float(epochs_run), "train/kl_ref": kl_ref, "train/entropy": entropy, "train/update_norm": update_norm,
            "train/log_std": self.policy.log_std.mean().item(), "pref/oracle_agreement": fresh.oracle_agreement,
        })
        return self._scheduled(metrics, f)

    def _cost_part(self) -> dict[str, torch.Tensor]:
        """The Lagrangian cost term as it enters beside J (for the ``grad/cost`` diagnostic), or nothing.
        It draws a minibatch of steps from ``self.rng``: the training stream is left as it was."""
        if self.lagrangian is None:
            return {}
        state = self.rng.bit_generator.state
        flat = self.buffer.flat(self.device)
        part = -self.lagrangian.cost_surrogate_loss(self.policy, flat, self.cost_steps(flat, 1), self.config.clip)
        self.rng.bit_generator.state = state
        return {"cost": part}

    def cost_steps(self, flat: dict[str, torch.Tensor], n_minibatches: int) -> torch.Tensor:
        """A random ``1 / n_minibatches`` of the rollout's steps (from ``self.rng``) for the Lagrangian cost term."""
        n = flat["obs"].shape[0]
        return torch.as_tensor(self.rng.choice(n, size=max(1, n // n_minibatches), replace=False), device=self.device)

    def _scheduled(self, metrics: dict[str, float], f: float) -> dict[str, float]:
        """After the update, the reference schedule (if any) may move pi_ref; ``f`` is the loss's statistic."""
        if self.schedule is not None:
            metrics.update(self.schedule.after_update(self, metrics, f))
        return metrics
