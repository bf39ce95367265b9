"""Tiny shapes here: one intra-op thread is faster than two on a busy 2-core machine (thread
hand-offs dominate 64-wide matmuls). Restored after each test so other directories keep theirs."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
