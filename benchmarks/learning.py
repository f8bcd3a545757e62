"""Learning: rl-align PPO vs stable-baselines3 PPO with the same hyperparameters, same env, same seeds.

Two matched settings (the preset carries ours; SB3 gets the same numbers here):
  halfcheetah  RL-Zoo's tuned HalfCheetah PPO (agents/ppo-zoo-halfcheetah.yaml)
  hopper       SB3 defaults with observation + reward normalization (agents/ppo-sb3-normalized.yaml)
Both are scored by the deterministic return over 10 fresh evaluation episodes after training, with the
observation normalizer frozen. Runs alternate (ours, SB3) per seed; each finished run is appended to
``--out`` (JSON lines) at once, so a long benchmark that is cut short keeps what it measured.

    python benchmarks/learning.py --setting halfcheetah --seeds 0 --steps 300000
    python benchmarks/learning.py --table      # IQM [bootstrap CI] · mean ± std and P(rl-align > SB3) from --out
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


def table(rows: list[dict]) -> None:
    """Per setting: each implementation's final return as IQM [95% bootstrap CI] · mean ± sample std (n)
    (``rl_align.stats``) and the probability that rl-align's run beats SB3's (ties 1/2)."""
    from rl_align.stats import fmt, prob_improvement, prob_improvement_ci, summarize

    print("| setting | steps | rl-align return (det) | SB3 return (det) | P(rl-align > SB3) [95% CI] | rl-align wall (s) | SB3 wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for setting, steps in dict.fromkeys((r["setting"], r["steps"]) for r in rows):
        g = {impl: [r for r in rows if r["setting"] == setting and r["steps"] == steps and r["impl"] == impl] for impl in ("rl-align", "sb3")}
        ours_ret, sb3_ret = ([r["return_det"] for r in g[i]] for i in ("rl-align", "sb3"))
        lo, hi = prob_improvement_ci(ours_ret, sb3_ret)
        p = f"{prob_improvement(ours_ret, sb3_ret):.2f} [{lo:.2f}, {hi:.2f}]" if ours_ret and sb3_ret else "n/a"
        print(f"| {setting} | {steps:,} | {fmt(summarize(ours_ret))} | {fmt(summarize(sb3_ret))} | {p} | "
              f"{np.mean([r['wall_s'] for r in g['rl-align']]):.0f} | {np.mean([r['wall_s'] for r in g['sb3']]):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="halfcheetah")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--out", default="benchmarks/learning.jsonl")
    p.add_argument("--table", action="store_true", help="only print the table from --out")
    args = p.parse_args()
    if args.table:
        return table([json.loads(line) for line in open(args.out)])
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
