"""The PEBBLE reward pipeline (Lee et al. 2021; B-Pref): what turns a few hundred preference labels into
the reward SAC learns from. See docs/design.md, "Off-policy preference learning".

- :class:`RewardEnsemble`: ``K`` MLPs ``r_psi_k(s, a)`` (tanh output, as in B-Pref), each fitted with the
  Bradley-Terry loss on segment sums ``R_k(s) = sum_t r_psi_k(s_t, a_t)`` over every label so far (each
  member its own shuffle of them); the reward is the ensemble mean.
- :func:`select_queries`: from a pool of candidate pairs drawn from the replay buffer, the
  ``uniform`` ones, or those of largest ``disagreement`` (std over members of ``P_k(s1 > s2)``) or largest
  ``entropy`` of the mean ``P``.
- :func:`state_entropy`: PEBBLE's intrinsic reward for unsupervised pre-training, the distance from a
  state to its k-th nearest neighbour among stored states (a particle estimate of state entropy).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rl_align.agents.preferences import pair_accuracy
from rl_align.buffer import Segments
from rl_align.nets import Ensemble, RunningMeanStd


class RewardEnsemble(torch.nn.Module):
    """``r_hat(s, a) = (1/K) sum_k r_psi_k(s, a)``, each member in ``[-1, 1]`` (``output="tanh"``, B-Pref's)
    or unbounded (``"linear"``), and the labelled pairs it fits."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], members: int, lr: float, output: str = "tanh") -> None:
        super().__init__()
        self.net = Ensemble(members, obs_dim + act_dim, 1, hidden, "relu", out_activation="tanh" if output == "tanh" else None)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.pairs: dict[str, torch.Tensor] = {}  # obs1, act1, mask1, obs2, act2, mask2 [P, H, .] and label [P]

    def members(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Per-member reward ``[K, ...]`` for ``obs [..., obs_dim]``, ``act [..., act_dim]``."""
        x = torch.cat([obs, act], -1)
        return self.net(x.reshape(-1, x.shape[-1])).reshape((self.net.members,) + x.shape[:-1])

    @torch.no_grad()
    def predict(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """The ensemble-mean reward ``[B]`` of NumPy ``obs [B, obs_dim]``, ``act [B, act_dim]``."""
        return self.members(self._tensor(obs), self._tensor(act)).mean(0).cpu().numpy()

    def segment_returns(self, s: Segments) -> torch.Tensor:
        """``R_k(s) = sum_t r_psi_k(s_t, a_t)`` over each segment's real steps (not the padding after a fall), ``[K, M]``."""
        return (self.members(self._tensor(s.obs), self._tensor(s.actions)) * self._tensor(s.mask, torch.float32)).sum(-1)

    @torch.no_grad()
    def pair_probs(self, s1: Segments, s2: Segments) -> torch.Tensor:
        """``P_k(s1 > s2) = sigmoid(R_k(s1) - R_k(s2))`` per member, ``[K, M]``."""
        return torch.sigmoid(self.segment_returns(s1) - self.segment_returns(s2))

    def add(self, s1: Segments, s2: Segments, labels: np.ndarray) -> None:
        """Keep labelled pairs (skipped ones, ``nan``, carry nothing; ties stay as targets of 1/2)."""
        keep = np.isfinite(labels)
        new = {"obs1": s1.obs[keep], "act1": s1.actions[keep], "mask1": s1.mask[keep].astype(np.float32),
               "obs2": s2.obs[keep], "act2": s2.actions[keep], "mask2": s2.mask[keep].astype(np.float32),
               "label": labels[keep].astype(np.float32)}
        for k, v in new.items():
            v = self._tensor(v)
            self.pairs[k] = torch.cat([self.pairs[k], v]) if k in self.pairs else v

    def _tensor(self, x: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """NumPy in, on the ensemble's device (its pairs are kept there too)."""
        return torch.as_tensor(x, dtype=dtype, device=next(self.net.parameters()).device)

    def n_labels(self) -> int:
        return len(self.pairs["label"]) if self.pairs else 0

    @torch.no_grad()
    def accuracy(self, s1: Segments, s2: Segments, labels: np.ndarray) -> float:
        """Share of decided labels whose preferred segment the ensemble-mean return ranks higher."""
        keep = np.isfinite(labels)
        if not keep.any():
            return float("nan")
        R1, R2 = self.segment_returns(s1.take(keep)).mean(0), self.segment_returns(s2.take(keep)).mean(0)
        return pair_accuracy(R1, R2, self._tensor(labels[keep], torch.float32))

    def fit(self, max_epochs: int, batch: int, stop_accuracy: float, rng: np.random.Generator) -> dict[str, float]:
        """Bradley-Terry cross-entropy on every stored pair, ``-[y log P_k + (1 - y) log(1 - P_k)]`` summed over
        members, each member on its own shuffle; epochs until the train accuracy reaches ``stop_accuracy``
        (B-Pref's rule) or ``max_epochs``. The accuracy counts decided labels only, as ``pair_accuracy`` does:
        a tie (target 1/2) has no right order, and counting it would hold the accuracy under the stop on a
        task with many ties (cheetah-run's deterministic teacher gives 11% ties early; B-Pref's oracle
        teacher gives none, labelling an exact tie a preference for the first segment). Returns the last
        epoch's loss and accuracy and the epochs run."""
        p, K = self.pairs, self.net.members
        n = self.n_labels()
        decided = max(int((p["label"] != 0.5).sum()), 1)
        loss_sum, correct, epochs = 0.0, 0.0, 0
        for epochs in range(1, max_epochs + 1):
            perms = np.stack([rng.permutation(n) for _ in range(K)])  # [K, n]
            loss_sum, correct = 0.0, 0.0
            for s in range(0, n, batch):
                idx = self._tensor(perms[:, s : s + batch])  # [K, b]
                R1 = self._member_returns(p["obs1"][idx], p["act1"][idx], p["mask1"][idx])  # [K, b]
                R2 = self._member_returns(p["obs2"][idx], p["act2"][idx], p["mask2"][idx])
                y = p["label"][idx]
                loss = F.binary_cross_entropy_with_logits(R1 - R2, y, reduction="none").mean(-1).sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += float(loss.detach()) * idx.shape[1] / K
                correct += float((((R1 - R2) > 0) == (y > 0.5))[y != 0.5].sum()) / K
            if correct / decided >= stop_accuracy:
                break
        return {"pebble/rm_loss": loss_sum / n, "pref/train_accuracy": correct / decided, "pebble/rm_epochs": float(epochs)}

    def _member_returns(self, obs: torch.Tensor, act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``R_k`` of member k on its own segments: ``obs [K, b, H, obs_dim]``, ``mask [K, b, H]`` -> ``[K, b]``."""
        K, b, H = obs.shape[:3]
        x = torch.cat([obs, act], -1).reshape(K, b * H, -1)
        return (self.net(x).reshape(K, b, H) * mask).sum(-1)

    def state_dict(self, *args, **kwargs) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "pairs": dict(self.pairs)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pairs = {k: self._tensor(v) for k, v in state["pairs"].items()}  # onto this device, wherever it was saved


def select_queries(model: RewardEnsemble, s1: Segments, s2: Segments, n: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``n`` candidate pairs to ask about: ``uniform`` (a random ``n``), ``disagreement``
    (largest std over members of ``P_k(s1 > s2)``) or ``entropy`` (largest entropy of the mean ``P``)."""
    if how == "uniform" or len(s1) <= n:
        return rng.permutation(len(s1))[:n]
    P = model.pair_probs(s1, s2)  # [K, M]
    if how == "disagreement":
        score = P.std(0)
    else:
        p = P.mean(0).clamp(1e-6, 1 - 1e-6)
        score = -(p * p.log() + (1 - p) * (1 - p).log())
    return torch.argsort(score, descending=True)[:n].cpu().numpy()


class StateEntropy:
    """PEBBLE's intrinsic reward ``r_int(s) = ||s - s^(k)||`` (the k-th nearest neighbour among stored
    states), divided by the running std of its estimates."""

    def __init__(self, k: int) -> None:
        self.k, self.rms = k, RunningMeanStd(())

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """``[B]`` for ``obs [B, d]`` against ``stored [S, d]`` (``obs`` drawn from ``stored``: its own zero
        distance is the nearest, hence the k+1-th smallest)."""
        dist = torch.cdist(obs, stored)
        r = dist.kthvalue(min(self.k + 1, dist.shape[1]), dim=1).values
        self.rms.update(r.cpu().numpy())
        return r / float(np.sqrt(self.rms.var + 1e-8))

    def state_dict(self) -> dict:
        return self.rms.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state)
