"""Host buffer pool: reuse by size, the bound, the pageable fallback, host-OOM message, accounting."""
import gc
import warnings

import pytest
import torch

from efft.offload import pinned
from efft.offload.pinned import HostBufferPool, HostMemoryError, host_bytes_in_use, peak_host_bytes


def test_reuse_by_exact_size_and_accounting():
    pool = HostBufferPool(max_pinned_bytes=1 << 20)
    a = pool.acquire(1000)
    assert a.dtype == torch.uint8 and a.numel() == 1000
    assert pool.in_use_bytes == 1000 and pool.allocations == 1
    pool.release(a)
    assert pool.in_use_bytes == 0 and pool.cached_bytes == 1000
    b = pool.acquire(1000)
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1  # reused, not reallocated
    c = pool.acquire(2000)
    assert c.data_ptr() != b.data_ptr() and pool.allocations == 2
    assert pool.peak_bytes == 3000
    pool.release(b)
    pool.release(c)
    assert pool.trim() == 3000 and pool.bytes_held == 0


def test_buffer_waits_for_its_copy_event():
    class Pending:
        done = False

        def query(self):
            return self.done

    pool = HostBufferPool(max_pinned_bytes=1 << 20)
    a = pool.acquire(64)
    ev = Pending()
    pool.release(a, ev)
    b = pool.acquire(64)
    assert b.data_ptr() != a.data_ptr()  # copy still running: not handed out again
    ev.done = True
    pool.release(b)
    got = {pool.acquire(64).data_ptr(), pool.acquire(64).data_ptr()}
    assert got == {a.data_ptr(), b.data_ptr()}


def test_bound_past_which_buffers_are_not_pooled():
    pool = HostBufferPool(max_pinned_bytes=1500)
    a = pool.acquire(1000)
    b = pool.acquire(1000)  # over the bound: pageable, freed on release
    assert pool.pinned_bytes == 1000
    pool.release(a)
    pool.release(b)
    assert pool.cached_bytes == 1000


def test_pin_failure_falls_back_to_pageable(monkeypatch):
    pool = HostBufferPool(max_pinned_bytes=1 << 20)
    pool.pin = True  # as on a CUDA machine
    real_empty = torch.empty

    def empty(*a, **kw):
        if kw.get("pin_memory"):
            raise RuntimeError("cudaHostAlloc failed: out of pinnable memory")
        return real_empty(*a, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.warns(UserWarning, match="pinning a .* host buffer failed"):
        buf = pool.acquire(4096)
    assert buf.numel() == 4096 and not buf.is_pinned() and pool.pin_failures == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per pool, not one per buffer
        assert pool.acquire(8192).numel() == 8192
    assert pool.pin_failures == 2


def test_host_memory_exhaustion_names_the_buffer_size(monkeypatch):
    pool = HostBufferPool(max_pinned_bytes=1 << 20, name="activations")

    def empty(*a, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes")

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(HostMemoryError, match=r"activation \(2, 3\).*123456789 bytes \(117.74 MiB\)") as e:
        pool.acquire(123456789, what="activation (2, 3)")
    assert isinstance(e.value, MemoryError)


def test_global_report_counts_pools_and_providers():
    gc.collect()
    before = host_bytes_in_use()
    pool = HostBufferPool(max_pinned_bytes=1 << 20)
    a = pool.acquire(5000)

    class Engine:
        def host_bytes(self):
            return 700

    eng = Engine()
    pinned.register_host_bytes_provider(eng.host_bytes)
    assert host_bytes_in_use() == before + 5000 + 700
    assert peak_host_bytes() >= host_bytes_in_use()
    pool.release(a)
    del eng, pool, a
    gc.collect()
    assert host_bytes_in_use() == before


def test_bad_bound():
    with pytest.raises(ValueError, match="max_pinned_bytes"):
        HostBufferPool(max_pinned_bytes=0)
