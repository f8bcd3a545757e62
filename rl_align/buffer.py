"""The shared rollout buffer: every agent collects into it; GAE, segments and pairs live here once.

Arrays are ``[T, N, ...]`` (time, env). Vector envs reset in the same step an episode ends
(``rl_align.envs.VecEnv``), so ``obs[t + 1]`` starts a new episode when ``done[t]``; the value of the
observation that ended a *truncated* episode is kept in ``final_values[t]`` for bootstrapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    last_values: np.ndarray,
    final_values: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation over ``[T, N]`` arrays; returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_next_t * (1 - terminated_t) - V(s_t)`` where ``V_next_t`` is
    ``V(s_{t+1})`` inside an episode, ``V(final obs)`` on truncation and ``last_values`` after the last
    step; ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}`` (Schulman et al. 2016, eq. 16).
    """
    T = rewards.shape[0]
    next_values = np.concatenate([values[1:], last_values[None]], axis=0)
    next_values = np.where(truncated, final_values, next_values)
    not_term = 1.0 - terminated.astype(np.float64)
    not_done = 1.0 - (terminated | truncated).astype(np.float64)
    deltas = rewards + gamma * next_values * not_term - values
    advantages = np.zeros_like(deltas)
    running = np.zeros_like(deltas[0])
    for t in reversed(range(T)):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


