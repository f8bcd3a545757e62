"""SAIL, SAIL-RevKL and online iterative DPO: learning from preference labels only (DESIGN.md, "SAIL").

Segment log-likelihood ``log p_theta(s) = sum_t log pi_theta(a_t|s_t)``; implicit reward
``h(s) = beta * sum_t [log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)]``. Maximized, per batch of pairs
sampled from the current policy and labelled by the oracle:

    J_SAIL = E[log sigmoid(h(s_w) - h(s_l))]                                     (SAIL objective)
    grad   = E[grad log sigmoid(h_w - h_l)]                                      (1) DPO part
           + shift_coef * E[(log sigmoid(h_w - h_l) - b) (grad log p(s1) + grad log p(s2))]   (2) shift part
    J_RevKL = J_SAIL - revkl_coef * E_{s ~ d_pi}[KL(pi_theta(.|s) || pi_ref(.|s))]            (SAIL-RevKL)

Part (2) is a stop-gradient-weighted surrogate with per-step clipped importance ratios so a batch can
be reused for several epochs. ``revkl_coef = 0`` is exactly SAIL; ``shift_coef = 0`` is online DPO.
The agent never reads ``buffer.rewards``: only the oracle does.

Constrained variant: when ``self.lagrangian`` is set (rl_align.agents.lagrangian), each pair
minibatch also adds ``lam`` times the clipped cost surrogate on a minibatch of steps and the cost
critic's loss; ``before_update`` / ``after_update`` move the multiplier.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.agents import register
from rl_align.agents.base import Agent, AgentConfig
from rl_align.agents.ppo import clipped_surrogate
from rl_align.diagnostics import DiagnosticsConfig, PLDiagnostics
from rl_align.errors import UserError
from rl_align.nets import gaussian_kl


@dataclass
class SAILConfig(AgentConfig):
    n_envs: int = 8
    n_steps: int = 250
    epochs: int = 10
    minibatch: int = 100  # pairs per minibatch
    beta: float = 0.1  # implicit-reward scale
    revkl_coef: float = 0.0  # lambda of SAIL-RevKL; 0 is SAIL
    revkl_std: bool = True  # False: penalize only the mean part of the Gaussian KL
    shift_coef: float = 1.0  # weight of the distribution-shift part; 0 is online iterative DPO
    baseline: bool = True  # b = batch mean of log sigmoid(h_w - h_l) in the shift part
    segment_len: int = 50
    pairs_per_batch: int | None = None  # None: all pairs of segments in the rollout
    ref: str = "auto"  # auto | init | path to a run folder or checkpoint
    ref_agent: str = "ppo"  # preset that trains the auto reference
    ref_steps: int = 50_000  # env steps of the auto reference's PPO run
    kl_limit: float = 200.0  # stop the run when KL(pi || pi_ref) exceeds this
    max_grad_norm: float = 0.5
    diag_every: int = 1  # PL diagnostics every this many updates (0: off)
    curvature_every: int = 10  # Hessian eigenvalues every this many diagnostics (0: off)
    diag_pairs: int = 64  # pairs in the fixed batch the diagnostics use
    f_star: float | None = None
    win_rate_episodes: int = 4  # matched rollouts per evaluation for the win rate against pi_ref

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("revkl_coef", "shift_coef", "kl_limit", "ref_steps", "diag_every", "curvature_every"):
            if getattr(self, k) < 0:
                raise UserError(f"agent.{k} must be >= 0, got {getattr(self, k)}")
        if self.beta <= 0:
            raise UserError(f"agent.beta must be > 0, got {self.beta}")
        if self.segment_len < 1 or self.segment_len > self.n_steps:
            raise UserError(f"agent.segment_len={self.segment_len} must be between 1 and agent.n_steps={self.n_steps} (a segment lies inside one rollout)")
        if self.pairs_per_batch is not None and self.pairs_per_batch < 1:
            raise UserError(f"agent.pairs_per_batch must be >= 1 or null (all pairs), got {self.pairs_per_batch}")
        if self.diag_pairs < 2 or self.win_rate_episodes < 1:
            raise UserError("agent.diag_pairs must be >= 2 and agent.win_rate_episodes >= 1")


def sail_terms(logp1: torch.Tensor, logp2: torch.Tensor, ref1: torch.Tensor, ref2: torch.Tensor, old1: torch.Tensor, old2: torch.Tensor,
               pref1: torch.Tensor, beta: float, clip: float, baseline: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and shift parts of the SAIL objective for ``P`` pairs of ``H``-step segments.

    ``logp*`` per-step log-probs under pi_theta ``[P, H]``, ``ref*`` under pi_ref, ``old*`` under the
    behaviour policy; ``pref1 [P]`` is 1 where segment 1 won, 0 where segment 2 won. Returns
    ``(dpo, shift, logsig [P])``: ``dpo = mean log sigmoid(h_w - h_l)``; ``shift`` is the surrogate whose
    gradient at theta = theta_old is ``mean (logsig - b)(grad log p(s1) + grad log p(s2))``."""
    h1 = beta * (logp1 - ref1).sum(-1)  # implicit reward h(s) = beta sum_t [log pi - log pi_ref]
    h2 = beta * (logp2 - ref2).sum(-1)
    margin = torch.where(pref1 > 0.5, h1 - h2, h2 - h1)
    logsig = F.logsigmoid(margin)  # log sigmoid(h_w - h_l)
    dpo = logsig.mean()  # (1) DPO part
    H = logp1.shape[-1]
    adv = (logsig.detach() - baseline)[:, None].expand_as(logp1)  # stop-gradient weight (logsig - b)
    adv2 = torch.cat([adv, adv]).reshape(-1)
    surr, _, _ = clipped_surrogate(torch.cat([logp1, logp2]).reshape(-1), torch.cat([old1, old2]).reshape(-1), adv2, clip)
    # (2) shift part: E[min(rho A, clip(rho) A) - A], summed over both segments' H steps, mean over pairs
    # (the "- A" makes its value 0 at theta_old, so J's value is the SAIL objective, its gradient both parts)
    shift = (-surr - adv2.mean()) * 2 * H
    return dpo, shift, logsig


