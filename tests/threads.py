"""One intra-op thread for directories of tiny-shape tests: per-op overhead dominates there, and on a
busy 2-core machine torch's threads mostly wait on each other. A directory opts in by importing the
fixture into its conftest.py; the thread count is restored after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
