"""SAIL, SAIL-RevKL and online iterative DPO: learning from preference labels only (DESIGN.md, "SAIL").

Segment log-likelihood ``log p_theta(s) = sum_t log pi_theta(a_t|s_t)``; implicit reward
``h(s) = beta * sum_t [log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)]``. Maximized, per rollout of pairs
sampled from the current policy and labelled by the oracle:

    J_SAIL  = E[log sigmoid(h(s_w) - h(s_l))]                                         (SAIL objective)
    grad    = E[grad log sigmoid(h_w - h_l)]                                          (1) DPO part
            + shift_coef * E[(log sigmoid(h_w - h_l) - b) (grad log p(s1) + grad log p(s2))]   (2) shift part
    J_RevKL = J_SAIL - revkl_coef * E_{s ~ pi}[ sum_{t in s} KL(pi(.|s_t) || pi_ref(.|s_t)) ]  (SAIL-RevKL)

The reverse KL is summed over each segment's H steps, as an LLM response's KL sums over its tokens, so
``beta`` and ``revkl_coef`` share units. Part (2) is a surrogate whose per-segment weights are computed
once, at theta_old (each segment's pairs' ``log sigmoid`` minus a leave-one-out baseline, normalized like
advantages), with per-step clipped importance ratios so the rollout can be reused for several epochs.
``revkl_coef = 0`` is exactly SAIL; ``shift_coef = 0`` is online DPO. The DPO part also draws on a store of
the labelled pairs of the last ``replay`` rollouts (labels are precious), optionally with CPL's
conservative margin ``h_w - loser_weight * h_l``. With ``center_h`` the DPO part compares
``h(s) - beta * sum_t KL(pi_old(.|s_t) || pi_ref(.|s_t))``, ``h`` minus its expectation over the actions at the
segment's own states (a state-only offset, fixed at theta_old): ``beta log pi/pi_ref`` minus its mean under
pi is an advantage, so two segments from different states are compared on their summed advantages (the
regret preference model of CPL) instead of on how far pi has moved from pi_ref in the states each visits.
With ``shared_start`` the pairs are of branches from one state (the "prompt" of a pair; see SAIL.before_step).
The agent never reads ``buffer.rewards``: only the oracle
does (and the label-agreement diagnostic, which asks the oracle).

Constrained variant: when ``self.lagrangian`` is set (rl_align.agents.lagrangian), each minibatch also adds
``lam`` times the clipped cost surrogate on a minibatch of steps and the cost critic's loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.agents import register
from rl_align.agents.base import OnPolicyAgent, OnPolicyConfig
from rl_align.agents.preferences import label_pairs, pair_accuracy, segment_logp
from rl_align.diagnostics import DiagnosticsConfig, PLDiagnostics, flat_grad, halves_cosine
from rl_align.errors import UserError
from rl_align.labels.learn import sail_batch
from rl_align.nets import gaussian_kl, policy_kl


@dataclass
class SAILConfig(OnPolicyConfig):
    n_envs: int = 8
    n_steps: int = 250
    epochs: int = 10
    minibatch: int = 100  # pairs per minibatch
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
        super().__post_init__()
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

    def make_loss(self, agent) -> "SAILLoss":
        """The objective component (COMALConfig returns its inner solver's)."""
        return SAILLoss(agent)

    def make_schedule(self, agent):
        """The reference schedule component: none, pi_ref stays fixed (COMALConfig returns its outer loop)."""
        return None


def implicit_reward(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``h(s) = beta * sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)]`` over the real steps, ``[M]`` from ``[M, H]``."""
    return beta * ((logp - ref_logp) * mask).sum(-1)


def dpo_term(h_w: torch.Tensor, h_l: torch.Tensor, loser_weight: float = 1.0) -> torch.Tensor:
    """(1) ``log sigmoid(h_w - h_l)`` per pair ``[P]``; ``loser_weight < 1`` is CPL's conservative margin."""
    return F.logsigmoid(h_w - loser_weight * h_l)


