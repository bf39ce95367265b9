"""Host buffers for offload: pooled, bounded pinned memory with a pageable fallback.

Pinned (page-locked) host memory is what lets a device<->host copy run asynchronously, but it is a
scarce OS resource: allocating it is slow (so buffers are pooled and reused by exact size) and too
much of it starves the machine (so the pool is bounded by ``max_pinned_bytes``). Past the bound,
or when pinning fails, buffers fall back to ordinary pageable memory: slower copies, same results.
An allocation the host cannot satisfy raises :class:`HostMemoryError` naming the buffer size.

Every pool registers itself, so the end-of-run memory report can call :func:`host_bytes_in_use` and
:func:`peak_host_bytes` without knowing which offload engines exist.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Callable, Optional

import torch

__all__ = [
    "HostMemoryError",
    "HostBufferPool",
    "host_bytes_in_use",
    "peak_host_bytes",
    "register_host_bytes_provider",
    "format_bytes",
]

_POOLS: "weakref.WeakSet[HostBufferPool]" = weakref.WeakSet()
_PROVIDERS: list = []  # weakref.WeakMethod / weakref.ref to callables returning host bytes
_LOCK = threading.Lock()


def format_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


class HostMemoryError(MemoryError):
    """The host could not provide a buffer; the message names its size and who asked for it."""


def _pinning_possible() -> bool:
    return torch.cuda.is_available()


class HostBufferPool:
    """Exact-size free lists of 1-D uint8 host buffers; pooled (and pinned, when CUDA is present) up
    to ``max_pinned_bytes``; beyond it, plain pageable buffers freed on release. Without CUDA the
    pooled buffers are pageable, so CI runs the same pooling code.

    ``acquire``/``release`` serve transient buffers (offloaded activations, gradient staging);
    ``alloc_persistent`` serves long-lived ones (host copies of parameters), counted by their owner.
    A buffer released with a pending device-copy event is reused only once that event completed. Thread-safe (optimizer workers and autograd call it concurrently).
    """

    def __init__(self, pin_memory: bool = True, max_pinned_bytes: int = 8 << 30, name: str = "offload"):
        if max_pinned_bytes <= 0:
            raise ValueError(f"max_pinned_bytes must be > 0, got {max_pinned_bytes}")
        self.name = name
        self.pin = bool(pin_memory) and _pinning_possible()
        self.max_pinned_bytes = int(max_pinned_bytes)
        self._lock = threading.RLock()  # re-entrant: a handle's __del__ may release during an acquire
        self._free: dict[int, list] = {}  # nbytes -> [(buffer, event or None)]
        self.pinned_bytes = 0  # pooled bytes allocated (in use + cached), bounded by max_pinned_bytes
        self._pooled: set[int] = set()  # data_ptr of pooled buffers
        self.in_use_bytes = 0  # bytes handed out and not yet released (+ live persistent)
        self.cached_bytes = 0  # bytes sitting in free lists
        self.peak_bytes = 0  # peak of in_use + cached
        self.pin_failures = 0
        self.allocations = 0  # fresh host allocations (a cache hit is not one)
        with _LOCK:
            _POOLS.add(self)

    # ------------------------------------------------------------------------------ accounting
    @property
    def bytes_held(self) -> int:
        return self.in_use_bytes + self.cached_bytes

    def _bump_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes + self.cached_bytes)

    # ------------------------------------------------------------------------------ allocation
    def _new(self, nbytes: int, what: str) -> tuple[torch.Tensor, bool]:
        """A fresh buffer and whether it is pooled: within budget it is pooled and pinned if pinning
        is possible (pageable if pinning fails); past the budget a pageable, unpooled one."""
        pooled = self.pinned_bytes + nbytes <= self.max_pinned_bytes
        buf = None
        if pooled and self.pin:
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:  # pinning refused (ulimit -l, driver); pageable still works
                self.pin_failures += 1
                pooled = False
                if self.pin_failures == 1:
                    warnings.warn(f"efft offload: pinning a {format_bytes(nbytes)} host buffer failed ({e}); using pageable memory", stacklevel=3)
        if buf is None:
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8)
            except (RuntimeError, MemoryError) as e:
                raise HostMemoryError(
                    f"efft offload ({self.name}): host memory exhausted allocating a {what} buffer of {nbytes} bytes "
                    f"({format_bytes(nbytes)}); {format_bytes(self.bytes_held)} already held by this pool. "
                    f"Offload less (raise offload.min_offload_bytes / keep_small_params_on_device_bytes) or add host RAM. ({e})"
                ) from e
        self.allocations += 1
        if pooled:
            self.pinned_bytes += nbytes
            self._pooled.add(buf.data_ptr())
        return buf, pooled

    def acquire(self, nbytes: int, what: str = "transient") -> torch.Tensor:
        """A 1-D uint8 host buffer of exactly ``nbytes`` (reused when one is free and its copy done)."""
        nbytes = int(nbytes)
        with self._lock:
            lst = self._free.get(nbytes)
            if lst:
                for i, (buf, ev) in enumerate(lst):
                    if ev is None or ev.query():
                        lst.pop(i)
                        self.cached_bytes -= nbytes
                        self.in_use_bytes += nbytes
                        self._bump_peak()
                        return buf
            buf, _ = self._new(nbytes, what)
            self.in_use_bytes += nbytes
            self._bump_peak()
            return buf

    def release(self, buf: torch.Tensor, event: Optional[object] = None) -> None:
        """Give a buffer back; pooled ones are cached (reused after ``event``), others freed."""
        nbytes = buf.numel()
        with self._lock:
            self.in_use_bytes -= nbytes
            if buf.data_ptr() in self._pooled:
                self._free.setdefault(nbytes, []).append((buf, event))
                self.cached_bytes += nbytes

    def free(self, buf: torch.Tensor) -> None:
        """Give back for good a buffer from ``acquire`` (a long-lived one whose owner is closed): it leaves
        the pool's accounting and bound instead of waiting in a free list."""
        nbytes = buf.numel()
        with self._lock:
            self.in_use_bytes -= nbytes
            if buf.data_ptr() in self._pooled:
                self._pooled.discard(buf.data_ptr())
                self.pinned_bytes -= nbytes

    def alloc_persistent(self, like: torch.Tensor, what: str = "parameter") -> tuple[torch.Tensor, bool]:
        """A contiguous host tensor shaped like ``like`` and whether it counts against the bound. Its
        owner counts its bytes (``register_host_bytes_provider``) and calls ``forget_pinned`` on drop."""
        nbytes = like.numel() * like.element_size()
        with self._lock:
            buf, pooled = self._new(max(nbytes, 1), what)
            self._pooled.discard(buf.data_ptr())  # never returns to the free lists
        return buf[:nbytes].view(like.dtype).view(like.shape), pooled

    def forget_pinned(self, nbytes: int) -> None:
        """A persistent pinned tensor was dropped: its bytes no longer count against the bound."""
        with self._lock:
            self.pinned_bytes = max(0, self.pinned_bytes - int(nbytes))

    def trim(self) -> int:
        """Free every cached buffer whose copy has finished; returns the bytes freed."""
        freed = 0
        with self._lock:
            for nbytes, lst in list(self._free.items()):
                keep = [(b, e) for b, e in lst if e is not None and not e.query()]
                n = len(lst) - len(keep)
                for b, e in lst:
                    if e is None or e.query():
                        self._pooled.discard(b.data_ptr())
                freed += n * nbytes
                self.pinned_bytes -= n * nbytes
                self.cached_bytes -= n * nbytes
                self._free[nbytes] = keep
        return freed


def register_host_bytes_provider(fn: Callable[[], int]) -> None:
    """Count ``fn()`` (e.g. an optimizer's host-side state) in :func:`host_bytes_in_use`. Held weakly."""
    ref = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else weakref.ref(fn)
    with _LOCK:
        _PROVIDERS.append(ref)


def _provider_bytes() -> int:
    total = 0
    with _LOCK:
        alive = []
        for ref in _PROVIDERS:
            fn = ref()
            if fn is not None:
                alive.append(ref)
                total += int(fn())
        _PROVIDERS[:] = alive
    return total


def host_bytes_in_use() -> int:
    """Host bytes the offload machinery holds now: pool buffers (in use + cached) + registered state."""
    with _LOCK:
        pools = list(_POOLS)
    return sum(p.bytes_held for p in pools) + _provider_bytes()


def peak_host_bytes() -> int:
    """Sum of each pool's peak plus registered state now (an upper bound on the true joint peak)."""
    with _LOCK:
        pools = list(_POOLS)
    return sum(p.peak_bytes for p in pools) + _provider_bytes()
