"""``rl-align tournament <run folders...>``: the row-vs-column win-rate matrix of final policies.

Each run's final policy (``checkpoints/last.pt``) plays the same fresh env seeds (and, with
``--stochastic``, the same action-noise seed); its episodes are cut into ``H``-step windows matched by
episode and position. Cell ``W[i, j]`` is the mean oracle preference ``P(segment of i > segment of j)``
over the matched windows (no label noise, no query budget; a tie counts 1/2 by construction of P), with
a 95% t-interval over episodes (windows of one episode are correlated, so the episode is the unit).
Because ``P(a, b) = 1 - P(b, a)`` and the matching is symmetric, ``W + W^T = 1`` and ``W[i, i] = 1/2``.
Each player's KL to the reference its run started from (``KL(pi || pi_ref^1)`` per state, averaged over
the states of its own tournament episodes; COMAL's moving reference is not it) is reported beside its row,
so a win can be read against how far the policy drifted; players without a reference show none.
Output: ``tournament.csv`` (the matrix, the row average over the other columns, the paper's Table 2
layout, and the KL), ``tournament_cells.csv`` (one row per cell with its interval), ``tournament.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rl_align.errors import UserError


@dataclass
class TournamentResult:
    names: list[str]
    win: np.ndarray  # [K, K] W[i, j] = P(row i beats column j)
    half_width: np.ndarray  # [K, K] 95% interval half-width (nan with one episode)
    n_pairs: np.ndarray  # [K, K] matched segment pairs per cell
    kl_init_ref: np.ndarray | None = None  # [K] KL(pi || initial reference) per state on the player's episodes (nan: none)
    per_episode: np.ndarray | None = None  # [K, K, episodes] cell value per episode (the unit of the intervals)

    def row_average(self) -> np.ndarray:
        """Mean win rate of each row over the other columns ``[K]`` (diagonal left out)."""
        K = len(self.names)
        off = ~np.eye(K, dtype=bool)
        return np.array([self.win[i][off[i]].mean() if K > 1 else 0.5 for i in range(K)])


def load_policies(folders: list[str | Path]) -> list[tuple[str, object, object]]:
    """``(name, run config, agent with its final weights)`` per folder; one-line errors for bad folders."""
    from rl_align.evaluation import load_agent

    out, seen = [], {}
    for folder in map(Path, folders):
        if not folder.exists():
            raise UserError(f"run folder {folder} does not exist; give folders written by rl-align train")
        if not (folder / "checkpoints" / "last.pt").exists() and (folder / "config.yaml").exists():
            raise UserError(f"{folder} has no checkpoints/last.pt; finish (or --resume) that run first")
        cfg, agent = load_agent(folder)
        name = f"{cfg.agent_name}-s{cfg.run.seed}"
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", cfg, agent))
    return out


def kl_to_initial_reference(agent, raw_obs: np.ndarray) -> float:
    """Mean per-state ``KL(pi || pi_ref^1)`` over raw states ``[B, obs_dim]`` against ``agent.reference()``
    (COMAL's initial reference, a fixed-reference agent's pi_ref); nan for an agent without one (PPO)."""
    import torch

    from rl_align.nets import policy_kl

    ref = agent.reference()
    if ref is None:
        return float("nan")
    return policy_kl(agent.policy, ref, torch.as_tensor(agent.normalize(raw_obs), device=agent.device))


def oracle_env(preset: str | None, first_env):
    """The env config whose task and oracle judge the tournament: a named env preset, else the first run's."""
    from rl_align.config import build, load_preset
    from rl_align.envs import EnvConfig

    if preset is None:
        return first_env
    found = load_preset("envs", preset)
    if found is None:
        raise UserError(f"unknown env preset {preset!r} for --oracle; see rl-align list")
    return build(EnvConfig, dict(found[1]), "env")


def tournament(folders: list[str | Path], oracle: str | None = None, episodes: int = 8, segment_len: int = 50,
               deterministic: bool = True, seed: int = 500_000) -> TournamentResult:
    """Play every final policy against every other on matched segments; see the module docstring."""
    from rl_align.envs import Oracle
    from rl_align.evaluation import matched_preferences, rollout_segments

    if len(folders) < 2:
        raise UserError("a tournament needs at least two run folders")
    if episodes < 1 or segment_len < 1:
        raise UserError(f"--episodes and --segment-len must be >= 1, got {episodes} and {segment_len}")
    players = load_policies(folders)
    env_cfg = oracle_env(oracle, players[0][1].env)
    for name, cfg, _ in players:
        if cfg.env.task != env_cfg.task:
            raise UserError(f"{name} was trained on {cfg.env.task} but the tournament plays {env_cfg.task}; compare runs of one task")
    judge = Oracle(dataclasses.replace(env_cfg.oracle, budget=None), seed=seed)
    segs = []
    for _, _, agent in players:
        agent.act_rng = np.random.default_rng(seed + 1)  # common action noise for --stochastic
        segs.append(rollout_segments(agent, env_cfg, episodes, segment_len, seed, deterministic))
    K = len(players)
    kl_init = np.array([kl_to_initial_reference(agent, np.concatenate([w["obs"] for w in s.values()])) for (_, _, agent), s in zip(players, segs)])
    win, half, n = np.full((K, K), np.nan), np.full((K, K), np.nan), np.zeros((K, K), int)
    per_ep_all = np.full((K, K, episodes), np.nan)
    for i in range(K):
        for j in range(K):
            p, episode = matched_preferences(segs[i], segs[j], judge)  # P(s_i > s_j) per matched window
            if not len(p):
                continue
            per_ep = np.array([p[episode == e].mean() for e in np.unique(episode)])  # episode = independent unit
            win[i, j], n[i, j] = p.mean(), len(p)
            per_ep_all[i, j, np.unique(episode)] = per_ep
            half[i, j] = _t_half_width(per_ep)
    if np.isnan(win).any():
        raise UserError(f"some policies left no complete {segment_len}-step window (episodes ended early); lower --segment-len")
    return TournamentResult([p[0] for p in players], win, half, n, kl_init, per_ep_all)


