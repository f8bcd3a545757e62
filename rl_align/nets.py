"""Networks every agent shares: observation normalizer, diagonal Gaussian policy, value MLP."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than the math here
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class RunningMeanStd:
    """Running mean and variance (parallel-variance update, Chan et al.), in NumPy: it runs every env
    step, where a torch op costs more than the arithmetic. Frozen when ``update`` is not called."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8) -> None:
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4
        self.clip, self.eps = clip, eps

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape((-1,) + self.mean.shape)
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean) / np.sqrt(self.var + self.eps), -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": torch.as_tensor(self.mean), "var": torch.as_tensor(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = state["mean"].double().numpy().copy(), state["var"].double().numpy().copy()
        self.count = float(state["count"])


def mlp(in_dim: int, out_dim: int, hidden: list[int], activation: str, out_gain: float, ortho: bool) -> nn.Sequential:
    layers, dims = [], [in_dim] + list(hidden)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(dims[-1], out_dim))
    if ortho:  # orthogonal init as in SB3 / CleanRL: sqrt(2) hidden, small policy head
        for layer in layers:
            if isinstance(layer, nn.Linear):
                gain = out_gain if layer is layers[-1] else math.sqrt(2)
                nn.init.orthogonal_(layer.weight, gain)
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class GaussianPolicy(nn.Module):
    """``pi(a|s) = N(mu_theta(s), diag(exp(log_std)^2))``, state-independent log-std."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], activation: str, log_std_init: float, ortho: bool = True) -> None:
        super().__init__()
        self.mean = mlp(obs_dim, act_dim, hidden, activation, 0.01, ortho)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mu = self.mean(obs)
        return torch.distributions.Normal(mu, self.log_std.exp().expand_as(mu))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi(a|s)`` summed over action dimensions, ``[B]``."""
        return self.dist(obs).log_prob(actions).sum(-1)


def gaussian_kl(mu_p: torch.Tensor, log_std_p: torch.Tensor, mu_q: torch.Tensor, log_std_q: torch.Tensor, std_part: bool = True) -> torch.Tensor:
    """Closed-form ``KL(N_p || N_q)`` of diagonal Gaussians, summed over action dims, ``[B]``:
    ``sum_i log(s_q/s_p) + (s_p^2 + (mu_p - mu_q)^2) / (2 s_q^2) - 1/2``. ``std_part=False`` keeps only
    the mean part ``sum_i (mu_p - mu_q)^2 / (2 s_q^2)``."""
    var_q = torch.exp(2 * log_std_q)
    mean_part = (mu_p - mu_q) ** 2 / (2 * var_q)
    if not std_part:
        return mean_part.sum(-1)
    var_p = torch.exp(2 * log_std_p)
    return (log_std_q - log_std_p + var_p / (2 * var_q) - 0.5 + mean_part).sum(-1)


@torch.no_grad()
def policy_kl(policy: GaussianPolicy, other: GaussianPolicy, obs: torch.Tensor) -> float:
    """``KL(policy || other)`` per state, averaged over normalized states ``obs``."""
    return float(gaussian_kl(policy.mean(obs), policy.log_std, other.mean(obs), other.log_std).mean())


def numpy_forward(seq: nn.Sequential):
    """A NumPy copy of an MLP's current weights as a function ``x [B, in] -> [B, out]``.

    Acting runs one small batch per env step, where a torch module call costs ~80 us and this ~10 us
    (measured here, 64x64). Take a fresh copy whenever the weights change (each rollout)."""
    layers = []
    for m in seq:
        if isinstance(m, nn.Linear):
            layers.append(("linear", m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()))
        elif isinstance(m, nn.Tanh):
            layers.append(("tanh", None, None))
        elif isinstance(m, nn.ReLU):
            layers.append(("relu", None, None))

    def forward(x: np.ndarray) -> np.ndarray:
        for kind, w, b in layers:
            if kind == "linear":
                x = x @ w + b
            elif kind == "tanh":
                x = np.tanh(x)
            else:
                x = np.maximum(x, 0.0)
        return x

    return forward


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, hidden: list[int], activation: str, ortho: bool = True) -> None:
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden, activation, 1.0, ortho)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)