def shift_weights(i: torch.Tensor, j: torch.Tensor, logsig: torch.Tensor, n_segments: int, baseline: bool = True,
                  normalize: bool = True) -> torch.Tensor:
    """Per-segment weights of the shift part (2), computed once at theta_old, ``[M]``.

    ``(1/P) sum_p (logsig_p - b)(grad log p(s_i) + grad log p(s_j)) = sum_k w_k grad log p(s_k)`` with
    ``w_k = (sum_{p ∋ k} logsig_p - deg_k b_k) / P`` and ``b_k`` the mean ``logsig`` of the pairs without
    ``k`` (leave-one-out, so the estimator stays unbiased). ``normalize`` rescales ``w`` to zero mean and
    unit std over the segments, as PPO normalizes advantages (its scale is then ``shift_coef``'s)."""
    P = len(logsig)
    ones = torch.ones_like(logsig)
    sums = torch.zeros(n_segments, dtype=logsig.dtype, device=logsig.device).index_add_(0, i, logsig).index_add_(0, j, logsig)
    deg = torch.zeros_like(sums).index_add_(0, i, ones).index_add_(0, j, ones)
    b = (logsig.sum() - sums) / (P - deg).clamp(min=1) if baseline and P > 1 else torch.zeros_like(sums)
    w = (sums - deg * b) / P
    if normalize and n_segments > 1:
        w = (w - w.mean()) / (w.std() + 1e-8)
    return w


def dpo_weights(i: torch.Tensor, j: torch.Tensor, pref1: torch.Tensor, logsig: torch.Tensor, n_segments: int, beta: float,
                loser_weight: float = 1.0) -> torch.Tensor:
    """Per-segment weights of the DPO part's gradient at theta_old, ``[M]``: ``grad mean_p log sigmoid(h_w - lw h_l)
    = sum_k w_k grad log p(s_k)`` with ``w_k = beta / P * (sum_{p: k wins} s_p - lw * sum_{p: k loses} s_p)``,
    ``s_p = sigmoid(-(h_w - lw h_l)) = 1 - exp(logsig_p)``. ``dpo_clip`` puts them behind clipped ratios."""
    s = 1 - logsig.exp()
    w_idx, l_idx = torch.where(pref1 > 0.5, i, j), torch.where(pref1 > 0.5, j, i)
    g = torch.zeros(n_segments, dtype=s.dtype, device=s.device).index_add_(0, w_idx, s).index_add_(0, l_idx, -loser_weight * s)
    return beta * g / len(s)


def shift_term(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, clip: float) -> torch.Tensor:
    """(2) ``sum_k sum_t [min(rho_t w_k, clip(rho_t) w_k) - w_k]``, segments ``[M, H]``, weights ``[M]``:
    gradient ``sum_k w_k grad log p(s_k)`` at theta_old, value 0 there (PPO's per-step clipped ratios
    keep it a trust region over the epochs). Divided by ``M`` when the weights are normalized."""
    ratio = (logp - old_logp).exp()
    wk = w[:, None]
    surr = torch.min(ratio * wk, ratio.clamp(1 - clip, 1 + clip) * wk) - wk
    return (surr * mask).sum()


