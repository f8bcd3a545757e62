"""Losses shared by several agents (bottom floor: torch only)."""

from __future__ import annotations

import torch


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip loss to *minimize*, ``-E[min(rho A, clip(rho) A)]``; also approx KL and clip fraction."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator (Schulman 2020)
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, approx_kl, clipfrac
