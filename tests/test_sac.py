"""SAC and the PEBBLE family: the closed-form KL of squashed Gaussians, the KL term's direction, query
selection, relabelling, the unsupervised phase's reward, learning on a small task, preference
direction on a locomotion task, and exact resume of an off-policy run."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rl_align.agents.pebble import RewardEnsemble, select_queries
from rl_align.agents.sac import SAC
from rl_align.buffer import ReplayBuffer, Segments
from rl_align.checkpoints import load_checkpoint
from rl_align.nets import SquashedGaussianPolicy, gaussian_kl
from rl_align.runs import build_agent, resolve_config
from rl_align.train import resume, train

TINY = ["agent.hidden=[32,32]", "agent.batch=64", "agent.log_every=250", "run.progress=false", "run.eval_episodes=2"]


def rows(folder: Path) -> list[dict]:
    with (folder / "progress.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def still_segments(x: np.ndarray, H: int, obs_dim: int) -> Segments:
    """One segment of ``H`` steps per value of ``x``, held still at first observation ``x`` (the rest 0),
    zero action; what a reward ensemble over (s, a) sees of them is ``x`` alone."""
    M = len(x)
    obs = np.zeros((M, H, obs_dim), np.float32)
    obs[..., 0] = x[:, None]
    z = np.zeros((M, H))
    return Segments(np.zeros(M, int), np.zeros(M, int), obs, np.zeros((M, H, 1), np.float32), z, z, z, np.zeros((M, H, 3)),
                    np.ones((M, H), bool), obs)


def squashed_logp(u: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Density of ``a = tanh(u)`` under the squashed Gaussian, written from the change of variables."""
    a = torch.tanh(u)
    gauss = torch.distributions.Normal(mu, log_std.exp()).log_prob(u)
    return (gauss - torch.log(1 - a**2)).sum(-1)


def test_squashed_gaussian_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu_p, ls_p = torch.tensor([[0.3, -0.5]]), torch.tensor([[-0.4, -0.9]])
    mu_q, ls_q = torch.tensor([[-0.2, 0.1]]), torch.tensor([[-0.7, -0.3]])
    u = mu_p + ls_p.exp() * torch.randn(400_000, 2, dtype=torch.float64).float()
    u = u.clamp(-6, 6)  # keep 1 - tanh(u)^2 representable in float32
    # KL(p || q) = E_p[log p(a) - log q(a)] over squashed actions a = tanh(u): the Jacobian terms cancel
    mc = (squashed_logp(u, mu_p, ls_p) - squashed_logp(u, mu_q, ls_q)).mean()
    closed = gaussian_kl(mu_p, ls_p, mu_q, ls_q)[0]
    assert closed == pytest.approx(float(mc), rel=0.02), (float(closed), float(mc))


def test_revkl_direction_flips_the_arguments(tmp_path):
    cfg = resolve_config("halfcheetah", "pebble-revkl", [*TINY, f"run.out_dir={tmp_path}"], steps=1000)
    agent, env = build_agent(cfg)
    env.close()
    torch.manual_seed(1)
    for p in agent.ref_policy.parameters():  # a reference that differs from the policy
        p.data += 0.3 * torch.randn_like(p)
    obs = torch.randn(64, agent.obs_dim)
    with torch.no_grad():
        mu, log_std = agent.policy.dist_params(obs)
        mu_r, ls_r = agent.ref_policy.dist_params(obs)
    assert agent.config.revkl_direction == "forward"  # the paper's code: KL(pi_ref || pi)
    forward = float(agent.revkl_term(obs, mu, log_std))
    assert forward == pytest.approx(float(gaussian_kl(mu_r, ls_r, mu, log_std).mean()), rel=1e-6)
    agent.config.revkl_direction = "reverse"
    reverse = float(agent.revkl_term(obs, mu, log_std))
    assert reverse == pytest.approx(float(gaussian_kl(mu, log_std, mu_r, ls_r).mean()), rel=1e-6)
    assert abs(forward - reverse) > 1e-3 * reverse  # the two directions differ here