@dataclass
class Segments:
    """``M`` windows of ``H`` steps, each inside one episode. ``rewards`` is for oracles only.

    A window that ends with a terminated episode (a fall) may hold fewer than ``H`` real steps; it is
    padded with an absorbing state: ``mask`` is False on the padding, where reward, cost, features and
    log-probs are 0 (so every segment sum, the oracle's score included, counts only what happened)."""

    env: np.ndarray  # [M] env index
    start: np.ndarray  # [M] first time index
    obs: np.ndarray  # [M, H, obs_dim] (normalized as the agent saw them)
    actions: np.ndarray  # [M, H, act_dim]
    logp: np.ndarray  # [M, H] behaviour log-probs
    rewards: np.ndarray  # [M, H] true reward: the oracle's, never an agent's
    costs: np.ndarray  # [M, H]
    features: np.ndarray  # [M, H, 3]
    mask: np.ndarray  # [M, H] bool: True on real steps, False on the absorbing padding after a fall
    raw_obs: np.ndarray  # [M, H, obs_dim] before normalization (padding repeats the last real state, as obs does)

    def __len__(self) -> int:
        return len(self.env)

    def take(self, idx: np.ndarray) -> "Segments":
        return Segments(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @classmethod
    def of(cls, actions: np.ndarray, rewards: np.ndarray, features: np.ndarray, obs: np.ndarray | None = None,
           raw_obs: np.ndarray | None = None, mask: np.ndarray | None = None, **fields: np.ndarray) -> "Segments":
        """Segments from what a caller has (an evaluation rollout's windows, a label store's pairs), every
        documented field present, so an oracle score sees one type everywhere: ``mask`` all True unless given
        (windows that end before termination), ``obs`` / ``raw_obs`` each other where only one is known,
        ``costs`` / ``logp`` zeros, ``env`` / ``start`` -1 (unknown)."""
        M, H = np.shape(rewards)[:2]
        obs = raw_obs if obs is None else obs
        out = {"env": np.full(M, -1), "start": np.full(M, -1), "obs": obs, "raw_obs": obs if raw_obs is None else raw_obs,
               "actions": actions, "rewards": rewards, "features": features, "costs": np.zeros((M, H)), "logp": np.zeros((M, H)),
               "mask": np.ones((M, H), bool) if mask is None else np.asarray(mask, bool)}
        out.update({k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
        return cls(**{f: out[f] for f in cls.__dataclass_fields__})


class RolloutBuffer:
    """Fixed-size ``[T, N]`` storage of one rollout, for every agent."""

    def __init__(self, n_steps: int, n_envs: int, obs_dim: int, act_dim: int) -> None:
        self.T, self.N = n_steps, n_envs
        self.obs = np.zeros((n_steps, n_envs, obs_dim), np.float32)
        self.raw_obs = np.zeros((n_steps, n_envs, obs_dim), np.float32)
        self.actions = np.zeros((n_steps, n_envs, act_dim), np.float32)
        self.logp = np.zeros((n_steps, n_envs), np.float32)
        self.rewards = np.zeros((n_steps, n_envs))
        self.costs = np.zeros((n_steps, n_envs))
        self.features = np.zeros((n_steps, n_envs, 3), np.float32)
        self.terminated = np.zeros((n_steps, n_envs), bool)
        self.truncated = np.zeros((n_steps, n_envs), bool)
        self.values = np.zeros((n_steps, n_envs))
        self.cost_values = np.zeros((n_steps, n_envs))
        self.final_values = np.zeros((n_steps, n_envs))
        self.final_cost_values = np.zeros((n_steps, n_envs))
        self.last_values = np.zeros(n_envs)
        self.last_cost_values = np.zeros(n_envs)
        self.last_obs = np.zeros((n_envs, obs_dim), np.float32)  # normalized obs after the last step
        self.advantages = np.zeros((n_steps, n_envs))
        self.returns = np.zeros((n_steps, n_envs))
        self.cost_advantages = np.zeros((n_steps, n_envs))
        self.cost_returns = np.zeros((n_steps, n_envs))

    @property
    def done(self) -> np.ndarray:
        return self.terminated | self.truncated

    def compute_gae(self, gamma: float, lam: float, rewards: np.ndarray | None = None) -> None:
        """Reward and cost advantages in place. ``rewards`` overrides the stored ones (a learned or
        normalized reward); costs always use the stored ``costs``."""
        r = self.rewards if rewards is None else rewards
        args = (self.terminated, self.truncated, gamma, lam)
        self.advantages, self.returns = gae(r, self.values, self.last_values, self.final_values, *args)
        self.cost_advantages, self.cost_returns = gae(
            self.costs, self.cost_values, self.last_cost_values, self.final_cost_values, *args
        )

    def flat(self, device: torch.device | str = "cpu", **extra: np.ndarray) -> dict[str, torch.Tensor]:
        """All ``T * N`` steps as tensors for minibatch updates (plus any ``[T, N, ...]`` arrays given)."""
        fields = dict(
            obs=self.obs, actions=self.actions, logp=self.logp, advantages=self.advantages, returns=self.returns,
            values=self.values, cost_advantages=self.cost_advantages, cost_returns=self.cost_returns,
            cost_values=self.cost_values, **extra,
        )
        return {
            k: torch.as_tensor(v.reshape((self.T * self.N,) + v.shape[2:]), dtype=torch.float32, device=device)
            for k, v in fields.items()
        }

    def segments(self, H: int, aligned: bool = False) -> Segments:
        """Non-overlapping windows of ``H`` steps that never cross an episode boundary.

        Windows tile each episode piece from its first step in the buffer and may end on the step that
        ends an episode, never after it. The remainder of a *terminated* episode (the steps up to a
        fall) becomes one more window, padded to ``H`` with the absorbing state (``Segments.mask``), so
        the oracle sees falls; the remainder before a truncation or the rollout's end is dropped (the
        episode goes on, and its steps are judged in the next rollout's windows).

        ``aligned``: the windows are the fixed ``[kH, (k + 1) H)`` of every env instead (the windows
        ``shared_start`` branches at); one cut short by a fall is padded, one cut by a truncation, or
        starting after a reset inside it, is dropped."""
        if H < 1 or H > self.T:
            raise ValueError(f"segment length {H} must be in [1, n_steps={self.T}]")
        envs, starts, lengths = [], [], []
        done = self.done
        for n in range(self.N):
            if aligned:
                for s in range(0, self.T - H + 1, H):
                    ends = np.flatnonzero(done[s : s + H, n])
                    if len(ends) == 0 or ends[0] == H - 1 or self.terminated[s + ends[0], n]:
                        envs.append(n), starts.append(s), lengths.append(H if len(ends) == 0 else int(ends[0]) + 1)
                continue
            piece_start = 0
            for end in list(np.flatnonzero(done[:, n])) + [self.T - 1]:
                full = max(0, end - piece_start + 1) // H
                envs += [n] * full
                starts += list(range(piece_start, piece_start + full * H, H))
                lengths += [H] * full
                rest = piece_start + full * H
                if rest <= end and self.terminated[end, n]:  # a fall inside the last partial window
                    envs.append(n), starts.append(rest), lengths.append(end - rest + 1)
                piece_start = end + 1
        env = np.asarray(envs, dtype=np.int64)
        start = np.asarray(starts, dtype=np.int64)
        length = np.asarray(lengths, dtype=np.int64)
        t_idx = start[:, None] + np.minimum(np.arange(H)[None, :], length[:, None] - 1)  # padding repeats the last real state
        mask = np.arange(H)[None, :] < length[:, None]  # [M, H]
        n_idx = env[:, None]
        zero = lambda a: np.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, 0).astype(a.dtype)  # noqa: E731
        return Segments(
            env, start, self.obs[t_idx, n_idx], self.actions[t_idx, n_idx], zero(self.logp[t_idx, n_idx]),
            zero(self.rewards[t_idx, n_idx]), zero(self.costs[t_idx, n_idx]), zero(self.features[t_idx, n_idx]), mask,
            self.raw_obs[t_idx, n_idx],
        )

    @staticmethod
    def pairs(n_segments: int, max_pairs: int | None, rng: np.random.Generator, key: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Index pairs ``(i, j)``, ``i != j``: all ``M (M - 1) / 2`` pairs (only those with equal ``key[i] ==
        key[j]`` when a key per segment is given), or a random subset of ``max_pairs`` of them; the order
        inside a pair is randomized."""
        i, j = np.triu_indices(n_segments, k=1)
        if key is not None:
            same = key[i] == key[j]
            i, j = i[same], j[same]
        if max_pairs is not None and max_pairs < len(i):
            keep = rng.choice(len(i), size=max_pairs, replace=False)
            i, j = i[keep], j[keep]
        swap = rng.random(len(i)) < 0.5
        return np.where(swap, j, i), np.where(swap, i, j)


class ReplayBuffer:
    """The off-policy agents' store of every transition, a ring of ``[C, N]`` (time, env) slots.

    ``rewards`` is the true reward, read only by oracles (through :meth:`segments`), by SAC on the true
    reward and by the logged diagnostic :meth:`reward_corr` (never trained on); ``learned`` is the column a
    preference agent trains on (``relabel`` rewrites all of it).
    Observations are stored raw (the agent normalizes at sample time, if it normalizes) with the
    observation each step led to (``next_obs``: the ending one where an episode ended). Windows of
    :meth:`segments` lie inside one episode (the last step of a window may end it)."""

    FIELDS = ("obs", "next_obs", "actions", "rewards", "learned", "costs", "features", "terminated", "truncated")

    def __init__(self, capacity: int, n_envs: int, obs_dim: int, act_dim: int) -> None:
        self.C, self.N = max(1, -(-capacity // n_envs)), n_envs
        C, N = self.C, n_envs
        self.obs = np.zeros((C, N, obs_dim), np.float32)
        self.next_obs = np.zeros((C, N, obs_dim), np.float32)
        self.actions = np.zeros((C, N, act_dim), np.float32)  # the policy's action in [-1, 1] (before scaling to the bounds)
        self.rewards = np.zeros((C, N))  # true reward: the oracle's
        self.learned = np.zeros((C, N), np.float32)  # the learned reward (PEBBLE family) or the intrinsic one
        self.costs = np.zeros((C, N))
        self.features = np.zeros((C, N, 3), np.float32)
        self.terminated = np.zeros((C, N), bool)
        self.truncated = np.zeros((C, N), bool)
        self.pos, self.size = 0, 0  # next slot to write; filled slots

    def __len__(self) -> int:
        return self.size * self.N

    def add(self, obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, costs: np.ndarray,
            features: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, learned: np.ndarray | float = 0.0) -> None:
        """One vector step, each argument ``[N, ...]``."""
        t = self.pos
        self.obs[t], self.next_obs[t], self.actions[t] = obs, next_obs, actions
        self.rewards[t], self.costs[t], self.features[t], self.learned[t] = rewards, costs, features, learned
        self.terminated[t], self.truncated[t] = terminated, truncated
        self.pos = (t + 1) % self.C
        self.size = min(self.size + 1, self.C)

    def sample_index(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``batch`` uniform ``(t, n)`` slots among the filled ones."""
        k = rng.integers(0, self.size * self.N, size=batch)
        return k // self.N, k % self.N

    def recent_index(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Every ``(t, n)`` slot of the last ``max(1, batch // N)`` vector steps: the newest transitions."""
        t = self._last(max(1, batch // self.N))
        return np.repeat(t, self.N), np.tile(np.arange(self.N), len(t))

    def _last(self, steps: int) -> np.ndarray:
        """Slots of the last ``min(steps, size)`` vector steps, oldest first."""
        k = min(steps, self.size)
        return (self.pos - k + np.arange(k)) % self.C

    def recent(self, steps: int) -> np.ndarray:
        """Observations of the last ``steps`` vector steps, ``[min(steps, size) * N, obs_dim]``."""
        return self.obs[self._last(steps)].reshape(-1, self.obs.shape[-1])

    def reward_corr(self, steps: int) -> float:
        """Pearson correlation of the learned and the true reward over the last ``steps`` vector steps: how
        well the reward the agent trains on ranks what it does now (nan while either is constant)."""
        idx = self._last(steps)
        learned, true = self.learned[idx].ravel().astype(np.float64), self.rewards[idx].ravel()
        if len(idx) < 2 or learned.std() == 0 or true.std() == 0:
            return float("nan")
        return float(np.corrcoef(learned, true)[0, 1])

    def segments(self, M: int, H: int, rng: np.random.Generator, window: int | None = None) -> Segments | None:
        """``M`` random windows of ``H`` consecutive steps of one env inside one episode, drawn from the last
        ``window`` vector steps (all when None); None when no such window exists yet."""
        k = min(self.size, window or self.size)
        if k < H:
            return None
        chron = self._last(k)  # slot of the i-th oldest step in the window
        done = (self.terminated | self.truncated)[chron]  # [k, N]
        # a start i is valid when steps i .. i + H - 2 end no episode (the window's last step may)
        ends = np.concatenate([np.zeros((1, self.N), int), np.cumsum(done, axis=0)])
        valid = (ends[np.arange(k - H + 1) + H - 1] - ends[np.arange(k - H + 1)]) == 0  # [k - H + 1, N]
        starts, envs = np.nonzero(valid)
        if len(starts) == 0:
            return None
        pick = rng.integers(0, len(starts), size=M)
        start, env = starts[pick], envs[pick]
        t_idx = chron[start[:, None] + np.arange(H)[None, :]]  # [M, H] slots
        n_idx = env[:, None]
        mask = np.ones((M, H), bool)
        return Segments(env, t_idx[:, 0], self.obs[t_idx, n_idx], self.actions[t_idx, n_idx], np.zeros((M, H), np.float32),
                        self.rewards[t_idx, n_idx], self.costs[t_idx, n_idx], self.features[t_idx, n_idx], mask,
                        self.obs[t_idx, n_idx])

    def relabel(self, reward_fn, chunk: int = 8192) -> None:
        """``learned <- reward_fn(obs, actions)`` on every filled slot, ``chunk`` steps at a time."""
        obs = self.obs[: self.size].reshape(-1, self.obs.shape[-1])
        act = self.actions[: self.size].reshape(-1, self.actions.shape[-1])
        out = self.learned[: self.size].reshape(-1)
        for s in range(0, len(obs), chunk):
            out[s : s + chunk] = reward_fn(obs[s : s + chunk], act[s : s + chunk])

    def state_dict(self) -> dict:
        """The filled slots only (a checkpoint early in a run stays small)."""
        return {"pos": self.pos, "size": self.size, **{f: torch.from_numpy(np.ascontiguousarray(getattr(self, f)[: self.size])) for f in self.FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = int(state["pos"]), int(state["size"])
        for f in self.FIELDS:
            getattr(self, f)[: self.size] = state[f].numpy()
