"""Two CPU processes (gloo) under DistributedDataParallel, each with half the global batch, end
with the same weights as one process on the whole batch: projections agree on every rank
(seeded rSVD sketches, seeded Gaussian matrices, regenerated random bases)."""
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from tests.launch import free_port

from . import ddp_worker as w


def _join(ctx, tmp_path, deadline):
    """Wait for the workers. A worker that dies after both ranks passed the final barrier (gloo's
    threads have aborted at teardown under load, 'terminate called without an active exception')
    has written every result: the comparison below still decides; any earlier death fails."""
    try:
        while not ctx.join(timeout=2):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail("DDP workers did not finish in time")
    except mp.ProcessExitedException as e:
        if not all((tmp_path / f"done-{r}").exists() for r in range(2)):
            raise
        warnings.warn(f"a DDP worker died at process-group teardown, after writing its results: {e}")
        for p in ctx.processes:
            p.join(timeout=10)


@pytest.mark.timeout(180)
def test_two_process_ddp_equals_single_process(tmp_path):
    ctx = mp.start_processes(w.worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    _join(ctx, tmp_path, time.time() + 150)
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
