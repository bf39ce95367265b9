"""Tiny shapes are dominated by per-op overhead, and on a crowded 2-core machine torch's intra-op
threads mostly wait on each other: run this directory's tests on one thread, restoring it after."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
