"""PEQA: scale gradients equal autograd through an fp32 reference dequantization; the loss falls
when only scales train; the trained model saves and loads in the 4-bit layout."""
import pytest
import torch

from efft.quant import QuantLinear, load_quantized, quantize_model, save_quantized
from efft.quant.peqa import PEQALinear, export_peqa, prepare_peqa
from tests.tiny import tiny_batch, tiny_model


def _reference_weight(q: QuantLinear, scales: torch.Tensor, granularity: str) -> torch.Tensor:
    """Plain autograd: unpacked code values (constants) times scales, by an independent route."""
    n = q.in_features * q.out_features
    if q.quant_type == "int8":
        vals = q.weight.float().reshape(-1) / 127.0
        bs = q.in_features
    else:
        b = q.weight.reshape(-1).long()
        idx = torch.stack([b // 16, b % 16], 1).reshape(-1)[:n]
        vals = q.quant_map[idx]
        bs = q.blocksize
    if granularity == "channel":
        base = PEQALinear(q, "block").block_scales.detach()
        scales = base * scales.repeat_interleave(q.in_features // bs)
    return (vals * scales.repeat_interleave(bs)[:n]).view(q.out_features, q.in_features)


CASES = [(qt, dq, (48, 128), g) for qt, dq in [("nf4", False), ("nf4", True), ("int8", False)]
         for g in ("block", "channel")] + [("fp4", False, (7, 40), "block")]  # 280 weights: partial block


@pytest.mark.parametrize("qt,dq,shape,granularity", CASES)
def test_scale_grads_match_autograd_through_reference_dequant(qt, dq, shape, granularity):
    torch.manual_seed(0)
    lin = torch.nn.Linear(shape[1], shape[0])
    q = QuantLinear.from_linear(lin, quant_type=qt, double_quant=dq, compute_dtype=torch.float32)
    p = PEQALinear(q, granularity, train_bias=True)
    with torch.no_grad():  # move away from the initial point so every term matters
        for prm in p.parameters():
            prm.mul_(1 + 0.1 * torch.randn_like(prm))
    trained = p.channel_scales if granularity == "channel" else p.block_scales
    ref_scales = trained.detach().clone().requires_grad_(True)
    ref_bias = p.bias.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = p(x)
    yr = torch.nn.functional.linear(xr, _reference_weight(q, ref_scales, granularity), ref_bias)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(trained.grad, ref_scales.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.bias.grad, ref_bias.grad, rtol=1e-5, atol=1e-6)


def test_backward_saves_the_input_and_scales_only():
    q = QuantLinear.from_linear(torch.nn.Linear(256, 192), compute_dtype=torch.float32)
    p = PEQALinear(q)
    saved = []
    x = torch.randn(4, 256)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        p(x).sum().backward()
    assert all(t.numel() < 192 * 256 for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("granularity", ["block", "channel"])
def test_loss_falls_training_only_scales(granularity):
    model = prepare_peqa(quantize_model(tiny_model("llama"), type="nf4", compute_dtype="float32"), granularity)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("block_scales", "channel_scales")) for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = tiny_batch(seq=16)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("dq", [False, True])
def test_trained_model_saves_and_loads_in_4bit_layout(tmp_path, dq):
    model = prepare_peqa(quantize_model(tiny_model("llama"), type="nf4", double_quant=dq, compute_dtype="float32"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    batch = tiny_batch()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    export_peqa(model)
    save_quantized(model, str(tmp_path / "peqa"))
    fresh = quantize_model(tiny_model("llama", seed=3), type="nf4", compute_dtype="float32")
    load_quantized(fresh, str(tmp_path / "peqa"))
    assert all(m.double_quant == dq for m in fresh.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        got = fresh(input_ids=batch["input_ids"]).logits
    # exact scales without double quant; 8-bit re-quantized scales with it
    tol = 2e-2 if dq else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_prepare_peqa_needs_a_quantized_model():
    with pytest.raises(ValueError, match="no QuantLinear layers; quantize it first"):
        prepare_peqa(tiny_model("llama"))
    q = QuantLinear.from_linear(torch.nn.Linear(40, 8))
    with pytest.raises(ValueError, match="in_features=40 is not a multiple of blocksize=64"):
        PEQALinear(q, "channel")
