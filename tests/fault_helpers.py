"""Faults on real file systems: a small tmpfs or a read-only bind mount, made inside the test's own user and
mount namespace (``unshare -rm``), so nothing outside the test sees them and no root is needed."""

import shutil
import subprocess
import sys

import pytest


def namespace_or_skip() -> None:
    """Skip (with the reason) where this machine does not let an unprivileged process make a mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to make a private mount namespace")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>&1 || mount -t tmpfs -o size=64k tmpfs /tmp"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"unshare -rm with a tmpfs mount is not allowed here: {(r.stderr or r.stdout).strip()}")


def in_namespace(script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (Python) with this interpreter as root of a new user and mount namespace, where it may
    call :func:`mount` on folders of its own; returns the completed process (stdout, stderr as text)."""
    namespace_or_skip()
    return subprocess.run(["unshare", "-rm", sys.executable, "-c", PRELUDE + script], capture_output=True, text=True, timeout=timeout)


PRELUDE = '''
import os, subprocess, sys

def mount(*args):
    subprocess.run(["mount", *args], check=True)

def tmpfs(folder, size):
    os.makedirs(folder, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))

def read_only(folder):
    mount("--bind", str(folder), str(folder))
    mount("-o", "remount,ro,bind", str(folder))

def fill(folder):
    """Write a file in ``folder`` until the disk is full."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 4096)
        except OSError:
            pass

def cli(*args):
    """``rl-align ARGS`` in a child process: (exit code, stderr lines other than MuJoCo's WARNING)."""
    r = subprocess.run([sys.executable, "-m", "rl_align.cli", *args], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return r.returncode, [line for line in r.stderr.strip().splitlines() if not line.startswith("WARNING: ")]
'''