def segment_kl(kl_steps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse KL of each segment, summed over its real steps: ``[M, H] -> [M]``."""
    return (kl_steps * mask).sum(-1)


def expected_h(policy, ref_policy, obs: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``E_{a_t ~ policy}[h(s)] = beta * sum_t KL(policy(.|s_t) || pi_ref(.|s_t))`` at each segment's own states,
    ``[M]`` from states ``[M, H, obs]``: the offset ``center_h`` subtracts (a function of the states only)."""
    kl = gaussian_kl(policy.mean(obs), policy.log_std, ref_policy.mean(obs), ref_policy.log_std)
    return beta * segment_kl(kl, mask)


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

    def add(self, b: dict[str, torch.Tensor]) -> None:
        if self.window == 0:
            return
        self.rollouts.append({**{k: b[k] for k in self.FIELDS}, "i": b["i"], "j": b["j"], "pref1": b["pref1"]})
        del self.rollouts[: -self.window]

    def clear(self) -> None:
        self.rollouts = []

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor] | None:
        """``n`` stored pairs drawn uniformly without replacement, as one segment table with pair indices."""
        if not self.rollouts or n == 0:
            return None
        offsets = np.concatenate([[0], np.cumsum([len(r["obs"]) for r in self.rollouts])[:-1]])
        out = {k: torch.cat([r[k] for r in self.rollouts]) for k in self.FIELDS}
        i = torch.cat([r["i"] + int(o) for r, o in zip(self.rollouts, offsets)])
        j = torch.cat([r["j"] + int(o) for r, o in zip(self.rollouts, offsets)])
        pref1 = torch.cat([r["pref1"] for r in self.rollouts])
        pick = torch.as_tensor(rng.choice(len(pref1), size=min(n, len(pref1)), replace=False), device=pref1.device)
        out.update(i=i[pick], j=j[pick], pref1=pref1[pick])
        return out

    def state_dict(self) -> dict:
        return {"rollouts": [{k: v.cpu() for k, v in r.items()} for r in self.rollouts]}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = [dict(r) for r in state["rollouts"]]