def test_revkl_coef_zero_is_pebble_exactly(tmp_path):
    sets = [*TINY, "agent.learning_starts=200", "agent.unsup_steps=200", "agent.feedback_every=250", "agent.segment_len=20",
            "run.eval_episodes=1", "env.max_episode_steps=200"]
    a, _ = train(resolve_config("halfcheetah-pref", "pebble", [*sets, f"run.out_dir={tmp_path / 'a'}"], steps=1500, seed=1), quiet=True)
    b, _ = train(resolve_config("halfcheetah-pref", "pebble-revkl", [*sets, "agent.revkl_coef=0", "agent.ref_every=500",
                                                                    f"run.out_dir={tmp_path / 'b'}"], steps=1500, seed=1), quiet=True)
    ra, rb = rows(a), rows(b)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    assert float(ra[-1]["pebble/labels"] or 0) > 0 or any(r.get("pebble/labels") for r in ra)  # the runs did learn from labels


def test_natural_step_solves_the_fisher_system_in_its_trust_region():
    """The npg actor step against an explicit Fisher: ``F`` the Hessian of ``E_s KL(pi_old || pi)`` over the
    flat parameters, computed by autograd (the agent's product uses the Gaussian's Fisher in closed form);
    the step equals ``-sqrt(2 max_kl / x^T A x) x`` with ``x = A^-1 g``, ``A = F + damping I``; the KL it
    moves is ``max_kl`` to second order; the loss falls."""
    cfg = resolve_config("halfcheetah", "pebble-revkl-npg", [*TINY, "agent.hidden=[8,8]", "agent.npg_cg_iters=400",
                                                             "agent.npg_max_kl=1e-5"], steps=1000)
    agent, env = build_agent(cfg)
    env.close()
    policy = agent.policy.double()
    torch.manual_seed(0)
    obs = torch.randn(64, agent.obs_dim, dtype=torch.float64)
    w = torch.randn(agent.act_dim, dtype=torch.float64)
    loss_of = lambda mu, log_std: (mu @ w).mean() + (log_std**2).mean()  # noqa: E731  any smooth loss of pi
    names, shapes = [n for n, _ in policy.named_parameters()], [p.shape for p in policy.parameters()]
    theta = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().clone()

    def dist(flat):  # (mu, log_std) at obs with the parameters ``flat``, as dist_params computes them
        params = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split([math.prod(s) for s in shapes]), shapes))))
        return torch.func.functional_call(policy, params, (obs,))

    mu0, log_std0 = (t.detach() for t in dist(theta))
    kl = lambda flat: gaussian_kl(mu0, log_std0, *dist(flat)).mean()  # noqa: E731
    loss = lambda flat: loss_of(*dist(flat))  # noqa: E731

    A = torch.autograd.functional.hessian(kl, theta) + agent.config.npg_damping * torch.eye(len(theta), dtype=torch.float64)
    x = torch.linalg.solve(A, torch.autograd.functional.jacobian(loss, theta))
    expected = -math.sqrt(2 * agent.config.npg_max_kl / float(x @ A @ x)) * x
    m = agent.natural_step(obs, loss_of(*policy.dist_params(obs)))
    moved = torch.nn.utils.parameters_to_vector(policy.parameters()).detach() - theta
    assert float((moved - expected).norm() / expected.norm()) < 1e-4
    assert m["train/npg_kl"] == pytest.approx(1e-5, rel=0.05) and m["train/npg_skipped"] == 0.0
    assert float(loss(theta + moved)) < float(loss(theta))


def test_recent_index_is_the_newest_transitions():
    buf = ReplayBuffer(capacity=12, n_envs=2, obs_dim=1, act_dim=1)
    for i in range(9):  # 6 slots per env: the ring wraps after step 5
        buf.add(np.full((2, 1), i, np.float32), np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2), np.zeros(2), np.zeros((2, 3)),
                np.zeros(2, bool), np.zeros(2, bool))
    t, n = buf.recent_index(6)
    assert sorted(buf.obs[t, n, 0]) == [6, 6, 7, 7, 8, 8] and sorted(n) == [0, 0, 0, 1, 1, 1]


