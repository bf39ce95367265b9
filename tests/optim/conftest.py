"""Tiny shapes: one torch thread (see tests/threads.py)."""
from tests.threads import one_thread  # noqa: F401  (autouse)
