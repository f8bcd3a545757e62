"""The exceptions that end a command with one line and no traceback: ``UserError`` for mistakes a user can fix
(bad preset, bad value, unknown name), ``Interrupted`` for Ctrl-C / SIGTERM after a checkpoint, ``DiskFault``
for a disk that failed mid-run. Standard library only, so the CLI can catch them without importing torch."""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    """A problem in what the user asked for. The CLI prints its message on one line and exits 2."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM arrived: the current iteration was finished, a checkpoint written, logs flushed. With
    ``step`` None a second one arrived while the first was handled: stopped at once, the last checkpoint stands."""

    def __init__(self, signum: int, folder: Path | None, step: int | None) -> None:
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        name = signal.Signals(signum).name
        if step is not None:
            message = f"{name} at env step {step:,}: checkpoint written; continue with: rl-align train --resume {folder}"
        elif folder is None:
            message = f"{name} twice: stopped before the run folder was made; nothing to resume"
        elif not (Path(folder) / "checkpoints" / "last.pt").exists():
            message = f"{name} twice: stopped at once, before the first checkpoint of {folder}; start the run again"
        else:
            message = f"{name} twice: stopped at once; continue from the last checkpoint with: rl-align train --resume {folder}"
        super().__init__(message)


class DiskFault(Exception):
    """A disk fault during the run (a full disk, a read-only or failing one): one line naming the file and the
    OS error, after a checkpoint if one could still be written; the command exits 1."""

    exit_code = 1
