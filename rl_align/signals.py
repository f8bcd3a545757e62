"""Deferred SIGINT / SIGTERM for long work that must stop at a safe boundary (a run's iteration, a sweep)."""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)  # the signals this module defers, and ignores once the command is exiting


class DeferredSignals:
    """While active (main thread only), SIGINT / SIGTERM set ``signum`` and call ``callback`` instead of
    killing the process; the owner checks ``signum`` at its next safe boundary. Without a callback a
    second signal stops at once (``KeyboardInterrupt``). Nested use within one ``scope`` (the auto
    reference's run inside a run) leaves the signals to the outermost; a run inside a sweep takes them."""

    active: dict[str, int] = {}

    def __init__(self, scope: str, callback=None) -> None:
        self.scope, self.callback = scope, callback
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "DeferredSignals":
        if threading.current_thread() is threading.main_thread() and self.active.get(self.scope, 0) == 0:
            self.previous = {s: signal.signal(s, self._handle) for s in HANDLED}
        self.active[self.scope] = self.active.get(self.scope, 0) + 1
        return self

    @property
    def owner(self) -> bool:
        """Whether this scope installed the handlers (the outermost run, in the main thread)."""
        return bool(self.previous)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and self.callback is None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.callback is not None:
            self.callback(signum)

    def __exit__(self, *exc) -> None:
        self.active[self.scope] -= 1
        for s, h in self.previous.items():
            signal.signal(s, h)


def ignore_further() -> None:
    """The command is exiting after a handled SIGINT / SIGTERM (checkpoint written, message printed). Python
    resets its own handlers to the OS default as the interpreter shuts down, so a second Ctrl-C during a slow
    teardown (torch, MuJoCo) would kill the process by the signal (exit -2, no word); ignored, the exit code
    stays 128 + signum. Python keeps an ignored signal ignored through shutdown."""
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
