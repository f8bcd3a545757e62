"""stable-baselines3 in and out (rl_align/sb3.py): SB3 models imported without unpickling act exactly as
SB3 does, malicious files run nothing, rl-align checkpoints run in SB3's evaluate_policy and load with
SB3's own PPO.load, and the cost tasks are registered Gymnasium ids."""

import base64
import csv
import io
import json
import pickle
import re
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
from stable_baselines3 import PPO, SAC  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize  # noqa: E402
from torch import nn  # noqa: E402

import rl_align  # noqa: E402,F401  (registers the rl_align/... ids)
from rl_align.cli import main  # noqa: E402
from rl_align.envs import make_env  # noqa: E402
from rl_align.envs.costs import CostWrapper  # noqa: E402
from rl_align.errors import UserError  # noqa: E402
from rl_align.evaluation import evaluate_run, load_agent  # noqa: E402
from rl_align.runs import resolve_config  # noqa: E402
from rl_align.sb3 import PolicyView, read_sb3, read_vecnormalize  # noqa: E402
from rl_align.evaluation import evaluate  # noqa: E402
from rl_align.runs import build_agent  # noqa: E402
from rl_align.train import prepare, train  # noqa: E402

SHAPES = {  # (SB3 policy_kwargs, rl-align agent.hidden, agent.activation)
    "64x64-tanh": ({}, [64, 64], "tanh"),  # SB3's defaults
    "64x64-relu": ({"activation_fn": nn.ReLU}, [64, 64], "relu"),
    "32x16-tanh": ({"net_arch": dict(pi=[32, 16], vf=[8])}, [32, 16], "tanh"),
    "32x16-relu": ({"net_arch": dict(pi=[32, 16], vf=[8]), "activation_fn": nn.ReLU, "log_std_init": -1.0}, [32, 16], "relu"),
}


def sb3_env():
    return VecNormalize(DummyVecEnv([lambda: gym.make("HalfCheetah-v5")]), gamma=0.98)


@pytest.fixture(scope="module")
def sb3_models(tmp_path_factory):
    """For each shape, an SB3 PPO trained 1,024 steps under VecNormalize, saved as SB3 saves it:
    ``model.zip`` and ``vecnormalize.pkl`` in one folder. ``{shape: (folder, model, venv)}``."""
    out = {}
    for name, (kwargs, _, _) in SHAPES.items():
        folder = tmp_path_factory.mktemp(name)
        venv = sb3_env()
        venv.seed(0)
        model = PPO("MlpPolicy", venv, n_steps=512, batch_size=128, n_epochs=2, seed=0, device="cpu", policy_kwargs=kwargs)
        model.learn(1024)
        model.save(folder / "model.zip")
        venv.save(folder / "vecnormalize.pkl")
        venv.training = False
        out[name] = folder, model, venv
    return out


def raw_observations(n: int = 300) -> np.ndarray:
    env = gym.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=1)
    rng, out = np.random.default_rng(1), []
    for _ in range(n):
        obs, *_ = env.step(rng.uniform(-1, 1, 6))
        out.append(obs)
    return np.asarray(out) * np.where(np.arange(n) % 3 == 0, 4.0, 1.0)[:, None]  # some states far out, where the clip at 10 acts


@pytest.mark.parametrize("shape", list(SHAPES))
def test_imported_policy_normalizes_and_acts_as_sb3(sb3_models, shape):
    (folder, model, venv), (_, hidden, activation) = sb3_models[shape], SHAPES[shape]
    cfg = resolve_config("halfcheetah", "ppo", [f"agent.init=sb3:{folder / 'model.zip'}", f"agent.hidden={hidden}",
                                                f"agent.activation={activation}", "agent.n_steps=64"], seed=0)
    agent, env = build_agent(cfg)
    env.close()
    prepare(agent, cfg)  # PPO's agent.init "sb3:..." -> sb3.agent_state, with vecnormalize.pkl found beside the zip
    raw = raw_observations()
    ours, theirs = agent.normalize(raw), venv.normalize_obs(raw).astype(np.float32)
    assert np.abs(theirs).max() == 10.0  # the clip is exercised
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    sb3_actions, _ = model.predict(theirs, deterministic=True)
    np.testing.assert_allclose(agent.act(raw, deterministic=True), sb3_actions, rtol=0, atol=1e-6)
    assert torch.equal(agent.policy.log_std.detach(), model.policy.log_std.detach())
    assert np.ptp(sb3_actions, axis=0).min() > 1e-3  # actions vary with the state (SB3's 0.01-gain head keeps them small)