class SAILLoss:
    """SAIL(-RevKL)'s objective on a batch of labelled pairs: its terms, ``J``, the per-term gradient
    diagnostics and the fixed-batch ``f`` of the PL diagnostics. A component of the preference agent:
    COMAL's INPO loss (rl_align.agents.comal) has the same interface and takes its place."""

    def __init__(self, agent: "SAIL") -> None:
        self.agent = agent

    def prepare(self, b: dict) -> float:
        """Called on each fresh batch before the update; a statistic of it at theta_old (none for SAIL)."""
        return float("nan")

    def terms(self, b: dict, idx: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
        """The terms of J on the pairs ``idx`` of batch ``b``: ``dpo`` (mean log sigmoid), ``shift`` (on
        the fresh segments, with the weights ``b["shift_w"]`` fixed at theta_old; 0 without them),
        ``revkl`` (segment-summed reverse KL, mean over the fresh segments) and ``bc``."""
        a, c = self.agent, self.agent.config
        policy = policy if policy is not None else a.policy
        i, j, pref1 = b["i"][idx], b["j"][idx], b["pref1"][idx]
        n_fresh = int(b.get("n_fresh_segments", len(b["obs"])))
        fresh = torch.arange(n_fresh, device=a.device)
        seg_idx = torch.cat([i, j, fresh]).unique()
        logp, dist = a.segment_logp(b, seg_idx, policy)
        h = implicit_reward(logp, b["ref_logp"], b["mask"], c.beta)
        if "h_offset" in b:  # center_h: h minus its expectation under pi_old, per segment
            h = h - b["h_offset"]
        w_idx, l_idx = torch.where(pref1 > 0.5, i, j), torch.where(pref1 > 0.5, j, i)
        logsig = dpo_term(h[w_idx], h[l_idx], c.loser_weight)
        terms = {"dpo": logsig.mean(), "logsig": logsig, "logp": logp, "h": h}
        if "dpo_w" in b:  # dpo_clip: the DPO part's gradient at theta_old on the fresh segments, clipped ratios over the epochs
            terms["dpo_clipped"] = shift_term(logp[:n_fresh], b["old_logp"][:n_fresh], b["mask"][:n_fresh], b["dpo_w"], c.clip)
        terms["bc"] = logp[w_idx].sum(-1).mean()  # winners' segment log-likelihood
        if "shift_w" in b:
            shift = shift_term(logp[:n_fresh], b["old_logp"][:n_fresh], b["mask"][:n_fresh], b["shift_w"], c.clip)
            terms["shift"] = shift / n_fresh if c.normalize_shift else shift
        else:
            terms["shift"] = torch.zeros((), device=a.device)
        pos = torch.searchsorted(seg_idx, fresh)  # rows of the fresh segments in `dist`
        ref_mu = b.get("ref_mu")  # pi_ref's mean on the fresh states: fixed during an update, computed once
        if ref_mu is None:
            with torch.no_grad():
                ref_mu = a.ref_policy.mean(b["obs"][fresh])
        kl_steps = gaussian_kl(dist.loc[pos], policy.log_std, ref_mu, a.ref_policy.log_std, std_part=c.revkl_std)  # [M, H]
        terms["revkl"] = segment_kl(kl_steps, b["mask"][:n_fresh]).mean()
        return terms

    def objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J = dpo + shift_coef * shift - revkl_coef * KL_seg (+ bc_coef * bc)`` (SAIL-RevKL; revkl_coef = 0 is SAIL);
        with ``dpo_clip`` the DPO part enters as its clipped surrogate (same gradient at theta_old)."""
        c = self.agent.config
        return terms.get("dpo_clipped", terms["dpo"]) + c.shift_coef * terms["shift"] - c.revkl_coef * terms["revkl"] + c.bc_coef * terms["bc"]

    def fixed_batch_objective(self, b: dict, idx: torch.Tensor):
        """``f(policy)``: the SAIL(-RevKL) objective on a fixed batch of pairs, where the sampling
        distribution does not move, so its value and gradient are of one function (PL diagnostics)."""
        c = self.agent.config
        return lambda policy: (lambda t: t["dpo"] - c.revkl_coef * t["revkl"])(self.terms(b, idx, policy))

    def term_gradients(self, b: dict, idx: torch.Tensor) -> dict[str, float]:
        """Norms of each term's contribution to the update's gradient and the DPO / shift cosine (``grad/``)."""
        a, c = self.agent, self.agent.config
        params = list(a.policy.parameters())
        terms = self.terms(b, idx)
        parts = {"dpo": terms["dpo"], "shift": c.shift_coef * terms["shift"], "revkl": -c.revkl_coef * terms["revkl"]}
        if c.bc_coef > 0:
            parts["bc"] = c.bc_coef * terms["bc"]
        if a.lagrangian is not None:  # the cost surrogate draws steps from a.rng: leave the training stream as it was
            state = a.rng.bit_generator.state
            parts["cost"] = -a.lagrangian.sail_cost_loss(a, a.buffer.flat(a.device), 1)
            a.rng.bit_generator.state = state
        grads = {k: flat_grad(v, params, retain_graph=True) if v.requires_grad else torch.zeros(sum(p.numel() for p in params)) for k, v in parts.items()}
        out = {f"grad/{k}": float(g.norm()) for k, g in grads.items()}
        if out["grad/shift"] > 0 and out["grad/dpo"] > 0:  # (no direction to compare when a part is exactly 0)
            out["grad/cos_dpo_shift"] = float(F.cosine_similarity(grads["dpo"], grads["shift"], dim=0))
        if out["grad/dpo"] > 0:
            out["grad/revkl_over_dpo"] = out["grad/revkl"] / out["grad/dpo"]
        out["grad/dpo_halves_cos"] = self.halves_cosine(b)
        return out

    def halves_cosine(self, b: dict) -> float:
        """``grad/dpo_halves_cos``: the DPO part on two disjoint halves of the fresh segments (even and odd
        rows, each with the fresh pairs inside it), in the mean network's weights only (the log-std shrinks
        whatever the labels say: RESULTS.md's coin-flip control)."""
        i, j = b["i"][: b["n_fresh_pairs"]], b["j"][: b["n_fresh_pairs"]]

        def dpo(parity: int) -> torch.Tensor | None:
            idx = torch.nonzero((i % 2 == parity) & (j % 2 == parity)).flatten()
            return self.terms(b, idx)["dpo"] if len(idx) else None

        return halves_cosine(dpo, list(self.agent.policy.mean.parameters()))


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
        self.loss = c.make_loss(self)  # SAILLoss; COMAL's INPO loss
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
    def _batch(self) -> dict[str, torch.Tensor] | None:
        """Label pairs of this rollout's segments; tensors of the segments and of the valid (non-tie,
        non-skipped) pairs, plus the oracle's agreement with the true return (a diagnostic it computes)."""
        c = self.config
        if self.oracle.config.kind == "human":  # labelled pairs from a label store (no shift part: rl_align/labels/learn.py)
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
        return {"obs": obs, "actions": act, "mask": mask, "old_logp": t(seg.logp), "ref_logp": ref_logp,
                "i": torch.as_tensor(i[valid], device=self.device), "j": torch.as_tensor(j[valid], device=self.device),
                "pref1": t(labels[valid]), "n_labels": int(np.isfinite(labels).sum()), "n_ties": int((labels == 0.5).sum()),
                "oracle_agreement": lp.agreement}

    def _with_replay(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fresh batch extended by stored pairs: segments ``[M + R]`` (fresh first), pairs fresh then stored."""
        c = self.config
        stored = self.store.sample(int(round(c.replay_ratio * len(b["pref1"]))), self.rng) if c.replay else None
        if stored is None:
            return {**b, "n_fresh_pairs": len(b["pref1"])}
        M = len(b["obs"])
        out = {k: torch.cat([b[k], stored[k].to(self.device)]) for k in PairStore.FIELDS}
        out["old_logp"] = torch.cat([b["old_logp"], torch.zeros_like(stored["ref_logp"]).to(self.device)])  # the shift part is fresh-only
        out.update(i=torch.cat([b["i"], stored["i"].to(self.device) + M]), j=torch.cat([b["j"], stored["j"].to(self.device) + M]),
                   pref1=torch.cat([b["pref1"], stored["pref1"].to(self.device)]), n_fresh_pairs=len(b["pref1"]))
        return out

    # ---- the objective ----------------------------------------------------------------------------
    def segment_logp(self, b: dict, seg_idx: torch.Tensor, policy=None) -> tuple[torch.Tensor, torch.distributions.Normal]:
        """Per-step log-probs ``[M_all, H]`` under ``policy`` (default pi_theta), filled on the segments
        ``seg_idx`` (zero elsewhere and on the padding), and the policy's distribution on those segments."""
        policy = policy if policy is not None else self.policy
        if len(seg_idx) == len(b["obs"]):  # every segment (seg_idx is sorted and unique): no scatter needed
            return segment_logp(policy, b["obs"], b["actions"], b["mask"])
        logp_seg, dist = segment_logp(policy, b["obs"][seg_idx], b["actions"][seg_idx], b["mask"][seg_idx])
        logp = torch.zeros(b["obs"].shape[:2], device=self.device).index_put((seg_idx,), logp_seg)
        return logp, dist

    # ---- the update -------------------------------------------------------------------------------
    def update(self, episodes: list[tuple[float, float, int]]) -> dict[str, float]:
        c = self.config
        lr = self.set_lr()
        metrics: dict[str, float] = {"train/lr": lr}
        if self.lagrangian is not None:
            self.buffer.compute_gae(c.gamma, c.gae_lambda, rewards=np.zeros_like(self.buffer.costs))  # never the true reward: only cost advantages are used
            metrics.update(self.lagrangian.before_update(self, episodes))
        fresh = self._batch()
        self.updates += 1
        if fresh is None:  # no valid pair: skip, or Adam's momentum would still move the weights
            metrics["train/skipped"] = 1.0
            return self._scheduled(metrics, float("nan"))
        f = self.loss.prepare(fresh)
        M, P_fresh = len(fresh["obs"]), len(fresh["pref1"])
        b = self._with_replay(fresh)
        b["n_fresh_segments"] = M
        with torch.no_grad():
            b["ref_mu"] = self.ref_policy.mean(b["obs"][:M])
            if c.center_h:  # on every segment of the batch, at theta_old
                b["h_offset"] = expected_h(self.policy, self.ref_policy, b["obs"], b["mask"], c.beta)
        P = len(b["pref1"])
        fresh_idx = torch.arange(P_fresh, device=self.device)
        with torch.no_grad():  # at theta_old: held-out accuracy of h on the fresh labels, and the shift weights
            t0 = self.loss.terms(b, fresh_idx)
            metrics["pref/heldout_accuracy"] = pair_accuracy(t0["h"][fresh["i"]], t0["h"][fresh["j"]], fresh["pref1"])
            if not fresh.get("offline"):  # the shift part needs labels of this rollout's own segments
                b["shift_w"] = shift_weights(fresh["i"], fresh["j"], t0["logsig"], M, c.baseline, c.normalize_shift)
                if c.dpo_clip:
                    b["dpo_w"] = dpo_weights(fresh["i"], fresh["j"], fresh["pref1"], t0["logsig"], M, c.beta, c.loser_weight)
        params = list(self.policy.parameters())
        d_idx = fresh_idx[: c.diag_pairs]
        if c.diag_every > 0 and (self.updates - 1) % c.diag_every == 0:
            metrics.update(self.loss.term_gradients(b, d_idx))
        if self.diagnostics.due(self.updates - 1):
            metrics.update(self.diagnostics.measure(self.loss.fixed_batch_objective(b, d_idx), self.policy))
        before = torch.nn.utils.parameters_to_vector(params).detach().clone()
        flat = self.buffer.flat(self.device) if self.lagrangian is not None else None
        stats = {k: [] for k in ("dpo", "shift", "revkl", "grad_norm", "approx_kl")}
        n_mb = max(1, -(-P // c.minibatch))
        stop, epochs_run = False, 0
        for _ in range(c.epochs):
            for idx in self.minibatches(P, c.minibatch):
                terms = self.loss.terms(b, idx)
                loss = -self.loss.objective(terms)
                if self.lagrangian is not None:
                    loss = loss + self.lagrangian.sail_cost_loss(self, flat, n_mb)
                stats["grad_norm"].append(self.step_optimizer(loss))
                with torch.no_grad():
                    if c.log_std_min is not None:  # projected step onto {log_std >= floor}
                        self.policy.log_std.clamp_(min=c.log_std_min)
                    log_ratio = (terms["logp"][:M] - b["old_logp"][:M]) * b["mask"][:M]
                    approx_kl = float((((log_ratio.exp() - 1) - log_ratio) * b["mask"][:M]).sum() / b["mask"][:M].sum())
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
            h = self.loss.terms(b, fresh_idx)["h"]
            metrics["pref/train_accuracy"] = pair_accuracy(h[fresh["i"]], h[fresh["j"]], fresh["pref1"])
            kl_ref = policy_kl(self.policy, self.ref_policy, torch.as_tensor(self.buffer.obs.reshape(-1, self.buffer.obs.shape[-1]), device=self.device))
            entropy = float(self.policy.dist(torch.as_tensor(self.buffer.obs[0], device=self.device)).entropy().sum(-1).mean())
            update_norm = float((torch.nn.utils.parameters_to_vector(params) - before).norm())
        if kl_ref > c.kl_limit:
            raise UserError(f"KL(pi || pi_ref) = {kl_ref:.1f} exceeded agent.kl_limit={c.kl_limit} at env step {self.env_steps}; "
                            "lower agent.lr or raise agent.beta / agent.revkl_coef (last good checkpoint kept)")
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in stats.items()})
        metrics.update({
            "train/valid_pairs": float(P_fresh), "train/replayed_pairs": float(P - P_fresh), "train/ties": float(fresh["n_ties"]),
            "train/epochs": float(epochs_run), "train/kl_ref": kl_ref, "train/entropy": entropy, "train/update_norm": update_norm,
            "train/log_std": self.policy.log_std.mean().item(), "pref/oracle_agreement": fresh["oracle_agreement"],
        })
        return self._scheduled(metrics, f)

    def _scheduled(self, metrics: dict[str, float], f: float) -> dict[str, float]:
        """After the update, the reference schedule (if any) may move pi_ref; ``f`` is the loss's statistic."""
        if self.schedule is not None:
            metrics.update(self.schedule.after_update(self, metrics, f))
        return metrics
