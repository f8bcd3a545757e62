"""COMAL on real HalfCheetah-v5: the reference reset, equality with its inner solver when the reset is
off, the plateau rule, the INPO loss against the paper's eta/2 form and against the exact lab's
mirror-descent step (a tabular stand-in), evaluation against the initial reference, and small end-to-end runs."""

import copy
import csv

import numpy as np
import pytest
import torch

from rl_align.agents.base import EpisodeTracker
from rl_align.agents.comal import ReferenceSchedule, inpo_loss, segment_win_rates
from rl_align.errors import UserError
from rl_align.evaluation import eval_metrics
from rl_align.games.matrix import COMAL3, kl, regularized_md
from rl_align.checkpoints import load_checkpoint
from rl_align.runs import build_agent, resolve_config
from rl_align.tournament import tournament
from rl_align.train import prepare, train

SMALL = ["agent.ref=init", "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=20", "agent.diag_every=0",
         "agent.win_rate_episodes=1", "env.max_episode_steps=100", "run.eval_episodes=1", "run.progress=false"]


def _trained_agent(extra=()):
    cfg = resolve_config("halfcheetah-cyclic", "comal", SMALL + ["agent.inner_updates=0", "agent.plateau_window=0", *extra])
    agent, env = build_agent(cfg)
    prepare(agent, cfg)
    obs = env.reset()
    for _ in range(2):
        obs = agent.collect(env, obs, EpisodeTracker(env.n_envs))
        agent.update([])
    return agent, env


