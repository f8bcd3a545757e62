"""The SAIL-family and INPO objectives as pure functions, on a tiny policy and a hand-made batch (no
environment, no agent): each term's value and gradient against a hand computation, revkl_coef = 0 is
SAIL, shift_coef = 0 is online DPO, what is fixed at theta_old, and the replay extension of a batch."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rl_align.agents.comal import INPOCoefficients, INPOObjective, inpo_loss, segment_win_rates
from rl_align.agents.preferences import PreferenceBatch
from rl_align.agents.sail_objective import (SAILCoefficients, SAILObjective, dpo_weights, expected_h, fixed_batch_objective,
                                            sail_objective, sail_terms, shift_weights, weighted_parts)
from rl_align.nets import GaussianPolicy

M, H, OBS, ACT = 6, 4, 3, 2


def tiny(seed: int = 0) -> tuple[GaussianPolicy, GaussianPolicy, PreferenceBatch]:
    """A policy, a reference 0.1 away in every weight, and every pair of 6 four-step segments sampled from
    the policy (theta_old = the policy), the last segment padded after its second step."""
    torch.manual_seed(seed)
    policy = GaussianPolicy(OBS, ACT, [8], "tanh", 0.0, True)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
        obs = torch.randn(M, H, OBS)
        actions = policy.dist(obs).sample()
        mask = torch.ones(M, H)
        mask[-1, 2:] = 0.0
        old_logp = policy.log_prob(obs, actions) * mask
        ref_logp = reference.log_prob(obs, actions) * mask
    i, j = torch.triu_indices(M, M, 1)
    pref1 = torch.bernoulli(torch.full((len(i),), 0.5), generator=torch.Generator().manual_seed(seed))
    return policy, reference, PreferenceBatch(obs, actions, mask, old_logp, ref_logp, i, j, pref1)


def grad(f: torch.Tensor, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params, retain_graph=True, allow_unused=False)])


def by_hand(policy, reference, b, beta):
    """logp [M, H], h [M], per-pair log sigmoid(h_w - h_l) [P], and the segment-summed KL(pi || pi_ref) [M]."""
    dist = torch.distributions.Normal(policy.mean(b.obs), policy.log_std.exp())
    logp = dist.log_prob(b.actions).sum(-1) * b.mask
    h = beta * (logp - b.ref_logp).sum(-1)
    logsig = F.logsigmoid(torch.where(b.pref1 > 0.5, h[b.i] - h[b.j], h[b.j] - h[b.i]))
    ref = torch.distributions.Normal(reference.mean(b.obs), reference.log_std.exp())
    kl = (torch.distributions.kl_divergence(dist, ref).sum(-1) * b.mask).sum(-1)
    return logp, h, logsig, kl


def test_each_term_against_its_hand_computation():
    policy, reference, b = tiny()
    coef = SAILCoefficients(beta=0.5, revkl_coef=0.3, shift_coef=0.7, bc_coef=0.2)
    w = torch.linspace(-1, 1, M)  # shift weights fixed at theta_old
    b = b.fixed(shift_w=w)
    all_pairs = torch.arange(b.n_pairs)
    t = sail_terms(policy, reference, b, coef, all_pairs)
    params = list(policy.parameters())
    logp, h, logsig, kl = by_hand(policy, reference, b, coef.beta)
    torch.testing.assert_close(t["h"], h)
    torch.testing.assert_close(t["dpo"], logsig.mean())  # (1)
    torch.testing.assert_close(t["revkl"], kl.mean())  # (3)
    torch.testing.assert_close(grad(t["revkl"], params), grad(kl.mean(), params))
    winners = torch.where(b.pref1 > 0.5, b.i, b.j)
    torch.testing.assert_close(t["bc"], logp[winners].sum(-1).mean())
    # (2) the shift surrogate: 0 at theta_old, gradient sum_k w_k grad log p(s_k) / M there
    assert float(t["shift"].detach()) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(grad(t["shift"], params), grad((w * logp.sum(-1)).sum() / M, params), rtol=1e-4, atol=1e-6)
    # J mixes them once, with its signs
    J = sail_objective(t, coef)
    hand = logsig.mean() + 0.7 * t["shift"] - 0.3 * kl.mean() + 0.2 * logp[winners].sum(-1).mean()
    torch.testing.assert_close(J, hand)
    torch.testing.assert_close(grad(J, params), grad(hand, params), rtol=1e-4, atol=1e-6)
    assert set(weighted_parts(t, coef)) == {"dpo", "shift", "revkl", "bc"}


def test_revkl_coef_zero_is_sail_and_the_difference_is_lambda_times_the_kl():
    policy, reference, b = tiny(1)
    b = b.fixed(shift_w=torch.linspace(-1, 1, M))
    idx, params = torch.arange(b.n_pairs), list(policy.parameters())
    sail = SAILCoefficients(beta=0.5, revkl_coef=0.0)
    t = sail_terms(policy, reference, b, sail, idx)
    J0 = sail_objective(t, sail)
    assert float(J0) == float(t["dpo"] + sail.shift_coef * t["shift"])  # exactly SAIL: no KL in it
    J = sail_objective(sail_terms(policy, reference, b, dataclasses.replace(sail, revkl_coef=0.3), idx), dataclasses.replace(sail, revkl_coef=0.3))
    kl = by_hand(policy, reference, b, 0.5)[3].mean()
    assert float(kl) > 1e-3
    torch.testing.assert_close(J0 - J, 0.3 * kl)
    torch.testing.assert_close(grad(J0 - J, params), grad(0.3 * kl, params), rtol=1e-4, atol=1e-6)


def test_shift_coef_zero_is_online_dpo():
    """With shift weights in the batch and shift_coef = 0, J's gradient is the DPO part's alone."""
    policy, reference, b = tiny(2)
    b = b.fixed(shift_w=torch.linspace(-1, 1, M))
    coef = SAILCoefficients(beta=0.5, shift_coef=0.0)
    J = sail_objective(sail_terms(policy, reference, b, coef, torch.arange(b.n_pairs)), coef)
    logsig = by_hand(policy, reference, b, 0.5)[2]
    params = list(policy.parameters())
    torch.testing.assert_close(grad(J, params), grad(logsig.mean(), params))
    with_shift = SAILCoefficients(beta=0.5, shift_coef=1.0)  # (and the shift part does move it when weighted)
    J1 = sail_objective(sail_terms(policy, reference, b, with_shift, torch.arange(b.n_pairs)), with_shift)
    assert float((grad(J1, params) - grad(J, params)).norm()) > 1e-3


def test_mean_only_kl_leaves_log_std_alone():
    policy, reference, b = tiny(3)
    kl = sail_terms(policy, reference, b, SAILCoefficients(revkl_std=False), torch.arange(b.n_pairs))["revkl"]
    assert float(kl) > 0
    g = torch.autograd.grad(kl, policy.log_std, allow_unused=True)[0]
    assert g is None or float(g.abs().max()) == 0.0


@pytest.mark.parametrize("loser_weight", [1.0, 0.5])
def test_clipped_dpo_part_has_the_dpo_gradient_at_theta_old(loser_weight):
    """``dpo_clip``: the surrogate on the per-segment weights has value 0 and the DPO part's gradient at
    theta_old; once the policy moves past the clip range on the side its weight pushes, its gradient is 0."""
    policy, reference, b = tiny(4)
    coef = SAILCoefficients(beta=0.5, loser_weight=loser_weight, dpo_clip=True)
    idx, params = torch.arange(b.n_pairs), list(policy.parameters())
    t = sail_terms(policy, reference, b, coef, idx)
    b = b.fixed(dpo_w=dpo_weights(b.i, b.j, b.pref1, t["logsig"].detach(), M, coef.beta, loser_weight))
    t = sail_terms(policy, reference, b, coef, idx)
    assert float(t["dpo_clipped"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(grad(t["dpo_clipped"], params), grad(t["dpo"], params), rtol=1e-4, atol=1e-7)
    assert weighted_parts(t, coef)["dpo"] is t["dpo_clipped"]
    moved = b.fixed(old_logp=t["logp"].detach() - 2.0 * torch.sign(b.dpo_w)[:, None])
    assert float(grad(sail_terms(policy, reference, moved, coef, idx)["dpo_clipped"], params).abs().max()) == 0.0


def test_centred_implicit_reward_has_zero_mean_under_the_policy():
    """``center_h``: the offset is h's expectation over actions from the policy at the segments' own states
    (checked by sampling 4,000 action sequences), and the DPO part compares h minus it."""
    policy, reference, b = tiny(5)
    beta = 0.5
    offset = expected_h(policy, reference, b.obs, b.mask, beta)
    torch.manual_seed(0)
    with torch.no_grad():
        a = policy.dist(b.obs).sample((4000,))  # [K, M, H, act]
        h = beta * ((policy.log_prob(b.obs, a) - reference.log_prob(b.obs, a)) * b.mask).sum(-1)  # [K, M]
    assert float(offset.min()) > 0.001
    torch.testing.assert_close(h.mean(0), offset, rtol=0.05, atol=4 * float(h.std(0).max()) / 4000 ** 0.5)
    obj = SAILObjective(SAILCoefficients(beta=beta, center_h=True))
    fixed, t0 = obj.at_theta_old(policy, reference, b)
    torch.testing.assert_close(fixed.h_offset, offset)
    hc = by_hand(policy, reference, b, beta)[1] - offset
    w, l = torch.where(b.pref1 > 0.5, b.i, b.j), torch.where(b.pref1 > 0.5, b.j, b.i)
    torch.testing.assert_close(t0["logsig"], F.logsigmoid(hc[w] - hc[l]))


def test_at_theta_old_fixes_shift_weights_only_for_on_policy_pairs():
    policy, reference, b = tiny(6)
    obj = SAILObjective(SAILCoefficients(beta=0.5))
    fixed, t0 = obj.at_theta_old(policy, reference, b)
    torch.testing.assert_close(fixed.shift_w, shift_weights(b.i, b.j, t0["logsig"], M))
    torch.testing.assert_close(fixed.ref_mu, reference.mean(b.obs).detach())
    assert fixed.dpo_w is None and fixed.h_offset is None and b.shift_w is None  # the input batch is not changed
    stored, _ = obj.at_theta_old(policy, reference, dataclasses.replace(b, on_policy=False))  # a label store's pairs
    assert stored.shift_w is None
    assert float(obj.terms(policy, reference, stored, torch.arange(b.n_pairs))["shift"]) == 0.0


def test_fixed_batch_objective_is_the_dpo_and_revkl_parts_whatever_the_batch_holds():
    """The PL diagnostics' ``f``: ``dpo - revkl_coef * revkl`` on the fixed pairs, also when the batch carries
    theta_old's shift and clipped-DPO weights and J weights the winners' likelihood."""
    policy, reference, b = tiny(7)
    coef = SAILCoefficients(beta=0.5, revkl_coef=0.2, bc_coef=0.5, dpo_clip=True)
    fixed, _ = SAILObjective(coef).at_theta_old(policy, reference, b)
    idx = torch.arange(5)
    f = fixed_batch_objective(reference, fixed, coef, idx)
    _, h, _, kl = by_hand(policy, reference, b, 0.5)
    w, l = torch.where(b.pref1[idx] > 0.5, b.i[idx], b.j[idx]), torch.where(b.pref1[idx] > 0.5, b.j[idx], b.i[idx])
    torch.testing.assert_close(f(policy), F.logsigmoid(h[w] - h[l]).mean() - 0.2 * kl.mean())


def test_term_gradients_measure_each_weighted_part_and_an_extra_one():
    policy, reference, b = tiny(8)
    coef = SAILCoefficients(beta=0.5, revkl_coef=0.3)
    obj = SAILObjective(coef)
    fixed, _ = obj.at_theta_old(policy, reference, b)
    params = list(policy.parameters())
    extra = {"cost": 2.0 * policy.log_std.sum()}  # what an agent adds beside J (its Lagrangian term)
    out = obj.term_gradients(policy, reference, fixed, torch.arange(b.n_pairs), extra)
    _, _, logsig, kl = by_hand(policy, reference, b, 0.5)
    assert out["grad/dpo"] == pytest.approx(float(grad(logsig.mean(), params).norm()), rel=1e-4)
    assert out["grad/revkl"] == pytest.approx(float(grad(0.3 * kl.mean(), params).norm()), rel=1e-4)
    assert out["grad/cost"] == pytest.approx(2.0 * ACT ** 0.5, rel=1e-6)
    assert out["grad/revkl_over_dpo"] == pytest.approx(out["grad/revkl"] / out["grad/dpo"])
    assert "grad/bc" not in out and -1.0 <= out["grad/cos_dpo_shift"] <= 1.0


def test_replay_extends_segments_and_pairs_after_the_fresh_ones():
    _, _, fresh = tiny(9)
    _, _, other = tiny(10)
    stored = dataclasses.replace(other, i=other.i[:3], j=other.j[:3], pref1=other.pref1[:3], on_policy=False)
    b = fresh.extended(stored)
    assert (b.n_fresh_segments, b.n_fresh_pairs, len(b.obs), b.n_pairs) == (M, fresh.n_pairs, 2 * M, fresh.n_pairs + 3)
    torch.testing.assert_close(b.obs[b.i[fresh.n_pairs:]], other.obs[other.i[:3]])  # stored pairs index the stored segments
    assert float(b.old_logp[M:].abs().max()) == 0.0 and b.on_policy
    assert fresh.extended(None) is fresh


def test_inpo_terms_and_its_statistic_at_the_prox_centre():
    """INPO's loss through the objective equals ``inpo_loss`` on the batch's own pieces; ``J = -inpo``; with
    pi_ref = mu_k (right after a reset) the statistic ``f = -L(mu_k) / L_0`` is exactly -1."""
    policy, _, b = tiny(11)
    obj = INPOObjective(INPOCoefficients(beta=0.5, eta=2.0, tau=0.25))
    fresh, f = obj.prepare(policy, None, b.fixed(ref_logp=b.old_logp))
    assert f == pytest.approx(-1.0)
    fresh, f = obj.prepare(policy, None, b)
    win = segment_win_rates(b.i, b.j, b.pref1, M)
    torch.testing.assert_close(fresh.win, win)
    t = obj.terms(policy, None, fresh, torch.arange(b.n_pairs))
    logp = by_hand(policy, policy, b, 0.5)[0]
    o, r = b.old_logp, b.ref_logp
    hand = inpo_loss(logp[b.i], logp[b.j], o[b.i], o[b.j], r[b.i], r[b.j], win[b.i], win[b.j], 2.0, 0.25)
    torch.testing.assert_close(t["inpo"], hand)
    assert float(obj.objective(t)) == -float(t["inpo"])
    assert obj.term_gradients(policy, None, fresh, torch.arange(b.n_pairs))["grad/inpo_pref"] > 0