def test_sail_reference_from_an_sb3_model(sb3_models):
    folder, model, venv = sb3_models["32x16-relu"]
    cfg = resolve_config("halfcheetah-pref", "sail-revkl", [f"agent.ref=sb3:{folder / 'model.zip'}:{folder / 'vecnormalize.pkl'}",
                                                           "agent.hidden=[32,16]", "agent.activation=relu", "agent.n_envs=1"], seed=0)
    agent, env = build_agent(cfg)
    env.close()
    prepare(agent, cfg)
    raw = raw_observations(50)
    obs = torch.as_tensor(agent.normalize(raw))
    sb3_mean = model.policy.get_distribution(torch.as_tensor(venv.normalize_obs(raw), dtype=torch.float32)).distribution.mean
    torch.testing.assert_close(agent.ref_policy.mean(obs), sb3_mean.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(agent.policy.mean(obs), sb3_mean.detach(), rtol=0, atol=1e-6)  # starts from pi_ref
    assert agent.freeze_obs_rms


def test_a_mismatched_network_or_model_kind_is_a_one_line_error(sb3_models, tmp_path):
    folder = sb3_models["32x16-relu"][0]
    zip_path = folder / "model.zip"
    cfg = resolve_config("halfcheetah", "ppo", [f"agent.init=sb3:{zip_path}", "agent.n_steps=64"], seed=0)
    agent, env = build_agent(cfg)
    env.close()
    with pytest.raises(UserError, match=r"holds a \[32,16\] relu policy; set agent.hidden=\[32,16\] agent.activation=relu$"):
        prepare(agent, cfg)
    alone = tmp_path / "alone.zip"  # the same model without its normalizer
    alone.write_bytes(zip_path.read_bytes())
    cfg = resolve_config("halfcheetah", "ppo", [f"agent.init=sb3:{alone}", "agent.hidden=[32,16]", "agent.activation=relu", "agent.n_steps=64"], seed=0)
    agent, env = build_agent(cfg)
    env.close()
    prepare(agent, cfg)  # a zip without a VecNormalize loads by itself, as a raw-observation policy
    raw = np.random.default_rng(0).normal(size=(3, agent.obs_rms.mean.shape[0])) * 20
    assert not cfg.agent.normalize_obs and np.array_equal(agent.normalize(raw), raw.astype(np.float32))  # no clip at 10 either
    SAC("MlpPolicy", "HalfCheetah-v5", buffer_size=10, device="cpu").save(tmp_path / "sac.zip")
    cfg = resolve_config("halfcheetah", "ppo", [f"agent.init=sb3:{tmp_path / 'sac.zip'}", "agent.n_steps=64"], seed=0)
    agent, env = build_agent(cfg)
    env.close()
    with pytest.raises(UserError, match="holds an SB3 SAC policy; supported for this agent: SB3 PPO / A2C 'MlpPolicy'"):
        prepare(agent, cfg)
    assert main(["train", "--agent", "ppo", "--set", f"agent.init=sb3:{tmp_path / 'sac.zip'}", "--steps", "64", "--set", f"run.out_dir={tmp_path}"]) == 2
    cfg = resolve_config("halfcheetah", "sac", [f"agent.ref=sb3:{zip_path}", "agent.revkl_coef=0.1"], seed=0)  # a PPO zip as SAC's pi_ref
    agent, env = build_agent(cfg)
    env.close()
    with pytest.raises(UserError, match="holds an SB3 PPO / A2C policy; supported for the sac agents' agent.ref: SB3 SAC"):
        prepare(agent, cfg)


def test_sac_reference_from_an_sb3_sac_model(tmp_path):
    """An SB3 SAC zip as the sac agents' fixed pi_ref: its own [32,16] network (not the agent's), the same
    pre-squash Gaussian SB3's actor gives, its log-std clipped at SB3's bounds; a run on it trains with the
    KL term and loads back for evaluation without a prepare step."""
    model = SAC("MlpPolicy", "HalfCheetah-v5", learning_starts=100, buffer_size=1000, seed=0, device="cpu",
                policy_kwargs={"net_arch": [32, 16]})
    model.learn(300)
    with torch.no_grad():
        model.actor.log_std.bias[0] = 40.0  # the first action's log-std at SB3's upper clip (2) everywhere
        model.actor.log_std.bias[1] = -60.0  # the second's at the lower one (-20)
    model.save(tmp_path / "sac.zip")
    ref = f"agent.ref=sb3:{tmp_path / 'sac.zip'}"
    cfg = resolve_config("halfcheetah", "sac", [ref, "agent.revkl_coef=0.1", "agent.hidden=[24,24]"], seed=0)
    agent, env = build_agent(cfg)
    env.close()
    prepare(agent, cfg)
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(64, 17)) * 3, dtype=torch.float32)
    mu, log_std = agent.ref_policy.dist_params(obs)
    sb3_mu, sb3_log_std, _ = model.actor.get_action_dist_params(obs)
    torch.testing.assert_close(mu, sb3_mu.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(log_std, sb3_log_std.detach(), rtol=0, atol=1e-6)
    assert (log_std[:, 0] == 2).all() and (log_std[:, 1] == -20).all() and log_std[:, 2:].std() > 1e-3
    assert agent.revkl_term(obs, *agent.policy.dist_params(obs)) > 0  # the agent's own [24,24] policy against it
    sets = ["--set", ref, "--set", "agent.revkl_coef=0.1", "--set", "agent.hidden=[24,24]", "--set", "agent.learning_starts=200",
            "--set", "agent.batch=32", "--set", "run.eval_episodes=1", "--set", "run.progress=false", "--set", f"run.out_dir={tmp_path / 'runs'}"]
    assert main(["train", "--env", "halfcheetah", "--agent", "sac", "--steps", "400", *sets]) == 0
    folder = next((tmp_path / "runs").glob("*/*/*/summary.json")).parent
    _, loaded = load_agent(folder)  # no prepare: the checkpoint says pi_ref's shape
    torch.testing.assert_close(loaded.ref_policy.dist_params(obs)[0], sb3_mu.detach(), rtol=0, atol=1e-6)
    with (folder / "progress.csv").open() as f:
        assert float(list(csv.DictReader(f))[-1]["train/kl_ref"]) > 0  # the KL term was in the actor's loss


class WritesAFile:
    """What a hostile file carries: unpickling it calls ``open(target, "w")``, creating ``target``."""

    def __init__(self, target) -> None:
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_hostile_files_run_nothing(sb3_models, tmp_path):
    folder = sb3_models["64x64-tanh"][0]
    blob = pickle.dumps(WritesAFile(tmp_path / "pwned-by-zip"))
    pickle.loads(pickle.dumps(WritesAFile(tmp_path / "payload-works")))  # the payload is live: unpickling creates the file
    assert (tmp_path / "payload-works").exists()

    # a model zip whose data carries the blob where SB3 keeps cloudpickled fields: PPO.load would run it
    with zipfile.ZipFile(folder / "model.zip") as z:
        members = {n: z.read(n) for n in z.namelist()}
    data = json.loads(members["data"])
    data["policy_class"][":serialized:"] = base64.b64encode(blob).decode()
    data["lr_schedule"] = {":type:": "<class 'function'>", ":serialized:": base64.b64encode(blob).decode()}
    evil = tmp_path / "evil" / "model.zip"
    evil.parent.mkdir()
    with zipfile.ZipFile(evil, "w") as z:
        for n, b in members.items():
            z.writestr(n, json.dumps(data) if n == "data" else b)
    (evil.parent / "vecnormalize.pkl").write_bytes((folder / "vecnormalize.pkl").read_bytes())
    m = read_sb3(str(evil))  # works: the blobs are never decoded
    assert m.hidden == [64, 64] and m.obs_rms is not None
    assert not (tmp_path / "pwned-by-zip").exists()

    # a policy.pth that is a pickle of the payload: torch's weights_only loader refuses it
    buf = io.BytesIO()
    torch.save({"log_std": WritesAFile(tmp_path / "pwned-by-pth")}, buf)
    with zipfile.ZipFile(tmp_path / "evil-pth.zip", "w") as z:
        for n, b in members.items():
            z.writestr(n, buf.getvalue() if n == "policy.pth" else b)
    with pytest.raises(UserError, match="policy.pth holds more than tensors"):
        read_sb3(str(tmp_path / "evil-pth.zip"))
    assert not (tmp_path / "pwned-by-pth").exists()

    # a vecnormalize.pkl whose pickle calls open(): refused before anything is called
    pkl = tmp_path / "vecnormalize.pkl"
    pkl.write_bytes(pickle.dumps({"obs_rms": WritesAFile(tmp_path / "pwned-by-pkl")}))
    with pytest.raises(UserError, match=r"asks to load (builtins|io|_io)\.open, which a VecNormalize file never holds; refused"):
        read_vecnormalize(pkl)
    assert not (tmp_path / "pwned-by-pkl").exists()
    assert main(["train", "--agent", "ppo", "--set", f"agent.init=sb3:{folder / 'model.zip'}:{pkl}", "--steps", "64", "--set", f"run.out_dir={tmp_path}"]) == 2
    assert not (tmp_path / "pwned-by-pkl").exists()


@pytest.fixture(scope="module")
def rl_align_run(tmp_path_factory):
    cfg = resolve_config("halfcheetah", "ppo", ["agent.n_steps=256", "agent.epochs=2", "run.eval_episodes=2", "env.max_episode_steps=150",
                                                "run.progress=false", f"run.out_dir={tmp_path_factory.mktemp('runs')}"], steps=1024, seed=0)
    return train(cfg, quiet=True)[0]


def test_evaluate_policy_on_the_predict_view_matches_rl_align_eval(rl_align_run, capsys):
    view = PolicyView.from_run(rl_align_run)
    cfg, agent = load_agent(rl_align_run)
    venv = DummyVecEnv([lambda: make_env(cfg.env) for _ in range(3)])
    venv.seed(50)  # env i reset with seed 50 + i, as rl-align's evaluate does
    with pytest.warns(UserWarning, match="Monitor"):
        returns, lengths = evaluate_policy(view, venv, n_eval_episodes=3, deterministic=True, return_episode_rewards=True)
    ours = evaluate(agent, cfg.env, 3, seed=50, deterministic=True)
    assert sorted(lengths) == sorted(ours["length"].tolist()) == [150, 150, 150]
    # SB3's DummyVecEnv keeps rewards in float32, rl-align sums in float64
    np.testing.assert_allclose(sorted(returns), sorted(ours["return"]), rtol=1e-5)
    assert np.std(returns) > 1e-3  # three different episodes, not one repeated
    assert evaluate_run(rl_align_run, 3, seed=50)["eval/return_det"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert main(["eval", str(rl_align_run), "--episodes", "3", "--seed", "50"]) == 0
    printed = re.search(r"return \(deterministic\)\s+(-?[\d.]+) ±", capsys.readouterr().out)
    assert abs(float(printed.group(1)) - np.mean(returns)) <= 0.05 + 1e-3  # printed with one decimal
    single, state = view.predict(venv.reset()[0], state="kept", deterministic=True)
    assert single.shape == (6,) and state == "kept"


def test_export_loads_with_sb3_and_acts_the_same(rl_align_run, tmp_path, capsys):
    out = tmp_path / "exported" / "model.zip"
    assert main(["export", "--sb3", str(rl_align_run), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _, agent = load_agent(rl_align_run)
    venv = VecNormalize.load(str(out.parent / "vecnormalize.pkl"), DummyVecEnv([lambda: gym.make("HalfCheetah-v5")]))  # the user's side
    venv.training, venv.norm_reward = False, False
    model = PPO.load(out, env=venv, device="cpu")
    raw = raw_observations(100)
    np.testing.assert_allclose(venv.normalize_obs(raw).astype(np.float32), agent.normalize(raw), rtol=0, atol=1e-6)
    sb3_actions, _ = model.predict(venv.normalize_obs(raw).astype(np.float32), deterministic=True)
    np.testing.assert_allclose(sb3_actions, agent.act(raw, deterministic=True), rtol=0, atol=1e-6)
    values = model.policy.predict_values(torch.as_tensor(agent.normalize(raw))).squeeze(-1)
    torch.testing.assert_close(values.detach(), agent.value(torch.as_tensor(agent.normalize(raw))).detach(), rtol=0, atol=1e-5)
    assert read_sb3(str(out)).hidden == [64, 64]  # and our own importer reads it back
    assert main(["export", "--sb3", str(rl_align_run), str(out)]) == 2  # never overwrites
    assert "exists; choose another output name" in capsys.readouterr().err


def test_registered_cost_task_passes_check_env_and_carries_cost():
    from gymnasium.utils.env_checker import check_env

    env = gym.make("rl_align/HalfCheetahVelocity-v5")
    check_env(env, skip_render_check=True)  # rendering needs a GL context; the video test covers it
    assert env.spec.max_episode_steps == 1000
    env = gym.make("rl_align/HalfCheetahVelocity-v5", threshold=0.0)
    env.reset(seed=0)
    env.action_space.seed(0)
    costs = []
    for _ in range(200):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        assert info["cost"] == float(info["x_velocity"] > 0.0)
        costs.append(info["cost"])
    assert 0 < np.mean(costs) < 1  # both sides of the threshold were visited
    for family, v_max in (("Hopper", 0.7402), ("Ant", 2.6222), ("Humanoid", 1.4149)):  # Safety-Gymnasium v1 thresholds
        wrapper = gym.make(f"rl_align/{family}Velocity-v5")
        while not isinstance(wrapper, CostWrapper):
            wrapper = wrapper.env
        assert wrapper.threshold == v_max and wrapper.unwrapped.spec.id == f"rl_align/{family}Velocity-v5"