def _same(a, b) -> bool:
    """Exact equality of nested state dicts (tensors, arrays, numbers, lists)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_reset_replaces_the_reference_exactly_and_nothing_else():
    agent, _ = _trained_agent()
    assert not _same(agent.ref_policy.state_dict(), agent.policy.state_dict())  # the policy has moved away
    before = copy.deepcopy({k: m.state_dict() for k, m in agent.modules().items() if k not in ("ref_policy", "diagnostics")})
    opt, rng = copy.deepcopy(agent.optimizer.state_dict()), agent.rng.bit_generator.state
    agent.schedule.reset_reference(agent)
    assert _same(agent.ref_policy.state_dict(), agent.policy.state_dict())
    assert agent.ref_policy.state_dict()["log_std"].data_ptr() != agent.policy.state_dict()["log_std"].data_ptr()  # a copy
    assert not any(p.requires_grad for p in agent.ref_policy.parameters())
    after = {k: m.state_dict() for k, m in agent.modules().items() if k not in ("ref_policy", "diagnostics")}
    assert before.keys() == after.keys() and "init_ref_policy" in before
    for k in before:
        assert _same(before[k], after[k]), k
    assert _same(agent.optimizer.state_dict(), opt) and agent.rng.bit_generator.state == rng
    assert agent.schedule.resets == 1 and agent.schedule.steps == 0


def test_plateau_rule_fires_on_a_flat_objective_and_not_before_its_window():
    # an inner objective that rises (-10, -5, -3, -2) and then stays flat around -1.9
    f = [-10.0, -5.0, -3.0, -2.0, -1.9, -1.95, -1.9, -1.92, -1.91, -1.9]
    s = ReferenceSchedule(window=2, tol=0.05, max_updates=0)
    fired = [s.step(v) for v in f]
    # windows of 2: (-10,-5)->(-3,-2) gains 5 (> 5% of 7.5); (-5,-3)->(-2,-1.9) gains 2.05 (> 0.2); (-3,-2)->(-1.9,-1.95)
    # gains 0.575 (> 0.125); (-2,-1.9)->(-1.95,-1.9) gains 0.025 < 5% of 1.95: fires at the 7th value, not before
    assert fired[:6] == [None] * 6 and fired[6] == "plateau"
    s.reset()
    assert [s.step(v) for v in (-1.9, -1.9, -1.9)] == [None] * 3  # a flat sequence, but fewer than 2 W values since the reset
    assert s.step(float("nan")) is None and s.steps == 4 and len(s.values) == 3  # a skipped batch counts as a step, not a value
    assert s.step(-1.9) == "plateau" and s.resets == 1
    guard = ReferenceSchedule(window=0, tol=0.05, max_updates=3)
    assert [guard.step(v) for v in (-3.0, -2.0, -1.0)] == [None, None, "guard"]  # the guard, with the plateau rule off
    restored = ReferenceSchedule(2, 0.05, 0)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def test_scheduled_reset_in_the_update_is_logged():
    agent, env = _trained_agent()
    agent.schedule.max_updates = 1
    agent.collect(env, env.reset(), EpisodeTracker(env.n_envs))
    m = agent.update([])
    assert m["comal/resets"] == 1.0 and m["comal/reset"] == 1.0 and m["comal/reset_plateau"] == 0.0 and m["comal/outer_updates"] == 3.0  # 2 updates before + this one
    assert _same(agent.ref_policy.state_dict(), agent.policy.state_dict())


def test_evaluation_compares_with_the_initial_reference_without_moving_the_current_one():
    agent, _ = _trained_agent()
    agent.schedule.reset_reference(agent)
    current, cfg = agent.ref_policy, resolve_config("halfcheetah-cyclic", "comal", SMALL)
    m = eval_metrics(agent, cfg)
    assert agent.ref_policy is current and _same(current.state_dict(), agent.policy.state_dict())
    assert m["eval/kl_to_current_ref"] == 0.0  # the reference was just reset to the policy
    assert m["eval/kl_to_ref"] > 1e-3  # but the policy has moved from pi_ref^1 (the initial weights)
    assert 0.0 <= m["eval/win_rate_vs_ref"] <= 1.0


def test_without_reset_comal_equals_its_inner_solver(tmp_path):
    common = SMALL + [f"run.out_dir={tmp_path}", "agent.revkl_coef=0.05", "agent.lr=0.001", "agent.shift_coef=0.1", "agent.revkl_std=false",
              "agent.beta=0.1"]  # every coefficient pinned: the presets differ in beta
    f_sail, _ = train(resolve_config("halfcheetah-cyclic", "sail-revkl", common, steps=600, seed=3), quiet=True)
    f_comal, _ = train(resolve_config("halfcheetah-cyclic", "comal", common + ["agent.inner=sail-revkl", "agent.inner_updates=0",
                                                                              "agent.plateau_window=0"], steps=600, seed=3), quiet=True)
    a, b = load_checkpoint(f_sail), load_checkpoint(f_comal)
    assert _same(a["policy"], b["policy"]) and _same(a["ref_policy"], b["ref_policy"])
    assert b["updates"] == 3 and b["schedule"]["resets"] == 0
    # with the reset on, the same seed gives a different policy (the reset changes the objective)
    f_reset, _ = train(resolve_config("halfcheetah-cyclic", "comal", common + ["agent.inner=sail-revkl", "agent.inner_updates=1"],
                                      steps=600, seed=3), quiet=True)
    assert not _same(a["policy"], load_checkpoint(f_reset)["policy"])


def test_comal_inpo_runs_end_to_end(tmp_path):
    cfg = resolve_config("halfcheetah-cyclic", "comal", SMALL + [f"run.out_dir={tmp_path}", "agent.inner_updates=2", "agent.plateau_window=0",
                                                                 "agent.diag_every=1"], steps=800, seed=0)
    assert cfg.agent.inner == "inpo"  # the default inner solver for the general oracle
    folder, summary = train(cfg, quiet=True)
    state = load_checkpoint(folder)
    assert state["updates"] == 4 and state["schedule"]["resets"] == 2
    assert _same(state["ref_policy"], state["policy"])  # the last update ended with a reset
    assert not _same(state["init_ref_policy"], state["policy"])  # and the policy has learned away from pi_ref^1
    rows = list(csv.DictReader(open(folder / "progress.csv")))
    resets = [float(r["comal/resets"]) for r in rows if r.get("comal/resets")]
    assert resets == [0.0, 1.0, 1.0, 2.0]
    assert [float(r["comal/reset"]) for r in rows if r.get("comal/reset")] == [0.0, 1.0, 0.0, 1.0]
    assert all(np.isfinite(float(r["comal/inner_objective"])) for r in rows if r.get("comal/inner_objective"))
    assert all(float(r["grad/inpo_pref"]) > 0 for r in rows if r.get("grad/inpo_pref"))  # INPO's own gradient diagnostics
    assert 0.0 <= summary["final"]["eval/win_rate_vs_ref"] <= 1.0
    assert summary["final"]["eval/kl_to_current_ref"] == 0.0 < summary["final"]["eval/kl_to_ref"]  # ended on a reset
    # the tournament's KL column is to the initial reference, not to the (just reset) current one
    res = tournament([folder, folder], episodes=1, segment_len=20, deterministic=False)
    assert res.kl_init_ref[0] == res.kl_init_ref[1] > 1e-3


def test_inpo_loss_is_the_papers_eta_half_form_on_the_complete_pair_graph():
    # Algorithm 3 regresses each labelled pair (s, s') on eta (I - 1/2); inpo_loss regresses on eta (w(s) - w(s')).
    # On a complete pair graph of M segments they differ by a constant once eta is scaled by (M - 1) / M
    # (derivation in inpo_loss's docstring): equal gradients, for any log-probs.
    g = torch.Generator().manual_seed(0)
    M, H, eta, tau = 12, 3, 4.0, 0.1
    i, j = torch.triu_indices(M, M, 1)
    pref1 = torch.bernoulli(torch.full((len(i),), 0.5), generator=g)
    win = segment_win_rates(i, j, pref1, M)
    old, ref = torch.randn(M, H, generator=g), torch.randn(M, H, generator=g)

    def losses(logp):
        ratio = (logp[i] - old[i]).sum(-1) - (logp[j] - old[j]).sum(-1)
        x = ratio - eta * tau * ((ref[i] - old[i]).sum(-1) - (ref[j] - old[j]).sum(-1))
        paper = ((x - eta * (pref1 - 0.5)) ** 2).mean()
        ours = inpo_loss(logp[i], logp[j], old[i], old[j], ref[i], ref[j], win[i], win[j], eta * (M - 1) / M, tau * M / (M - 1))
        return paper, ours

    diffs = []
    for _ in range(3):
        logp = torch.randn(M, H, generator=g, dtype=torch.float64).float().requires_grad_(True)
        paper, ours = losses(logp)
        gp, = torch.autograd.grad(paper, logp)
        go, = torch.autograd.grad(ours, logp)
        torch.testing.assert_close(go, gp, atol=1e-5, rtol=1e-4)
        diffs.append(float((ours - paper).detach()))
    assert max(diffs) - min(diffs) < 1e-4  # a constant, not a function of the policy


def test_inpo_update_moves_a_tabular_policy_to_the_exact_labs_mirror_descent_step():
    # Tabular stand-in: a "segment" is one response y of the COMAL paper's 3x3 game, sampled from mu_k and
    # labelled by Bernoulli(A[y, y']); the MuJoCo-side code (segment_win_rates + inpo_loss) is minimized over
    # the logits. Its minimizer must be Algorithm 2's step mu_k^(1 - eta tau) pi_ref^(eta tau) exp(eta A mu_k)
    # as the exact lab computes it (regularized_md). Measured at seeds 0-4: KL(target || fit) 4.7e-4, 9.7e-5,
    # 1.3e-5, 5.8e-5, 3.2e-4 against KL(target || mu_k) = 0.0655 (a 139x - 5,100x reduction); asserted: 40x.
    mu, ref, eta, tau = np.array([0.2, 0.5, 0.3]), np.array([0.5, 0.2, 0.3]), 1.0, 0.5
    target = regularized_md(COMAL3, mu, ref, eta, tau, 1)[1]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        M = 400
        y = torch.as_tensor(rng.choice(3, size=M, p=mu))
        i, j = torch.triu_indices(M, M, 1)
        pref1 = torch.as_tensor(rng.random(len(i)) < COMAL3[y[i], y[j]], dtype=torch.float32)
        win = segment_win_rates(i, j, pref1, M)
        old, pi_ref = torch.log(torch.as_tensor(mu, dtype=torch.float32))[y][:, None], torch.log(torch.as_tensor(ref, dtype=torch.float32))[y][:, None]
        logits = torch.log(torch.as_tensor(mu, dtype=torch.float32)).clone().requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=0.05)
        for _ in range(400):
            logp = torch.log_softmax(logits, 0)[y][:, None]  # [M, H = 1]
            loss = inpo_loss(logp[i], logp[j], old[i], old[j], pi_ref[i], pi_ref[j], win[i], win[j], eta, tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
        fit = torch.softmax(logits, 0).detach().double().numpy()
        assert kl(target, fit) < kl(target, mu) / 40, (seed, kl(target, fit), kl(target, mu))


def test_segment_win_rates_and_config_errors():
    i, j = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 2, 0])
    pref1 = torch.tensor([1.0, 0.0, 1.0, 1.0])  # 0 beats 1, 2 beats 0, 1 beats 2, 2 beats 0
    torch.testing.assert_close(segment_win_rates(i, j, pref1, 4), torch.tensor([1 / 3, 1 / 2, 2 / 3, 1 / 2]))
    for bad, msg in ((["agent.inner=dpo"], "agent.inner"), (["agent.eta=0"], "agent.eta"), (["agent.inner_updates=-1"], "inner_updates"),
                     (["agent.inner=inpo", "agent.revkl_coef=2"], "must be <= 1"), (["agent.plateau_tol=-1"], "plateau_tol")):
        with pytest.raises(UserError, match=msg):
            resolve_config("halfcheetah-cyclic", "comal", bad)