def test_disagreement_picks_the_pairs_the_members_disagree_on():
    """Members whose reward is +x, -x and +x (x = the first observation): pairs whose segments differ in x
    split the ensemble, pairs with equal x get P = 1/2 from every member."""
    torch.manual_seed(0)
    rm = RewardEnsemble(obs_dim=2, act_dim=1, hidden=[2], members=3, lr=1e-3)
    with torch.no_grad():
        w0, b0, w1, b1 = rm.net.weights[0], rm.net.biases[0], rm.net.weights[1], rm.net.biases[1]
        w0.zero_(), b0.zero_(), w1.zero_(), b1.zero_()
        w0[:, 0, 0], w0[:, 0, 1] = 1.0, -1.0  # hidden = (relu(x), relu(-x)), so x = h0 - h1
        for k, sign in enumerate((1.0, -1.0, 1.0)):
            w1[k, 0, 0], w1[k, 1, 0] = 0.1 * sign, -0.1 * sign
    M, H = 40, 5
    rng = np.random.default_rng(0)
    x1 = rng.uniform(-1, 1, M)
    gap = np.zeros(M)
    gap[rng.choice(M, 6, replace=False)] = rng.uniform(1.0, 2.0, 6) * rng.choice([-1, 1], 6)

    seg = lambda x: still_segments(x, H, obs_dim=2)  # noqa: E731
    picked = select_queries(rm, seg(x1), seg(x1 + gap), 6, "disagreement", rng)
    assert set(picked) == set(np.flatnonzero(gap))
    assert len(set(select_queries(rm, seg(x1), seg(x1 + gap), 6, "uniform", rng)) & set(np.flatnonzero(gap))) < 6


def test_rm_output_linear_leaves_the_learned_reward_unbounded():
    """B-Pref's tanh caps each member at 1; ``agent.rm_output=linear`` passes the last layer through."""
    for out, expect in (("tanh", np.tanh(3.0)), ("linear", 3.0)):
        agent, env = build_agent(resolve_config("cheetah-run-pref", "pebble", [*TINY, f"agent.rm_output={out}"], steps=1000, seed=0))
        env.close()
        net = agent.reward_model.net
        with torch.no_grad():
            net.weights[-1].zero_()
            net.biases[-1].fill_(3.0)
        assert agent.reward_model.predict(np.zeros((2, agent.obs_dim), np.float32), np.zeros((2, agent.act_dim), np.float32)) == pytest.approx([expect] * 2)


def test_reward_fit_stops_on_the_decided_labels_and_leaves_ties_out():
    """B-Pref's early stop (train accuracy >= 0.97) reads the labels that have a right order: 20 ties among 60
    labels (segments that both sit still, as cheetah-run's zero-speed ones do) cannot hold it under the stop,
    and the accuracy it reports is that of the 40 decided pairs."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    H = 5
    x1, x2 = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)  # decided: the larger x is preferred
    t2 = rng.uniform(-3, -2.5, 20)  # ties: two different still states, x1 > x2 in every one
    a, b = np.concatenate([x1, t2 + 0.4]), np.concatenate([x2, t2])
    labels = np.concatenate([(x1 > x2).astype(float), np.full(20, 0.5)])

    seg = lambda x: still_segments(x, H, obs_dim=1)  # noqa: E731
    rm = RewardEnsemble(obs_dim=1, act_dim=1, hidden=[32, 32], members=3, lr=1e-2)
    rm.add(seg(a), seg(b), labels)
    m = rm.fit(max_epochs=400, batch=64, stop_accuracy=0.97, rng=rng)
    # measured at torch/NumPy seeds 0-5: stops after 2-3 epochs, accuracy 0.975-1.0; counting ties ran all 400
    assert m["pebble/rm_epochs"] < 400  # stopped by the rule, not the cap
    assert m["pref/train_accuracy"] >= 0.97
    assert rm.accuracy(seg(a), seg(b), labels) >= 0.97  # decided pairs ranked right once it stopped


def test_relabel_rewrites_every_stored_transition():
    buf = ReplayBuffer(capacity=30, n_envs=2, obs_dim=3, act_dim=2)
    rng = np.random.default_rng(0)
    for _ in range(23):  # more than the 15 slots per env: the ring wraps
        obs = rng.standard_normal((2, 3)).astype(np.float32)
        buf.add(obs, obs, rng.uniform(-1, 1, (2, 2)), np.ones(2), np.zeros(2), np.zeros((2, 3)), np.zeros(2, bool), np.zeros(2, bool), learned=-7.0)
    assert buf.size == 15 and (buf.learned == -7.0).all()
    buf.relabel(lambda o, a: o[:, 0] + 10 * a[:, 1], chunk=4)
    assert np.allclose(buf.learned, buf.obs[..., 0] + 10 * buf.actions[..., 1])


def test_reward_corr_reads_the_recent_window_of_the_two_columns():
    """Pearson correlation of the learned and the true reward over the last k vector steps, across the
    ring's wrap: an affine copy of the truth scores 1 there whatever the older steps hold."""
    buf = ReplayBuffer(capacity=20, n_envs=2, obs_dim=1, act_dim=1)
    rng = np.random.default_rng(0)
    for t in range(16):  # 10 slots per env: the last 6 steps overwrite the first 6 slots
        true = rng.standard_normal(2)
        learned = 3 * true + 2 if t >= 8 else 3 * rng.standard_normal(2)
        buf.add(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), true, np.zeros(2), np.zeros((2, 3)), np.zeros(2, bool),
                np.zeros(2, bool), learned=learned)
    assert buf.reward_corr(8) == pytest.approx(1.0, abs=1e-6)  # steps 8-15: slots 8, 9, then 0-5
    assert buf.reward_corr(10) < 0.9  # the older, unrelated steps count once the window reaches them
    buf.learned[:] = -buf.rewards
    assert buf.reward_corr(10) == pytest.approx(-1.0, abs=1e-6)
    buf.learned[:] = 0.5
    assert math.isnan(buf.reward_corr(10))


