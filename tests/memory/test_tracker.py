"""The tracker against tensors whose sizes are known by construction."""
import gc

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from efft.memory.tracker import (
    MemoryTracker,
    count_saved_tensors,
    format_bytes,
    format_report,
    gradient_bytes,
    optimizer_state_bytes,
    report,
    tensor_bytes,
    weight_bytes,
)
from tests.tiny import tiny_batch, tiny_model


def test_tensor_bytes_dedups_views_and_counts_dtypes():
    a = torch.zeros(10, 8)  # 320 B
    b = torch.zeros(3, dtype=torch.float16)  # 6 B
    assert tensor_bytes([a, b]) == 326
    assert tensor_bytes([a, a[1:3], a.t(), b]) == 326  # views share a's storage
    assert tensor_bytes([a[0]]) == 320  # a view keeps its whole storage alive
    assert tensor_bytes([torch.empty(5, 4, device="meta")]) == 80


def test_weight_bytes_trainable_frozen_buffers_and_tied():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: counted once
    m = torch.nn.ModuleDict({"emb": emb, "head": head, "frozen": torch.nn.Linear(4, 3)})
    m["frozen"].requires_grad_(False)
    m.register_buffer("buf", torch.zeros(7, dtype=torch.float64))
    w = weight_bytes(m)
    assert w == {"trainable": 10 * 4 * 4, "frozen": (4 * 3 + 3) * 4, "buffers": 56, "total": 160 + 60 + 56, "host": 0}


def test_gradients_and_adamw_state_bytes():
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2, bias=False))
    m[1].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    assert optimizer_state_bytes(opt) == 0
    m(torch.randn(3, 6)).sum().backward()
    assert gradient_bytes(m) == (6 * 5 + 5) * 4
    opt.step()
    # exp_avg + exp_avg_sq per parameter, plus one float32 `step` scalar per parameter
    assert optimizer_state_bytes(opt) == 2 * (6 * 5 + 5) * 4 + 2 * 4
    assert optimizer_state_bytes([opt, opt]) == optimizer_state_bytes(opt)  # same storages once
    by_dev = optimizer_state_bytes(opt, by_device=True)
    assert by_dev == {"cpu": 2 * 35 * 4 + 8}


def test_saved_tensors_hand_built_graph_live_and_peak():
    x = torch.randn(16, 8, requires_grad=True)  # 512 B
    with count_saved_tensors() as c:
        a = x.sin()  # saves x (512)
        b = a.exp()  # saves its result b (512)
        s = (b * 2.0).sum()  # mul by a python scalar saves nothing
        assert c.live_bytes == 1024 and c.count == 2
        s.backward()
        del a, b, s
        gc.collect()
    assert c.peak_bytes == 1024
    assert c.total_bytes == 1024
    assert c.live_bytes == 0  # everything released with the graph


def test_saved_tensors_exclude_parameters_and_dedup():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with count_saved_tensors(lin) as c:
        y = lin(x)  # saves x and the weight; the weight is excluded
        z = (y * y).sum()  # y saved twice: one storage
        assert c.live_bytes == 5 * 8 * 4 + 5 * 4 * 4
        assert c.excluded_count >= 1
        z.backward()


def test_checkpoint_recompute_is_counted_reentrant():
    x = torch.randn(64, 32, requires_grad=True)
    n = 64 * 32 * 4

    def block(h):
        return torch.tanh(h * 3.0).sin()  # tanh saves its output t, sin saves t: one storage

    with count_saved_tensors() as plain:
        block(x).sum().backward()
    with count_saved_tensors() as ck:
        out = checkpoint(block, x, use_reentrant=True)
        fwd = ck.live_bytes
        out.sum().backward()
    assert plain.peak_bytes == n
    assert fwd == n  # only the checkpoint input is saved in forward
    assert ck.peak_bytes == 2 * n  # in backward the recomputed t sits beside the saved input
    assert ck.live_bytes == 0


