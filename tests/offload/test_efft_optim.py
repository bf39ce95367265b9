"""Offload with efft's projected optimizers (GaLore, APOLLO, FRUGAL): bitwise the same as without,
projected states small enough to stay on the device, and exact resume."""
import io

import pytest
import torch

from efft.offload.optimizer import OffloadOptimizer, offload_optimizer
from tests.offload.helpers import cfg, model, same_params, train

optim = pytest.importorskip("efft.optim")
CLASSES = {name: getattr(optim, name, None) for name in ("GaLoreAdamW", "APOLLOAdamW", "FRUGAL")}
if not all(CLASSES.values()):
    pytest.skip("efft.optim's GaLoreAdamW/APOLLOAdamW/FRUGAL are not available", allow_module_level=True)


def groups(m, rank=4):
    low = [p for n, p in m.named_parameters() if p.dim() == 2 and ".layers." in n]
    rest = [p for n, p in m.named_parameters() if not (p.dim() == 2 and ".layers." in n)]
    return [{"params": low, "rank": rank, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}, {"params": rest}]


def build(cls, m, **kw):
    return cls(groups(m), lr=1e-2, weight_decay=0.01, seed=3, stagger_refresh=True, **kw)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_bitwise_equal_and_small_states_back_on_device(name):
    cls = CLASSES[name]
    ref = model()
    train(ref, build(cls, ref), 3, accum=2, clip=0.5)
    m = model()
    opt = offload_optimizer(build(cls, m), cfg(keep_small_params_on_device_bytes=10 * 1024),
                            gradient_accumulation_steps=2,
                            max_grad_norm=0.5, trace=True)
    before = opt.placement()
    train(m, opt, 3, accum=2)
    assert same_params(ref, m)
    moved = {e[1] for e in opt.trace if e[0] == "to_device_state"}
    name_of = {id(p): n for n, p in m.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]  # placement is in group order
    # The 64x64 projection weights (16 KiB) start on host; their projected state (rank 4, or FRUGAL's
    # quarter of the rows) is < 10 KiB, so it comes back to the device after the first step.
    # Full-state parameters stay on host.
    assert moved and all(before[i] == "host" and ".layers." in names[i] for i in moved)
    assert opt.placement()[names.index("lm_head.weight")] == "host"
    opt.close()


def test_resume_with_offloaded_projected_state():
    cls = CLASSES["GaLoreAdamW"]
    ref = model()
    train(ref, build(cls, ref), 4)
    m = model()
    opt = OffloadOptimizer(groups(m), cls, cfg(keep_small_params_on_device_bytes=0), lr=1e-2, weight_decay=0.01, seed=3,
                           stagger_refresh=True)
    train(m, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = model(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = OffloadOptimizer(groups(m2), cls, cfg(keep_small_params_on_device_bytes=0), lr=1e-2, weight_decay=0.01,
                            seed=3, stagger_refresh=True)
    opt2.load_state_dict(ck["optim"])
    train(m2, opt2, 2, start=2)
    assert same_params(ref, m2)
    opt.close()
    opt2.close()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_8bit_moments_on_host_bitwise_and_resumable(name):
    """efft's 8-bit moments (state_bits=8: uint8 codes + block scales) live in host memory like any
    state: the offloaded run, checkpointed after 2 steps and resumed into a fresh model and
    optimizer, ends bitwise where 3 steps of the plain 8-bit optimizer end."""
    cls = CLASSES[name]
    ref = model()
    train(ref, build(cls, ref, state_bits=8), 3)
    m = model()
    opt = OffloadOptimizer(groups(m), cls, cfg(keep_small_params_on_device_bytes=0), lr=1e-2, weight_decay=0.01, seed=3,
                           stagger_refresh=True, state_bits=8)
    train(m, opt, 2)
    codes = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8]
    assert codes and all(v.device.type == "cpu" for v in codes) and set(opt.placement().values()) == {"host"}
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optim": opt.state_dict()}, buf)
    opt.close()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = model(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = OffloadOptimizer(groups(m2), cls, cfg(keep_small_params_on_device_bytes=0), lr=1e-2, weight_decay=0.01,
                            seed=3, stagger_refresh=True, state_bits=8)
    opt2.load_state_dict(ck["optim"])
    train(m2, opt2, 1, start=2)
    assert same_params(ref, m2)
    opt2.close()


def test_seeded_draws_do_not_leak_between_worker_threads():
    """Offload's workers regenerate projections concurrently: a generator seeded in one thread must
    not be reseeded by another before it draws (deterministic interleaving, no race needed)."""
    import threading

    from efft.optim.projectors import _generator

    gen = _generator(1, "cpu")
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("draw", torch.randn(4, generator=_generator(2, "cpu"))))
    t.start()
    t.join()
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(other["draw"], torch.randn(4, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_several_workers_stay_bitwise(name):
    """Three workers stepping parameters at once (hosts with >= 8 cores get 4 by default): seeded
    projections and FRUGAL's blocks come out the same, so training is bitwise that of one process."""
    cls = CLASSES[name]
    ref = model()
    train(ref, build(cls, ref), 3, accum=2, clip=0.5)
    m = model()
    opt = offload_optimizer(build(cls, m), cfg(keep_small_params_on_device_bytes=0), gradient_accumulation_steps=2,
                            max_grad_norm=0.5, workers=3, trace=True)
    train(m, opt, 3, accum=2)
    assert len({e[2] for e in opt.trace if e[0] == "step" and e[2] != "device"}) == 3
    assert same_params(ref, m)
    opt.close()


def test_scheduler_reaches_the_update_after_load_state_dict():
    """accelerate reloads an optimizer's own state when it wraps it: afterwards a scheduler's lr must
    still reach efft's update (which looks the group up per parameter), as without offload."""
    cls = CLASSES["APOLLOAdamW"]
    ref, m = model(), model()
    ref_opt = build(cls, ref)
    opt = offload_optimizer(build(cls, m), cfg(keep_small_params_on_device_bytes=0))
    for o in (ref_opt, opt):
        o.load_state_dict(o.state_dict())
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ref_opt, opt)]
    train(ref, ref_opt, 3, sched=scheds[0])
    train(m, opt, 3, sched=scheds[1])
    assert same_params(ref, m)
    opt.close()