def test_segments_stay_inside_one_episode():
    buf = ReplayBuffer(capacity=200, n_envs=2, obs_dim=1, act_dim=1)
    for t in range(100):
        done = np.array([t % 13 == 12, t % 7 == 6])  # episodes of 13 and 7 steps
        buf.add(np.full((2, 1), t, np.float32), np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2), np.zeros(2), np.zeros((2, 3)),
                done, np.zeros(2, bool))
    seg = buf.segments(500, 5, np.random.default_rng(0))
    t = seg.obs[..., 0]
    assert (np.diff(t, axis=1) == 1).all()  # consecutive steps
    period = np.where(seg.env == 0, 13, 7)
    assert ((t[:, 0] // period[:, None][:, 0]) == (t[:, -1] // period)).all()  # never across an episode end
    assert len(set(zip(seg.env, t[:, 0]))) > 50


def test_unsupervised_phase_reads_no_reward(tmp_path):
    """Both reward columns poisoned with nan: the critic and the actor stay finite through the
    unsupervised phase (its reward is the state entropy), and the batch reward is that estimate."""
    cfg = resolve_config("halfcheetah-pref", "pebble", [*TINY, "agent.learning_starts=100", "agent.unsup_steps=100000",
                                                       f"run.out_dir={tmp_path}"], steps=10_000)
    agent, env = build_agent(cfg)
    from rl_align.agents.base import EpisodeTracker

    obs = env.reset()
    obs = agent.collect(env, obs, EpisodeTracker(env.n_envs))
    agent.replay.rewards[:] = np.nan
    agent.replay.learned[:] = np.nan
    m = agent.gradient_step()
    env.close()
    assert math.isfinite(m["train/critic_loss"]) and math.isfinite(m["train/batch_reward"]) and m["train/batch_reward"] > 0
    assert all(torch.isfinite(p).all() for p in agent.critic.parameters())
    assert agent.oracle.queries == 0


def test_sac_learns_inverted_pendulum(tmp_path):
    # measured here (3,000 steps, 32x32 nets): deterministic return 4.0 -> 91.0, 7.0 -> 50.0, 4.0 -> 102.5 at seeds
    # 0, 1, 2 (gains 87, 43, 98); the bound asks for a gain of 20, under half the smallest
    for seed in (0, 1, 2):
        cfg = resolve_config("inverted-pendulum", "sac", [*TINY, "agent.learning_starts=500", f"run.out_dir={tmp_path}"], steps=3000, seed=seed)
        _, s = train(cfg, quiet=True)
        assert s["final"]["eval/return_det"] > s["initial"]["eval/return_det"] + 20, (seed, s["initial"]["eval/return_det"], s["final"]["eval/return_det"])


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, sigterm_cli):
    sets = [*TINY, "agent.learning_starts=200", "agent.unsup_steps=300", "agent.feedback_every=500", "agent.segment_len=20",
            "run.eval_episodes=1", "env.max_episode_steps=200", "run.checkpoint_every=500"]
    out = tmp_path / "runs"
    args = ["train", "--env", "halfcheetah-pref", "--agent", "pebble-revkl", "--steps", "2500", "--seed", "2", "--set", f"run.out_dir={out}"]
    for s in [*sets, "agent.ref_every=1000", "agent.ref_start=100"]:
        args += ["--set", s]
    returncode, err, progress = sigterm_cli(args, out, "*/*/*/progress.csv")
    assert returncode == 143, err
    folder = progress.parent
    stopped = load_checkpoint(folder)["env_steps"]
    assert 0 < stopped < 2500
    _, resumed = resume(folder, quiet=True)
    cfg = resolve_config("halfcheetah-pref", "pebble-revkl", [*sets, "agent.ref_every=1000", "agent.ref_start=100",
                                                              f"run.out_dir={tmp_path / 'straight'}"], steps=2500, seed=2)
    straight_folder, straight = train(cfg, quiet=True)
    assert resumed["final"] == straight["final"] and resumed["queries_used"] == straight["queries_used"] > 0
    a, b = load_checkpoint(folder), load_checkpoint(straight_folder)
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    assert torch.equal(a["replay"]["learned"], b["replay"]["learned"])
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in rows(folder)] == [strip(r) for r in rows(straight_folder)]


