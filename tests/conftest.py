import os
import signal
import subprocess
import sys
import time

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def run_dir(tmp_path):
    """``run.out_dir`` override placing run folders in a temporary directory."""
    return f"run.out_dir={tmp_path / 'runs'}"


@pytest.fixture
def sigterm_cli():
    """``run(cli_args, progress_glob)``: start ``python -m rl_align.cli``, wait until a progress.csv
    matching the glob has logged a few iterations, SIGTERM it; returns ``(returncode, stderr, csv path)``."""

    def run(args: list[str], root, pattern: str):
        proc = subprocess.Popen([sys.executable, "-m", "rl_align.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        deadline, csvs = time.time() + 120, []
        while time.time() < deadline:
            csvs = list(root.glob(pattern))
            if csvs and len(csvs[0].read_text().splitlines()) >= 4:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err, csvs[0] if csvs else None

    return run
