"""Optimizer-state offload on CPU (host == device): bitwise the same training as the plain optimizer,
and the trace shows which tensors moved, where each step ran, and when."""
import io
import threading

import pytest
import torch

from efft.offload.optimizer import OffloadOptimizer, offload_optimizer
from tests.offload.helpers import batches, cfg, model, same_params, train

STEPS = 3


def reference(accum=1, clip=None, sched=False, steps=STEPS, **opt_kw):
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **opt_kw)
    s = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1)) if sched else None
    train(m, opt, steps, accum, clip, s)
    return m


def offloaded(accum=1, clip=None, sched=False, steps=STEPS, **kw):
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, weight_decay=0.1,
                           gradient_accumulation_steps=accum, max_grad_norm=clip, trace=True, **kw)
    s = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1)) if sched else None
    train(m, opt, steps, accum, None, s)
    return m, opt


@pytest.mark.parametrize("accum,clip,eager", [(1, None, True), (2, None, True), (1, 0.05, True), (2, 0.05, True),
                                              (2, None, False), (1, 0.05, False)])
def test_bitwise_equal_to_plain_adamw(accum, clip, eager):
    ref = reference(accum, clip, sched=True)
    m, opt = offloaded(accum, clip, sched=True, eager=eager)
    assert same_params(ref, m)
    placement = opt.placement()
    assert "host" in placement.values() and "device" in placement.values()


def test_release_grads_frees_device_gradients_and_stays_bitwise():
    ref = reference(2, 0.05)
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, weight_decay=0.1, gradient_accumulation_steps=2,
                           max_grad_norm=0.05, release_grads=True)
    for b in batches(0, accum=2):
        (m(**b).loss / 2).backward()
    where = opt.placement()
    grads = {i: p.grad is None for i, p in enumerate(m.parameters())}
    assert all(grads[i] == (w == "host") for i, w in where.items())  # offloaded ones freed, small ones kept
    opt.step()
    opt.zero_grad()
    train(m, opt, STEPS - 1, accum=2, start=1)
    assert same_params(ref, m)
    opt.close()


def test_fused_adamw():
    ref = reference(1, 0.05, fused=True)
    m, opt = offloaded(1, 0.05, fused=True)
    assert same_params(ref, m)
    opt.close()


def test_equality_check_can_fail():
    """Negative control: clipping changes the result, so the comparisons above are not vacuous."""
    ref = reference(1, None)
    m, _ = offloaded(1, 0.05)
    assert not same_params(ref, m)


def _events(trace, kind):
    return [e for e in trace if e[0] == kind]


def test_what_moves_and_when():
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, gradient_accumulation_steps=2, trace=True)
    host = {i for i, w in opt.placement().items() if w == "host"}
    small = {i for i, p in enumerate(m.parameters()) if p.numel() * p.element_size() < 4096}
    assert host == set(range(len(list(m.parameters())))) - small  # big states on host, small ones stay
    assert {e[1][1] for e in _events(opt.trace, "to_host")} == host  # initial host copies
    opt.trace.clear()
    b1, b2 = batches(0, accum=2)
    m(**b1).loss.backward()
    assert opt.trace == []  # first micro-batch: nothing moves, gradients accumulate on the device
    m(**b2).loss.backward()
    launches = _events(opt.trace, "launch")
    assert {e[1] for e in launches} == set(range(len(list(m.parameters()))))
    assert all(e[2] == "backward" for e in launches)  # launched from the gradient hooks
    grads = [e for e in _events(opt.trace, "to_host") if e[1][0] == "grad"]
    assert sorted(e[1][1] for e in grads) == sorted(host)  # each offloaded gradient copied once, small ones never
    assert not _events(opt.trace, "to_device")  # nothing comes back before step()
    # Gradients arrive in reverse layer order: the LM head's is launched first.
    names = [n for n, _ in m.named_parameters()]
    assert names[launches[0][1]] == "lm_head.weight"
    opt.step()
    back = _events(opt.trace, "to_device")
    assert sorted(e[1][1] for e in back) == sorted(host)  # one copy-back per offloaded parameter
    assert {e[1] for e in _events(opt.trace, "step") if e[2] == "device"} == small
    assert all(e[2].startswith("efft-offload") for e in _events(opt.trace, "step") if e[1] in host)
    opt.close()


