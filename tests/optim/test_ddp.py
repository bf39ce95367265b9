"""Two CPU processes (gloo) under DistributedDataParallel, each with half the global batch, end
with the same weights as one process on the whole batch: projections agree on every rank
(seeded rSVD sketches, seeded Gaussian matrices, regenerated random bases)."""
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.launch import free_port

from . import ddp_worker as w


@pytest.mark.timeout(180)
def test_two_process_ddp_equals_single_process(tmp_path):
    ctx = mp.start_processes(w.worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 150
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("DDP workers did not finish in time")
    for name, build in w.BUILDERS.items():
        single = w.net()
        w.train(single, build(lambda **kw: w.groups(single, **kw)))
        r0 = torch.load(tmp_path / f"{name}-0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{name}-1.pt", weights_only=True)
        moved = False
        for a, b, c, init in zip(r0, r1, single.parameters(), w.net().parameters()):
            assert torch.equal(a, b), name  # the ranks agree exactly
            assert torch.allclose(a, c, atol=1e-5, rtol=0), name  # == one process on the global batch
            moved |= not torch.allclose(a, init)
        assert moved