@register("sail")
class SAIL(Agent):
    config_cls = SAILConfig
    config: SAILConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.oracle is None:
            raise UserError("SAIL learns from preference labels: the env needs an oracle section")
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)  # pi_ref; `init` until prepare()
        c = self.config
        self.diagnostics = PLDiagnostics(DiagnosticsConfig(every=c.diag_every, curvature_every=c.curvature_every, f_star=c.f_star))
        self._eval_oracle = None

    def modules(self) -> dict:
        return {**super().modules(), "ref_policy": self.ref_policy, "diagnostics": self.diagnostics}

    # ---- the reference policy ---------------------------------------------------------------------
    def prepare(self, cfg) -> None:
        """Load pi_ref (training the auto reference once if needed); the policy starts from its weights."""
        c = self.config
        if c.ref == "init":
            self.ref_policy.load_state_dict(self.policy.state_dict())
            return
        path = auto_reference(cfg) if c.ref == "auto" else Path(c.ref)
        self.set_reference_from(path)

    def set_reference_from(self, path: Path) -> None:
        state = self.start_from(path)
        self.ref_policy.load_state_dict(state["policy"])
        self.freeze_obs_rms = True  # pi and pi_ref see states through pi_ref's frozen normalizer

    # ---- the objective ----------------------------------------------------------------------------
    def _batch(self) -> dict[str, torch.Tensor] | None:
        """Label pairs of this rollout's segments; tensors of the valid (non-tie, non-skipped) pairs."""
        c, buf = self.config, self.buffer
        seg = buf.segments(c.segment_len)
        if len(seg) < 2:
            return None
        i, j = buf.pairs(len(seg), c.pairs_per_batch, self.rng)
        labels = self.oracle.label(seg.take(i), seg.take(j))
        valid = (labels == 0.0) | (labels == 1.0)  # ties and skipped queries carry no direction
        if not valid.any():
            return None
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        obs, act = t(seg.obs), t(seg.actions)
        with torch.no_grad():
            ref_logp = self.ref_policy.log_prob(obs, act)  # [M, H]
        return {"obs": obs, "actions": act, "old_logp": t(seg.logp), "ref_logp": ref_logp,
                "i": torch.as_tensor(i[valid]), "j": torch.as_tensor(j[valid]), "pref1": t(labels[valid]),
                "n_labels": int(np.isfinite(labels).sum()), "n_ties": int((labels == 0.5).sum())}

    def objective_terms(self, b: dict, idx: torch.Tensor, baseline: float) -> dict[str, torch.Tensor]:
        """DPO part, shift part and reverse KL on the pairs ``idx`` of batch ``b``."""
        c = self.config
        i, j = b["i"][idx], b["j"][idx]
        seg_idx = torch.cat([i, j]).unique()
        logp = torch.zeros_like(b["old_logp"])
        dist = self.policy.dist(b["obs"][seg_idx])
        logp = logp.index_put((seg_idx,), dist.log_prob(b["actions"][seg_idx]).sum(-1))
        dpo, shift, logsig = sail_terms(logp[i], logp[j], b["ref_logp"][i], b["ref_logp"][j], b["old_logp"][i], b["old_logp"][j],
                                        b["pref1"][idx], c.beta, c.clip, baseline)
        with torch.no_grad():
            ref_mu = self.ref_policy.mean(b["obs"][seg_idx])
        # reverse KL(pi_theta || pi_ref), closed form, averaged over the states of the segments used
        kl = gaussian_kl(dist.loc, self.policy.log_std, ref_mu, self.ref_policy.log_std, std_part=c.revkl_std).mean()
        return {"dpo": dpo, "shift": shift, "revkl": kl, "logsig": logsig}

    def objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J = dpo + shift_coef * shift - revkl_coef * KL`` (SAIL-RevKL; revkl_coef = 0 is SAIL)."""
        c = self.config
        return terms["dpo"] + c.shift_coef * terms["shift"] - c.revkl_coef * terms["revkl"]

    def update(self) -> dict[str, float]:
        c = self.config
        lr = self.set_lr()
        metrics: dict[str, float] = {"train/queries_used": float(self.oracle.queries), "train/lr": lr}
        if self.lagrangian is not None:
            self.gae_rewards = np.zeros_like(self.buffer.costs)  # never the true reward: only cost advantages are used
            self.buffer.compute_gae(c.gamma, c.gae_lambda, rewards=self.gae_rewards)
            metrics.update(self.lagrangian.before_update(self))
        b = self._batch()
        self.updates += 1
        if b is None:  # no valid pair: skip, or Adam's momentum would still move the weights
            metrics["train/skipped"] = 1.0
            return metrics
        P = len(b["pref1"])
        all_idx = torch.arange(P, device=self.device)
        with torch.no_grad():
            baseline = float(self.objective_terms(b, all_idx, 0.0)["logsig"].mean()) if c.baseline else 0.0
        params = list(self.policy.parameters())
        if self.diagnostics.due(self.updates - 1):
            d_idx = all_idx[: c.diag_pairs]
            metrics.update(self.diagnostics.measure(lambda: self.objective(self.objective_terms(b, d_idx, baseline)), params))
        before = torch.nn.utils.parameters_to_vector(params).detach().clone()
        flat = self.buffer.flat(self.device) if self.lagrangian is not None else None
        stats = {k: [] for k in ("dpo", "shift", "revkl", "grad_norm")}
        n_mb = max(1, -(-P // c.minibatch))
        for _ in range(c.epochs):
            for idx in self.minibatches(P, c.minibatch):
                terms = self.objective_terms(b, idx, baseline)
                loss = -self.objective(terms)
                if self.lagrangian is not None:
                    loss = loss + self.lagrangian.sail_cost_loss(self, flat, n_mb)
                stats["grad_norm"].append(self.step_optimizer(loss))
                for k in ("dpo", "shift", "revkl"):
                    stats[k].append(float(terms[k].detach()))
        if self.lagrangian is not None:
            metrics.update(self.lagrangian.after_update(self))
        with torch.no_grad():
            kl_ref = float(self.kl_to_ref(torch.as_tensor(self.buffer.obs.reshape(-1, self.buffer.obs.shape[-1]), device=self.device)))
            entropy = float(self.policy.dist(torch.as_tensor(self.buffer.obs[0], device=self.device)).entropy().sum(-1).mean())
            update_norm = float((torch.nn.utils.parameters_to_vector(params) - before).norm())
        if kl_ref > c.kl_limit:
            raise UserError(f"KL(pi || pi_ref) = {kl_ref:.1f} exceeded agent.kl_limit={c.kl_limit} at env step {self.env_steps}; "
                            "lower agent.lr or raise agent.beta / agent.revkl_coef (last good checkpoint kept)")
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in stats.items()})
        metrics.update({
            "train/valid_pairs": float(P), "train/ties": float(b["n_ties"]), "train/baseline": baseline,
            "train/kl_ref": kl_ref, "pl/kl_ref": kl_ref, "pl/entropy": entropy,
            "pl/update_norm": update_norm,
            "train/log_std": self.policy.log_std.mean().item(), "train/queries_used": float(self.oracle.queries),
        })
        return metrics

    def kl_to_ref(self, obs: torch.Tensor) -> torch.Tensor:
        """Full Gaussian ``KL(pi_theta || pi_ref)`` averaged over ``obs`` (normalized states)."""
        return gaussian_kl(self.policy.mean(obs), self.policy.log_std, self.ref_policy.mean(obs), self.ref_policy.log_std).mean()

    # ---- evaluation -------------------------------------------------------------------------------
    def eval_extra(self, cfg) -> dict[str, float]:
        """Win rate of pi_theta against pi_ref under the run's oracle (expected preference over matched
        segments of fresh stochastic rollouts; a separate oracle, so no training query is spent)."""
        from rl_align.envs import Oracle
        from rl_align.train import win_rate

        if self._eval_oracle is None:
            self._eval_oracle = Oracle(dataclasses.replace(cfg.env.oracle, budget=None), seed=cfg.run.seed + 31)
        ref = copy.copy(self)
        ref.policy = self.ref_policy
        wr = win_rate(self, ref, cfg.env, self._eval_oracle, self.config.win_rate_episodes, self.config.segment_len, seed=cfg.run.seed + 200_000)
        obs = torch.as_tensor(self.buffer.obs.reshape(-1, self.buffer.obs.shape[-1]), device=self.device)
        with torch.no_grad():
            kl = float(self.kl_to_ref(obs))
        return {"eval/win_rate_vs_ref": wr, "eval/kl_to_ref": kl}


def auto_reference(cfg) -> Path:
    """The cached "SFT" reference for this env, seed and network: a short PPO run on the true reward,
    trained once into ``<out_dir>/_refs/<env>-<hash>-s<seed>`` and reused by every later run."""
    from rl_align.config import to_dict
    from rl_align.runs import from_data, _agent_data
    from rl_align.train import train

    c = cfg.agent
    _, ref_data = _agent_data(c.ref_agent)
    ref_data = {k: v for k, v in ref_data.items() if k not in ("algo", "description", "run")}
    ref_data.update(hidden=list(c.hidden), activation=c.activation)  # same network as the preference agent
    env_key = {k: v for k, v in to_dict(cfg.env).items() if k != "oracle"}  # PPO on the true reward never asks the oracle
    key_data = {"env": env_key, "agent": ref_data, "ref_agent": c.ref_agent, "steps": c.ref_steps, "seed": cfg.run.seed}
    digest = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:10]
    folder = Path(cfg.run.out_dir) / "_refs" / f"{cfg.env_name.replace('/', '_')}-{digest}-s{cfg.run.seed}"
    if (folder / "summary.json").exists():
        print(f"reference: reusing {folder}", file=sys.stderr)
        return folder
    print(f"reference: training {c.ref_agent} for {c.ref_steps:,} steps on the true reward (once; cached in {folder})", file=sys.stderr)
    ref_cfg = from_data(cfg.env_name, f"ref-{c.ref_agent}", "ppo", {
        "env": to_dict(cfg.env), "agent": ref_data,
        "run": {"steps": c.ref_steps, "seed": cfg.run.seed, "out_dir": str(folder.parent), "progress": False,
                "eval_episodes": cfg.run.eval_episodes, "device": cfg.run.device},
    })
    tmp, _ = train(ref_cfg, quiet=True)
    if folder.exists():  # another process finished the same reference meanwhile
        return folder
    tmp.rename(folder)
    return folder
