"""The event discipline of the GPU path, checked on CPU: a stand-in Mover runs every copy late, on
its own thread, in stream order, and hands back events. Training must stay bitwise equal, so every
consumer (worker step, copy-back, pool reuse, activation unpack) waits on the right event."""
import queue
import threading
import time

import torch

from efft.offload.activations import enable_activation_offload
from efft.offload.optimizer import OffloadOptimizer
from efft.offload.transfer import Mover
from tests.offload.helpers import cfg, model, same_params, train


class _Event:
    def __init__(self):
        self._done = threading.Event()

    def synchronize(self):
        self._done.wait()

    def query(self):
        return self._done.is_set()


class LateMover(Mover):
    """Copies queued to one thread (a stream) and run after a delay; the compute 'stream' waiting on
    an event is this thread blocking until it is done."""

    def __init__(self, device, trace=None, delay=0.002):
        super().__init__(device, trace)
        self.delay = delay
        self.q: queue.Queue = queue.Queue()
        self.late = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            dst, src, ev = job
            time.sleep(self.delay)
            with torch.no_grad():
                dst.copy_(src)
            ev._done.set()

    def _copy(self, dst, src, src_on_device):
        ev = _Event()
        self.late += 1
        self.q.put((dst, src.detach(), ev))
        return ev

    def close(self):
        self.q.put(None)

    def wait_here(self, event):
        if event is not None:
            event.synchronize()


def test_optimizer_waits_on_its_events():
    ref = model()
    r_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    train(ref, r_opt, 3, accum=2, clip=0.05)
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, weight_decay=0.1,
                           gradient_accumulation_steps=2, max_grad_norm=0.05)
    opt.mover = LateMover(opt.device)
    train(m, opt, 3, accum=2)
    assert opt.mover.late > 0 and same_params(ref, m)
    opt.mover.close()
    opt.close()


def test_activation_offload_waits_on_its_events():
    ref = model(layers=3)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), 2)
    m = model(layers=3)
    h = enable_activation_offload(m, cfg(prefetch_layers=1))
    h.mover = LateMover(h.device)
    train(m, torch.optim.AdamW(m.parameters(), lr=1e-2), 2)
    h.mover.close()
    assert h.mover.late > 0 and h.stats["prefetched"] > 0 and same_params(ref, m)
