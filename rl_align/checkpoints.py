"""Checkpoint and text-file I/O, atomic: a crash, a full disk or a Ctrl-C never leaves a half-written file
or a temporary one (bottom floor)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import torch

from rl_align.errors import UserError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_HINT = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (or raise the quota)", errno.EROFS: "choose a writable folder",
         errno.EACCES: "choose a folder you may write", errno.EPERM: "choose a folder you may write"}


def disk_message(exc: OSError, path: Path | str | None = None) -> str:
    """One line for an OS error on a file: the path, the OS's own words, what to do."""
    where = exc.filename or path or "a file"
    return f"{where}: {exc.strerror or exc} [{errno.errorcode.get(exc.errno, exc.errno)}]; {_HINT.get(exc.errno, 'check the disk')}"


def _write_atomic(path: Path, data) -> None:
    """``data`` to a temporary file beside ``path``, then rename; on any failure the temporary file is removed
    and an OS error names the file it was writing."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(tmp)) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(Path(path), text.encode("utf-8"))


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to memory, then to a temporary file, then rename: a crash never leaves a half-written
    checkpoint, and a full disk is an ``OSError`` naming the file (``torch.save`` to a file reports it as
    ``unexpected pos``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_atomic(path, buf.getbuffer())


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
