"""Optimizer-state memory measured by summing the tensors in optimizer.state, against the formula
for each optimizer; and checkpoints: weights_only loading and exact resume."""
import io

import pytest
import torch

from efft.optim import APOLLOAdamW, FRUGAL, GaLoreAdamW

from .helpers import groups, model, split_params, state_bytes, train

F32 = 4


def _layers(sizes):
    """Stand-alone 2-D weights of Llama-like shapes (out x in) plus a bias."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(m, n) * 0.02) for m, n in sizes]
    return ws, torch.nn.Parameter(torch.zeros(sizes[0][0]))


def _one_step(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


SIZES = [(256, 256), (128, 256), (512, 256), (256, 512)]


def _lowrank_moment_elems(m, n, r, proj_type="std"):
    left = m < n if proj_type == "std" else (m >= n if proj_type == "reverse_std" else proj_type == "left")
    return r * n if left else m * r


@pytest.mark.parametrize("rank", [8, 32])
def test_galore_state_is_moments_plus_basis(rank):
    ws, bias = _layers(SIZES)
    opt = GaLoreAdamW([{"params": [bias]}, {"params": ws, "rank": rank}])
    _one_step(opt, ws + [bias])
    expected = 2 * bias.numel() * F32
    for w in ws:
        m, n = w.shape
        expected += 2 * _lowrank_moment_elems(m, n, rank) * F32 + (m * rank if m < n else rank * n) * F32
    assert state_bytes(opt) == expected == opt.state_bytes()


@pytest.mark.parametrize("rank,scale_type", [(16, "channel"), (1, "tensor")])
def test_apollo_state_is_moments_only(rank, scale_type):
    ws, bias = _layers(SIZES)
    opt = APOLLOAdamW([{"params": [bias]}, {"params": ws, "rank": rank, "scale_type": scale_type}])
    _one_step(opt, ws + [bias])
    _one_step(opt, ws + [bias])
    # moments + one fp32 scalar (the norm-growth limiter's last norm); the projection is regenerated
    expected = 2 * bias.numel() * F32 + sum(2 * _lowrank_moment_elems(*w.shape, rank) * F32 + F32 for w in ws)
    assert state_bytes(opt) == expected


def test_apollo_mini_state_under_one_percent_of_adamw():
    ws, _ = _layers(SIZES)
    mini = APOLLOAdamW([{"params": ws, "rank": 1, "scale_type": "tensor", "scale": 128.0}])
    _one_step(mini, ws)
    ws2, _ = _layers(SIZES)
    adamw = torch.optim.AdamW(ws2)
    _one_step(adamw, ws2)
    adamw_bytes = sum(v.numel() * v.element_size() for st in adamw.state.values() for k, v in st.items() if k != "step")
    assert adamw_bytes == 2 * sum(w.numel() for w in ws) * F32
    assert state_bytes(mini) <= 0.01 * adamw_bytes


@pytest.mark.parametrize("density", [0.25, 0.5])
def test_frugal_block_state_is_density_of_adamw(density):
    ws, bias = _layers(SIZES)
    opt = FRUGAL([{"params": [bias]}, {"params": ws, "rank": 1, "density": density}])
    _one_step(opt, ws + [bias])
    expected = 2 * bias.numel() * F32
    for w in ws:
        m, n = w.shape
        expected += 2 * round(density * max(m, n)) * min(m, n) * F32
    assert state_bytes(opt) == expected


# ----------------------------------------------------------------------------------- checkpoints
def _optimizers():
    return {
        "galore_rsvd_stagger": lambda g: GaLoreAdamW(g(rank=4, update_proj_gap=4), projector="rsvd", stagger_refresh=True, weight_decay=0.01),
        "apollo": lambda g: APOLLOAdamW(g(rank=4, update_proj_gap=4), weight_decay=0.01),
        "apollo_cached": lambda g: APOLLOAdamW(g(rank=4, update_proj_gap=4), weight_decay=0.01, cache_projection=True),
        "apollo_mini": lambda g: APOLLOAdamW(g(rank=1, scale_type="tensor", scale=128.0, update_proj_gap=4), lr=1e-3),
        "frugal": lambda g: FRUGAL(g(rank=4, update_proj_gap=4, density=0.25), stagger_refresh=True, weight_decay=0.01),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_resume_is_bitwise(name):
    build = _optimizers()[name]
    full = model()
    opt_full = build(lambda **kw: groups(full, **kw))
    train(full, opt_full, 20)

    first = model()
    opt_first = build(lambda **kw: groups(first, **kw))
    train(first, opt_first, 10)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # tensors and plain values only

    resumed = model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = build(lambda **kw: groups(resumed, **kw))
    opt_resumed.load_state_dict(ckpt["optim"])
    train(resumed, opt_resumed, 10, start=10)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_state_dict_has_no_objects():
    m = model()
    opt = GaLoreAdamW(groups(m, rank=4), projector="rsvd")
    train(m, opt, 2)
    for st in opt.state_dict()["state"].values():
        for v in st.values():
            assert isinstance(v, (torch.Tensor, int, float)), type(v)
    low, _ = split_params(m)
    assert opt.state[low[0]]["basis"].shape in {(4, 32), (16, 4), (32, 4)}


def test_groups_after_load_state_dict_still_drive_updates():
    """torch's load_state_dict swaps the group dicts (accelerate calls it on wrap): a scheduler
    writing lr into the new dicts must still reach every update."""
    m = model()
    opt = GaLoreAdamW(groups(m, rank=4))
    train(m, opt, 1)
    opt.load_state_dict(opt.state_dict())
    for g in opt.param_groups:
        g["lr"] = 0.0
        g["weight_decay"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    train(m, opt, 1, start=1)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_cached_projection_changes_nothing_but_speed():
    a, b = model(), model()
    opt_a = APOLLOAdamW(groups(a, rank=4, update_proj_gap=4), weight_decay=0.01)
    opt_b = APOLLOAdamW(groups(b, rank=4, update_proj_gap=4), weight_decay=0.01, cache_projection=True)
    train(a, opt_a, 10)  # spans two refreshes
    train(b, opt_b, 10)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    assert state_bytes(opt_a) == state_bytes(opt_b)  # the cache is not optimizer state
