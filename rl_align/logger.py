"""One logger: ``record(key, value)`` then ``dump(step)`` to TensorBoard and a CSV of every scalar,
plus a live progress line. Prefixes group scalars: ``train/`` (the update), ``rollout/`` (the episodes
of the rollout), ``eval/`` (rl_align.evaluation), ``time/``, ``pref/`` (accuracy of the preference
signal), ``grad/`` (per-term gradient norms), ``pl/`` (PL diagnostics), ``safety/`` (the Lagrangian
layer), ``rlhf/`` (the reward model), ``comal/`` (the outer loop), ``human/`` (a label store's pairs)."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import threading
import time
from pathlib import Path


class CSVOutput:
    """Wide CSV (one row per dump, one column per key); the header grows when new keys appear."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: list[str] = []
        self.rows: list[dict] = []
        if path.exists():  # resuming: keep what is there
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or [])
                self.rows = list(reader)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Append one row, or rewrite the file (to a temporary one, then renamed) when the header grows; a
        failed write (a full disk) leaves the file as it was and raises an ``OSError`` naming it."""
        row = {"step": step, **scalars}
        new = [k for k in row if k not in self.keys]
        if new or not self.path.exists():
            self._rewrite(self.keys + new, self.rows + [row])
            self.keys += new
        else:
            self._append(self._lines(self.keys, [row], header=False))
        self.rows.append(row)

    @staticmethod
    def _lines(keys: list[str], rows: list[dict], header: bool) -> bytes:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().encode("utf-8")

    def _rewrite(self, keys: list[str], rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_bytes(self._lines(keys, rows, header=True))
            os.replace(tmp, self.path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            raise

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException as exc:
                os.ftruncate(fd, size)  # no half row: shrinking needs no space
                if isinstance(exc, OSError):
                    raise OSError(exc.errno, exc.strerror, str(self.path)) from None
                raise
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def _quiet_writer_thread(args) -> None:
    """TensorBoard writes events from a thread of its own; an OS error there (a full disk) is raised again in
    the thread that logs, which reports it in one line, so the thread's own traceback is not printed."""
    if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
        _thread_hook(args)


_thread_hook = threading.excepthook


class TensorBoardOutput:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported where used: optional weight

        threading.excepthook = _quiet_writer_thread
        self.writer = SummaryWriter(str(log_dir))
        self.log_dir = log_dir

    def write(self, step: int, scalars: dict[str, float]) -> None:
        try:
            self._write(step, scalars)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, exc.filename or str(self.log_dir)) from None

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Progress:
    """One status line: steps, steps/s, latest return and cost, ETA. Redrawn in place on a terminal,
    printed every ~10% of the run otherwise (log files stay readable)."""

    def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True) -> None:
        stream = stream or sys.stderr  # resolved per call so redirected stderr (pytest, tee) is honoured
        self.total, self.start, self.stream, self.enabled = total, start, stream, enabled
        self.t0 = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.next_print = start
        self.fields: dict[str, float] = {}

    def update(self, step: int, **fields: float) -> None:
        self.fields.update({k: v for k, v in fields.items() if v is not None and not math.isnan(v)})
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        sps = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / sps if sps > 0 else float("nan")
        parts = [f"{step:>9,}/{self.total:,} steps", f"{sps:,.0f} steps/s"]
        parts += [f"{k} {v:,.1f}" for k, v in self.fields.items()]
        parts.append(f"ETA {_fmt_time(eta)}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif step >= self.next_print or step >= self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.next_print = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_time(seconds: float) -> str:
    if math.isnan(seconds) or math.isinf(seconds):
        return "--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Logger:
    """``record`` scalars, ``dump`` them at an env step to every output."""

    def __init__(self, folder: Path | None, tensorboard: bool = True) -> None:
        self.outputs = []
        if folder is not None:
            self.outputs.append(CSVOutput(folder / "progress.csv"))
            if tensorboard:
                self.outputs.append(TensorBoardOutput(folder / "tb"))
        self.values: dict[str, float] = {}
        self.latest: dict[str, float] = {}

    def record(self, key: str, value: float) -> None:
        self.values[key] = float(value)

    def record_dict(self, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.record(k, v)

    def dump(self, step: int) -> None:
        if not self.values:
            return
        for out in self.outputs:
            out.write(step, self.values)
        self.latest.update(self.values)
        self.values = {}

    def close(self) -> None:
        for out in self.outputs:
            out.close()