def test_tiny_model_report_and_format():
    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tr = MemoryTracker(device="cpu", host_bytes=lambda: 12345)
    batch = tiny_batch(batch=2, seq=16)
    with tr.count_saved_tensors(model) as c:
        model(**batch).loss.backward()
    opt.step()
    d = tr.report(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert d["weights_trainable_bytes"] == 4 * n
    assert d["gradient_bytes"] == 4 * n
    assert d["optimizer_state_bytes"] == 8 * n + 4 * len(list(model.parameters()))
    assert d["saved_activation_peak_bytes"] == c.peak_bytes > 0
    assert d["host_offload_bytes"] == 12345
    assert d["peak_bytes"] >= d["rss_at_start_bytes"] > 0
    text = format_report(d)
    for label in ("weights (trainable)", "gradients", "optimizer state", "saved activations", "host (offload)", "peak"):
        assert label in text
    assert "12.1 KiB" in text


def test_cpu_peak_rss_sees_a_large_allocation():
    tr = MemoryTracker(device="cpu")
    tr.start()
    if not getattr(tr, "rss_peak_resettable", False):
        pytest.skip("peak RSS cannot be reset on this OS")
    big = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MiB, touched
    del big
    d = report()
    assert tr.peak_bytes() - tr.rss_at_start >= 40 << 20
    assert d["peak_kind"] == "cpu_peak_rss"


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(None) == "-"


def test_weight_bytes_counts_bitsandbytes_4bit_statistics():
    """bitsandbytes keeps absmax / code tables on the parameter, not as buffers: still counted."""
    bnb = pytest.importorskip("bitsandbytes")
    from efft.memory.estimate import quant4_bytes

    lin = bnb.nn.Linear4bit(96, 40, bias=True, compress_statistics=True, quant_type="nf4")
    lin = lin.to("cpu")  # quantizes on the move
    assert lin.weight.quant_state is not None
    w = weight_bytes(lin)
    assert w["frozen"] == quant4_bytes(96 * 40, 64, True)  # packed codes + statistics
    assert w["trainable"] == 40 * 4  # the bias


def test_begin_end_saved_tensors_for_callbacks():
    """The callback form (enter on step begin, leave on step end) counts what the context form does."""
    model = tiny_model("llama")
    batch = tiny_batch(batch=1, seq=8)
    tr = MemoryTracker(device="cpu")
    tr.begin_saved_tensors(model)
    with pytest.raises(RuntimeError):
        tr.begin_saved_tensors(model)
    model(**batch).loss.backward()
    peak = tr.end_saved_tensors()
    with count_saved_tensors(model) as c:
        model(**batch).loss.backward()
    assert peak == c.peak_bytes > 0
    assert tr.report(model)["saved_activation_peak_bytes"] == peak
    assert tr.end_saved_tensors() == 0  # not running: nothing to stop


def test_live_tensor_bytes_hand_built():
    from efft.memory.tracker import LiveTensorBytes

    x = torch.randn(1000, requires_grad=True)  # exists before: not counted
    with LiveTensorBytes() as m:
        y = x.sin()  # +4000
        z = y.exp()  # +4000
        assert m.current_bytes == 8000
        del y  # still saved by sin's backward? no: sin saves x; y is freed
        z.add_(1.0)  # in place: no allocation
        v = z.view(10, 100)  # a view: no allocation
        assert m.current_bytes == 4000
        del z, v
    assert m.peak_bytes == 8000
    assert m.current_bytes == 0


@pytest.mark.parametrize("layerwise", [False, True])
def test_watch_gradients_peak(layerwise):
    """Whole-model step: all gradients at once. Layer-wise (updates in backward free each gradient):
    the peak is one parameter's gradient (the largest), even though the optimizer hooks came first."""
    from types import SimpleNamespace

    from efft.optim.factory import build_optimizer

    model = tiny_model("llama")
    opt = build_optimizer(model, SimpleNamespace(name="apollo_mini", layerwise=layerwise), lr=1e-3)
    tr = MemoryTracker(device="cpu")
    tr.watch_gradients(model)
    model(**tiny_batch(batch=1, seq=8)).loss.backward()
    opt.step()
    sizes = [p.numel() * 4 for p in model.parameters()]
    d = tr.report(model, opt)
    assert d["gradient_peak_bytes"] == (max(sizes) if layerwise else sum(sizes))
    assert "gradients (peak in backward)" in format_report(d)
    tr.unwatch_gradients()
    assert tr._grad_handles == []
