"""Learning: rl-align PPO vs stable-baselines3 PPO with the same hyperparameters, same env, same seeds.

Two matched settings (the preset carries ours; SB3 gets the same numbers here):
  halfcheetah  RL-Zoo's tuned HalfCheetah PPO (agents/ppo-zoo-halfcheetah.yaml)
  hopper       SB3 defaults with observation + reward normalization (agents/ppo-sb3-normalized.yaml)
Both are scored by the deterministic return over 10 fresh evaluation episodes after training, with the
observation normalizer frozen. Runs alternate (ours, SB3) per seed; each finished run is appended to
``--out`` (JSON lines) at once, so a long benchmark that is cut short keeps what it measured.

    python benchmarks/learning.py --setting halfcheetah --seeds 0 --steps 300000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

SETTINGS = {
    "halfcheetah": ("halfcheetah", "ppo-zoo-halfcheetah", "HalfCheetah-v5"),
    "hopper": ("hopper", "ppo-sb3-normalized", "Hopper-v5"),
}


def ours(setting: str, steps: int, seed: int) -> dict:
    from rl_align.runs import resolve_config
    from rl_align.train import train

    env, agent, _ = SETTINGS[setting]
    cfg = resolve_config(env, agent, ["run.progress=false", "run.out_dir=runs/bench-learning"], steps=steps, seed=seed)
    t = time.perf_counter()
    folder, summary = train(cfg, quiet=True)
    return {"return_det": summary["final"]["eval/return_det"], "return_stoch": summary["final"]["eval/return_stoch"],
            "cost_det": summary["final"]["eval/cost_det"], "wall_s": time.perf_counter() - t, "folder": str(folder)}


def sb3(setting: str, steps: int, seed: int) -> dict:
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from rl_align.config import load_preset

    _, agent, task = SETTINGS[setting]
    _, p = load_preset("agents", agent)
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[p.get("activation", "tanh")]
    policy_kwargs = {"activation_fn": act, "net_arch": {"pi": list(p["hidden"]), "vf": list(p["hidden"])},
                     "log_std_init": p.get("log_std_init", 0.0), "ortho_init": p.get("ortho_init", True)}
    venv = VecNormalize(DummyVecEnv([lambda: gym.make(task)]), norm_obs=True, norm_reward=p.get("normalize_reward", False), gamma=p["gamma"])
    model = PPO("MlpPolicy", venv, n_steps=p["n_steps"], batch_size=p["minibatch"], n_epochs=p["epochs"], learning_rate=p["lr"],
                gamma=p["gamma"], gae_lambda=p["gae_lambda"], clip_range=p["clip"], ent_coef=p.get("ent_coef", 0.0),
                vf_coef=p.get("vf_coef", 0.5), max_grad_norm=p.get("max_grad_norm", 0.5), policy_kwargs=policy_kwargs,
                seed=seed, device="cpu", verbose=0)
    t = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t
    venv.training = False
    returns = []
    for ep in range(10):  # deterministic episodes on a fresh env, normalizer frozen
        env = gym.make(task)
        obs, _ = env.reset(seed=seed + 100_000 + ep)
        done, ret = False, 0.0
        while not done:
            action, _ = model.predict(venv.normalize_obs(obs[None]), deterministic=True)
            obs, r, term, trunc, _ = env.step(action[0])
            ret += float(r)
            done = term or trunc
        returns.append(ret)
        env.close()
    return {"return_det": float(np.mean(returns)), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="halfcheetah")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--out", default="benchmarks/learning.jsonl")
    args = p.parse_args()
    torch.set_num_threads(1)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, fn in (("rl-align", ours), ("sb3", sb3)):
            res = {"setting": args.setting, "impl": name, "seed": seed, "steps": args.steps, **fn(args.setting, args.steps, seed)}
            torch.set_num_threads(1)
            print(json.dumps(res), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