def _t_half_width(x: np.ndarray) -> float:
    """95% Student-t half-width of the mean of ``x`` (nan for one sample)."""
    from scipy import stats

    if len(x) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def write_outputs(res: TournamentResult, out: Path) -> list[Path]:
    """``tournament.csv``, ``tournament_cells.csv`` and ``tournament.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    avg = res.row_average()
    with (out / "tournament.csv").open("w", newline="") as f:
        w = csv.writer(f)
        kl = res.kl_init_ref if res.kl_init_ref is not None else np.full(len(res.names), np.nan)
        w.writerow(["row_vs_column", *res.names, "row_average", "kl_to_initial_ref"])
        for i, name in enumerate(res.names):
            w.writerow([name, *(f"{x:.4f}" for x in res.win[i]), f"{avg[i]:.4f}", "" if np.isnan(kl[i]) else f"{kl[i]:.4f}"])
    with (out / "tournament_cells.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "column", "win_rate", "ci95_low", "ci95_high", "segment_pairs"])
        for i, a in enumerate(res.names):
            for j, b in enumerate(res.names):
                w.writerow([a, b, f"{res.win[i, j]:.4f}", f"{res.win[i, j] - res.half_width[i, j]:.4f}",
                            f"{res.win[i, j] + res.half_width[i, j]:.4f}", int(res.n_pairs[i, j])])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(res.names)
    table = np.concatenate([res.win, avg[:, None]], axis=1)
    fig, ax = plt.subplots(figsize=(1.3 * (K + 1) + 2, 0.8 * K + 1.5))
    im = ax.imshow(table, cmap="RdBu", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K + 1):
            hw = res.half_width[i, j] if j < K and i != j else np.nan
            ax.text(j, i, f"{100 * table[i, j]:.1f}" + ("" if np.isnan(hw) else f"\n±{100 * hw:.1f}"), ha="center", va="center", fontsize=8)
    ax.axvline(K - 0.5, color="k", lw=1.5)
    ax.set_xticks(range(K + 1), [*res.names, "row avg"], rotation=30, ha="right")
    ax.set_yticks(range(K), res.names)
    ax.set_title("win rate (%) of row over column, 95% CI over episodes")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(out / "tournament.png", dpi=120)
    plt.close(fig)
    return [out / "tournament.csv", out / "tournament_cells.csv", out / "tournament.png"]


def print_table(res: TournamentResult) -> None:
    width = max(12, *(len(n) for n in res.names)) + 1
    kl = res.kl_init_ref if res.kl_init_ref is not None else np.full(len(res.names), np.nan)
    print(f"{'row > column':<{width}}" + "".join(f"{n[:width - 1]:>{width}}" for n in res.names) + f"{'row avg':>{width}}{'KL to ref':>{width}}")
    for i, name in enumerate(res.names):
        cells = "".join(f"{100 * res.win[i, j]:>{width - 1}.1f}%" for j in range(len(res.names)))
        print(f"{name:<{width}}{cells}{100 * res.row_average()[i]:>{width - 1}.1f}%" + (f"{'-':>{width}}" if np.isnan(kl[i]) else f"{kl[i]:>{width}.3f}"))


def _tournament(args: argparse.Namespace) -> int:
    res = tournament(args.folders, args.oracle, args.episodes, args.segment_len, not args.stochastic, args.seed)
    print_table(res)
    out = Path(args.out) if args.out else Path(args.folders[0]).parent / "tournament"
    for p in write_outputs(res, out):
        print(f"  wrote {p}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tournament", help="win-rate matrix of final policies under a preference oracle",
                       description="Every run's final policy plays every other on matched segments of the same env seeds; "
                                   "cell (i, j) is the win rate of row i over column j under the oracle, with a 95%% CI; "
                                   "writes a CSV (with the row average) and a heatmap PNG.")
    p.add_argument("folders", nargs="+", help="run folders written by rl-align train (two or more)")
    p.add_argument("--oracle", default=None, metavar="ENV_PRESET", help="env preset whose oracle judges (default: the first run's env)")
    p.add_argument("--episodes", type=int, default=8, help="fresh episodes per policy (default 8)")
    p.add_argument("--segment-len", type=int, default=50, help="steps per compared segment (default 50)")
    p.add_argument("--stochastic", action="store_true", help="sample actions (common noise seed) instead of the mean action")
    p.add_argument("--seed", type=int, default=500_000, help="first env seed (default 500000, unseen in training)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <first folder>/../tournament)")
    p.set_defaults(func=_tournament)