def test_cpu_step_overlaps_backward():
    """The LM head's CPU step finishes while backward is still in the first layer (deterministic:
    backward waits for it, so a step that only ran in step() would time out here)."""
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, trace=True)
    head = [i for i, (n, _) in enumerate(m.named_parameters()) if n == "lm_head.weight"][0]
    done = threading.Event()
    seen = {}

    def gate(module, grad_output):  # runs when backward reaches the first decoder layer
        for _ in range(600):
            if any(e[0] == "step" and e[1] == head for e in list(opt.trace)):
                done.set()
                break
            threading.Event().wait(0.05)
        seen["ok"] = done.is_set()
        seen["steps_before"] = sum(e[0] == "step" for e in list(opt.trace))

    h = m.model.layers[0].register_full_backward_pre_hook(gate)
    m(**batches(0)[0]).loss.backward()
    h.remove()
    assert seen["ok"]
    opt.step()
    opt.close()


def test_clipping_waits_for_the_global_norm():
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, max_grad_norm=0.05, trace=True)
    m(**batches(0)[0]).loss.backward()
    assert _events(opt.trace, "norm")  # per-parameter norms computed in backward ...
    assert not [e for e in opt.trace if e[0] == "step"]  # ... but no step before the global norm is known
    ref = model()
    ref(**batches(0)[0]).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    opt.step()
    assert torch.equal(opt.last_grad_norm, expected)
    opt.close()


def test_gradient_after_eager_step_raises():
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2)  # accumulation left at 1
    m(**batches(0)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps"):
        m(**batches(0)[0]).loss.backward()
    opt.close()


def test_clipping_outside_after_eager_step_raises():
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2)
    m(**batches(0)[0]).loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        opt.step()
    opt.close()


def test_resume_continues_exactly():
    ref = reference(steps=4)
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, weight_decay=0.1)
    train(m, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optim": opt.state_dict()}, buf)
    opt.close()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # tensors and plain values only
    m2 = model(seed=1)  # different init: everything must come from the checkpoint
    opt2 = OffloadOptimizer(m2.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, weight_decay=0.1)
    m2.load_state_dict(ck["model"])  # after the optimizer exists: host copies must refresh
    opt2.load_state_dict(ck["optim"])
    assert all(v["exp_avg"].device.type == "cpu" for v in opt2.state.values())
    train(m2, opt2, 2, start=2)
    assert same_params(ref, m2)
    # The state_dict is the plain optimizer's format: a plain AdamW resumes from it too. (Loading
    # aliases the checkpoint's tensors, as torch's own load_state_dict does: load it afresh.)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3 = model()
    m3.load_state_dict(ck["model"])
    plain = torch.optim.AdamW(m3.parameters(), lr=1e-2, weight_decay=0.1)
    plain.load_state_dict(ck["optim"])
    train(m3, plain, 2, start=2)
    assert same_params(ref, m3)
    opt2.close()


def test_wrap_existing_optimizer_with_state():
    """offload_optimizer() on an optimizer that already stepped carries its state along."""
    ref = reference(steps=3)
    m = model()
    base = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    train(m, base, 1)
    opt = offload_optimizer(base, cfg())
    train(m, opt, 2, start=1)
    assert same_params(ref, m)
    opt.close()


def test_lr_set_after_state_dict_is_used():
    """accelerate reads state_dict() before the scheduler's first lr: the step must see the new lr."""
    m = model()
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg(), lr=1e-2, weight_decay=0.1)
    opt.state_dict()
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    train(m, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    opt.close()


def test_host_memory_exhaustion_names_the_parameter_and_size(monkeypatch):
    from efft.offload.pinned import HostMemoryError

    m = model()
    real_empty = torch.empty

    def empty(*a, **kw):
        if kw.get("dtype") is torch.uint8:  # the host buffers
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_empty(*a, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(HostMemoryError, match=r"parameter 0 \(256, 64\) buffer of 65536 bytes \(64.00 KiB\)"):
        OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg())


def test_bad_input():
    m = model()
    with pytest.raises(TypeError, match="Optimizer subclass"):
        OffloadOptimizer(m.parameters(), object, cfg())
    opt = OffloadOptimizer(m.parameters(), torch.optim.AdamW, cfg())
    with pytest.raises(TypeError, match="already offloaded"):
        offload_optimizer(opt, cfg())
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    opt.close()

    class Layerwise(torch.optim.AdamW):
        layerwise = True

    with pytest.raises(ValueError, match="layer-wise"):
        OffloadOptimizer(model().parameters(), Layerwise, cfg())
    mixed = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))]
    with pytest.raises(ValueError, match="one device"):
        OffloadOptimizer(mixed, torch.optim.AdamW, cfg())
