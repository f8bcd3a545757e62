"""Checkpoint and text-file I/O, atomic: a crash never leaves a half-written file (bottom floor)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rl_align.errors import UserError


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: str = "cpu") -> dict:
    """Load without executing pickled code (``weights_only=True``); a corrupt file is a UserError."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; give a run folder that has checkpoints/last.pt")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); resume from an intact run or delete it") from None