def test_pebble_follows_its_teacher_forward_or_backward(tmp_path):
    """The agent never reads the reward: labels of a teacher scoring forward or backward motion drive the
    sampled x-velocity apart on cheetah-run (DeepMind Control), and the learned reward correlates with the
    task's (forward) reward for the forward teacher and against it for the backward one. Measured here
    (6,000 steps, half a gradient step per env step, 32x32 nets, 240 labels; means of the last 2,000 steps)
    at seeds 0, 1, 2: x-velocity forward -0.079 / 0.094 / -0.019, backward -0.439 / -0.194 / -0.168, gaps
    0.36, 0.29, 0.15 (the bound asks for 0.1); pref/reward_corr forward 0.42 / 0.50 / 0.53 (bound 0.3),
    backward -0.36 / -0.36 / -0.42 (bound -0.1); seeds 3 and 4 gave gaps 0.43 and 0.22,
    correlations 0.46 / 0.53 and -0.27 / -0.50. One gradient step per env step gave like margins (gaps 0.23,
    0.43, 0.15) at twice the time; 4,000 steps did not hold them (forward correlation 0.26 at seed 0)."""
    sets = ["agent.hidden=[32,32]", "agent.batch=64", "agent.log_every=500", "run.progress=false", "run.eval_episodes=1",
            "agent.updates_per_step=0.5",
            "agent.learning_starts=500", "agent.unsup_steps=0", "agent.feedback_every=500", "agent.queries_per_feedback=20",
            "agent.segment_len=25", "agent.rm_hidden=[32,32]", "env.oracle.budget=null", f"run.out_dir={tmp_path}"]
    for seed in (0, 1, 2):
        speed, corr = {}, {}
        for score in ("forward", "backward"):
            folder, s = train(resolve_config("cheetah-run-pref", "pebble", [*sets, f"env.oracle.score={score}"], steps=6000, seed=seed), quiet=True)
            v = [float(r["rollout/x_velocity"]) for r in rows(folder) if r.get("rollout/x_velocity")]
            speed[score] = float(np.mean(v[-4:]))
            corr[score] = float(np.mean([float(r["pref/reward_corr"]) for r in rows(folder) if r.get("pref/reward_corr")][-4:]))
            assert s["queries_used"] == 240
        assert speed["forward"] > speed["backward"] + 0.1, (seed, speed)
        assert corr["forward"] > 0.3 and corr["backward"] < -0.1, (seed, corr)


def test_pebble_learns_from_a_label_store_and_queues_its_pairs_there(tmp_path):
    """A person's labels (a label store) feed the reward ensemble; online, each feedback session queues the
    pairs it picked from the replay buffer for labelling."""
    from label_helpers import forward_choice, small_store

    store = small_store(tmp_path / "labels.sqlite", 40)
    ids = [p["id"] for p in store.queued(limit=100)]
    answered = 0
    for pid in ids[:30]:
        choice = forward_choice(store, store.pair(pid))
        if choice != "equal":
            store.set_label(pid, choice, "ada")
            answered += 1
    sets = [*TINY, "agent.learning_starts=200", "agent.unsup_steps=0", "agent.feedback_every=300", "agent.segment_len=20",
            "env.oracle.kind=human", f"env.oracle.store={tmp_path / 'labels.sqlite'}", "env.oracle.post_pairs=5",
            "run.eval_episodes=1", f"run.out_dir={tmp_path / 'runs'}"]
    folder, summary = train(resolve_config("halfcheetah-pref", "pebble", sets, steps=1000, seed=0), quiet=True)
    logged = [float(r["pebble/labels"]) for r in rows(folder) if r.get("pebble/labels")]
    assert logged and max(logged) == answered  # every answered pair reached the reward ensemble
    assert store.counts()["total"] == 40 + summary["queries_used"] and summary["queries_used"] >= 5  # and the agent queued its own
