"""Device<->host copies on one persistent side stream, with an event per copy.

On CUDA a copy waits (on the GPU) for the compute stream to reach the point where the source was
produced, runs on the side stream, and returns an event that a consumer waits on: a CPU thread with
``event.synchronize()``, the compute stream with ``wait_event``. On a CPU-only machine host and
device are the same memory: copies run synchronously and the events are ``None``, so the same code
paths (and their bookkeeping) run in CI.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch


class Mover:
    """Copies between ``device`` and host memory; ``trace`` (a list) records each copy when given."""

    def __init__(self, device: torch.device, trace: Optional[list] = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.trace = trace
        self._lock = threading.Lock()
        self.bytes_to_host = 0
        self.bytes_to_device = 0

    def _note(self, kind: str, tag, nbytes: int) -> None:
        with self._lock:
            if kind == "to_host":
                self.bytes_to_host += nbytes
            else:
                self.bytes_to_device += nbytes
            if self.trace is not None:
                self.trace.append((kind, tag, nbytes))

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, src_on_device: bool):
        if not self.cuda:
            with torch.no_grad():
                dst.copy_(src)
            return None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            with torch.no_grad():
                dst.copy_(src, non_blocking=True)
            # The allocator must not hand the device memory to someone else before the copy ran.
            (src if src_on_device else dst).record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, tag=None):
        """Copy device tensor ``src`` into host tensor ``dst``; returns the completion event (or None)."""
        self._note("to_host", tag, src.numel() * src.element_size())
        return self._copy(dst, src, src_on_device=True)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor, tag=None):
        """Copy host tensor ``src`` into device tensor ``dst``; returns the completion event (or None)."""
        self._note("to_device", tag, src.numel() * src.element_size())
        return self._copy(dst, src, src_on_device=False)

    def wait_here(self, event) -> None:
        """Make the current (compute) stream wait for ``event`` without blocking the CPU."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


def wait_cpu(event) -> None:
    """Block this CPU thread until ``event`` (a copy) has completed."""
    if event is not None:
        event.synchronize()
