import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def run_dir(tmp_path):
    """``run.out_dir`` override placing run folders in a temporary directory."""
    return f"run.out_dir={tmp_path / 'runs'}"
