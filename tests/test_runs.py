"""Run folders, checkpoints, determinism, and PPO learning on a real MuJoCo task."""

import json

import numpy as np
import pytest
import torch
import yaml

from rl_align.errors import UserError
from rl_align.checkpoints import load_checkpoint
from rl_align.runs import create_run_folder, load_run_config, resolve_config
from rl_align.train import train

TINY = ["agent.n_steps=256", "run.eval_episodes=2", "env.max_episode_steps=100", "run.progress=false"]


def tiny_run(run_dir, steps=512, seed=0, extra=()):
    cfg = resolve_config("halfcheetah", "ppo", [*TINY, run_dir, *extra], steps=steps, seed=seed)
    return train(cfg, quiet=True)


def test_run_folder_holds_everything(run_dir):
    folder, summary = tiny_run(run_dir)
    assert folder.parts[-3:-1] == ("halfcheetah", "ppo") and folder.name.endswith("-s0")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["run"]["seed"] == 0 and cfg["agent"]["n_steps"] == 256 and cfg["env"]["task"] == "HalfCheetah-v5"
    assert "torch" in json.loads((folder / "versions.json").read_text())
    assert list((folder / "tb").glob("events.out.tfevents.*"))
    header = (folder / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"step", "train/policy_loss", "eval/return_det", "time/sps"} <= set(header)
    assert json.loads((folder / "summary.json").read_text())["env_steps"] == 512 == summary["env_steps"]
    state = load_checkpoint(folder)
    assert state["env_steps"] == 512
    assert load_run_config(folder).agent.n_steps == 256


def test_existing_folder_is_never_reused(run_dir):
    cfg = resolve_config("halfcheetah", "ppo", [*TINY, run_dir])
    a, b = create_run_folder(cfg), create_run_folder(cfg)
    assert a != b and a.exists() and b.exists()


def test_same_seed_same_numbers(run_dir):
    _, s1 = tiny_run(run_dir, seed=3)
    _, s2 = tiny_run(run_dir, seed=3)
    _, s3 = tiny_run(run_dir, seed=4)
    assert s1["final"] == s2["final"]
    assert s1["final"] != s3["final"]


def test_corrupt_checkpoint_is_a_one_line_user_error(run_dir):
    folder, _ = tiny_run(run_dir, steps=256)
    ckpt = folder / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(folder)


def test_ppo_raises_inverted_pendulum_return(run_dir):
    cfg = resolve_config("inverted-pendulum", "ppo", [run_dir, "run.eval_episodes=5", "run.progress=false"], steps=16384, seed=0)
    _, summary = train(cfg, quiet=True)
    before, after = summary["initial"]["eval/return_det"], summary["final"]["eval/return_det"]
    # measured before -> after, seeds 0/1/2: 23.0 -> 1000.0, 21.4 -> 1000.0, 22.4 -> 1000.0 (the episode cap)
    assert before < 100 and after > 5 * before and after > 300, (before, after)


def test_init_starts_from_another_runs_policy_and_normalizer(run_dir):
    from rl_align.runs import build_agent
    from rl_align.train import prepare

    folder, _ = tiny_run(run_dir, steps=256)
    saved = load_checkpoint(folder)
    cfg = resolve_config("halfcheetah", "ppo", [*TINY, run_dir, f"agent.init={folder}"], seed=1)
    agent, env = build_agent(cfg)
    env.close()
    fresh = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    prepare(agent, cfg)
    for k, v in agent.policy.state_dict().items():
        assert torch.equal(v, saved["policy"][k])
    assert any(not torch.equal(fresh[k], saved["policy"][k]) for k in fresh)  # seed 1 starts elsewhere without init
    assert np.allclose(agent.obs_rms.mean, saved["obs_rms"]["mean"].numpy())
    bad = resolve_config("halfcheetah", "ppo", [*TINY, run_dir, f"agent.init={folder / 'nope'}"])
    with pytest.raises(UserError):
        train(bad, quiet=True)


def test_a_preset_with_a_base_is_that_preset_plus_its_own_lines(tmp_path):
    (tmp_path / "mine.yaml").write_text("description: mine\nbase: sail-revkl\nrevkl_coef: 0.03\nrun:\n  eval_episodes: 3\n")
    mine, base = resolve_config("halfcheetah-pref", str(tmp_path / "mine.yaml")), resolve_config("halfcheetah-pref", "sail-revkl")
    assert mine.agent.revkl_coef == 0.03 != base.agent.revkl_coef
    assert (mine.agent.beta, mine.agent.shift_coef, mine.run.steps) == (base.agent.beta, base.agent.shift_coef, base.run.steps)
    assert mine.run.eval_episodes == 3  # a nested section merges key by key


@pytest.mark.parametrize("text, message", [("base: no-such-preset\n", "no-such-preset is not a preset in agents/"),
                                           ("base: loop.yaml\n", "leads back to itself")])
def test_a_bad_base_is_one_line_naming_the_fix(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        resolve_config("halfcheetah-pref", str(tmp_path / "loop.yaml"))


@pytest.mark.parametrize("env,agent,old,new,value", [("halfcheetah-pref", "rlhf", "kl_coef", "revkl_coef", 0.05),
                                                     ("halfcheetah-pref", "sail-revkl", "minibatch", "minibatch_pairs", 50)])
def test_a_run_folder_written_before_a_rename_still_loads(tmp_path, env, agent, old, new, value):
    """``rl-align eval`` / ``--resume`` of an older run: its config.yaml holds the old key, read as the new
    one; the same old key in an override is refused with the new name."""
    cfg = resolve_config(env, agent, [f"agent.{new}={value}"])
    data = cfg.to_dict()
    data["agent"][old] = data["agent"].pop(new)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert getattr(load_run_config(tmp_path).agent, new) == value
    with pytest.raises(UserError, match=f"use --set agent.{new}="):
        resolve_config(env, agent, [f"agent.{old}={value}"])
