import os
import sys

import pytest
import torch

# Make tests/ importable as a plain directory (reference.py lives here).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch_mha  # noqa: E402,F401  (loads the operator library)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed; thread-count changes never leak between tests."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
