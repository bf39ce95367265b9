"""QuantLinear against bitsandbytes' Linear4bit / Linear8bitLt (CPU) and against plain torch
autograd through the dequantized weight."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from efft.quant import formats as E  # noqa: E402
from efft.quant.linear import QuantLinear  # noqa: E402


def _linear(i=128, o=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o, bias=bias)


def _bnb4(lin, qt, dq):
    b = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compress_statistics=dq,
                          quant_type=qt, compute_dtype=torch.float32)
    b.load_state_dict(lin.state_dict())
    return b.to("cpu")  # bitsandbytes quantizes on .to()


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_4bit_forward_backward_match_bitsandbytes_and_autograd(qt, dq):
    lin = _linear()
    q = QuantLinear.from_linear(lin, quant_type=qt, double_quant=dq, compute_dtype=torch.float32)
    b = _bnb4(lin, qt, dq)
    assert torch.equal(q.dequantize(), bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state))
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, b(x), rtol=0, atol=0)
    # reference: plain autograd through the dequantized weight
    xr = x.detach().clone().requires_grad_(True)
    w = q.dequantize().detach()
    bias = lin.bias.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, w, bias)
    dy = torch.randn_like(yr)
    q.bias.requires_grad_(True)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, bias.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_compute_dtype_and_output_dtype(compute):
    lin = _linear()
    q = QuantLinear.from_linear(lin, compute_dtype=compute)
    x = torch.randn(4, 128)
    y = q(x)
    assert y.dtype == torch.float32  # returns the input's dtype
    ref = (x.to(compute) @ q.dequantize(compute).t() + lin.bias.to(compute)).float()
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[compute]  # one rounding of the output dtype
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def _saved_bytes(fn):
    """Bytes of every tensor autograd saves for backward while fn runs, and their shapes."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("qt", ["nf4", "int8"])
def test_backward_keeps_no_dequantized_weight(qt):
    lin = _linear(256, 192)
    q = QuantLinear.from_linear(lin, quant_type=qt, compute_dtype=torch.float32)
    x = torch.randn(2, 256, requires_grad=True)
    y, saved = _saved_bytes(lambda: q(x))
    full = 192 * 256 * 4
    assert all(not (shape == (192, 256) and dt.is_floating_point) for shape, dt, _ in saved), saved
    assert sum(b for _, _, b in saved) <= q.quantized_nbytes() + x.numel() * 4, saved
    assert q.quantized_nbytes() < full / 3
    y.sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


def _fp16_exact_linear(i, o):
    """bitsandbytes casts the weight to fp16 before int8 quantization: give both the same input."""
    lin = _linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
    return lin


def test_int8_weight_only_matches_bitsandbytes_training_path():
    lin = _fp16_exact_linear(128, 40)
    q = QuantLinear.from_linear(lin, quant_type="int8", compute_dtype=torch.float32)
    b = bnb.nn.Linear8bitLt(128, 40, has_fp16_weights=False, threshold=0.0)
    b.load_state_dict(lin.state_dict())
    b = b.to("cpu").train()
    assert torch.equal(q.weight, b.weight.data) and torch.equal(q.SCB, b.weight.SCB)
    x = torch.randn(6, 128, requires_grad=True)
    xb = x.detach().clone().requires_grad_(True)
    y, yb = q(x), b(xb)
    torch.testing.assert_close(y, yb, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(x.grad, xb.grad, rtol=1e-6, atol=1e-6)


def test_int8_outlier_columns_match_bitsandbytes_llm_int8():
    lin = _fp16_exact_linear(128, 40)
    q = QuantLinear.from_linear(lin, quant_type="int8", compute_dtype=torch.float32, outlier_threshold=6.0)
    b = bnb.nn.Linear8bitLt(128, 40, has_fp16_weights=False, threshold=6.0)
    b.load_state_dict(lin.state_dict())
    b = b.to("cpu").eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 128, generator=g)
    x[:, 7] *= 20  # outlier feature dimensions, as in LLM.int8()
    x[2, 90] = -11.0
    x = x.half().float()  # bitsandbytes casts activations to fp16 here: same input for both
    with torch.no_grad():
        y, yb = q(x), b(x)
    torch.testing.assert_close(y, yb, rtol=1e-5, atol=1e-4)
    # the outlier columns really are computed in floating point: error vs the exact product is small
    exact = torch.nn.functional.linear(x, q.dequantize(), lin.bias.detach())
    assert (y - exact).abs().max() < 0.05 * exact.abs().max()


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="power of two.*got 48"):
        QuantLinear(64, 64, blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        QuantLinear(64, 64, quant_type="int4")
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        QuantLinear(64, 64, compute_dtype="int8")
    q = QuantLinear(64, 32)
    with pytest.raises(ValueError, match=r"weight has shape \(64, 32\), expected \(32, 64\)"):
        q.quantize_weight_(torch.randn(64, 32))
    with pytest.raises(TypeError, match="float32/float16/bfloat16.*torch.int64"):
        q.quantize_weight_(torch.ones(32, 64, dtype=torch.long))


def test_quantization_error_is_what_the_format_promises():
    """SQNR of NF4 on Gaussian weights is about 20 dB (QLoRA); int8 row-wise about 40 dB."""
    lin = _linear(512, 256)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    w = lin.weight.detach()

    def sqnr(wq):
        return 10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum()).item()

    nf4 = sqnr(QuantLinear.from_linear(lin, quant_type="nf4").dequantize())
    fp4 = sqnr(QuantLinear.from_linear(lin, quant_type="fp4").dequantize())
    i8 = sqnr(QuantLinear.from_linear(lin, quant_type="int8").dequantize())
    assert 18 < nf4 < 23 and 14 < fp4 < nf4 and 38 < i8 < 46, (nf4, fp4, i8)


def test_dtype_casts_leave_the_format_alone():
    """model.to(bfloat16) casts the bias, never the float32 statistics or the codes."""
    lin = _linear()
    q = QuantLinear.from_linear(lin, compute_dtype=torch.bfloat16, double_quant=True)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    w = q.dequantize()
    q.to(torch.bfloat16)
    q.half()
    after = q.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert q.bias.dtype == torch.float16
    assert torch.equal(q.dequantize(), w)


def test_lora_on_int8_base_matches_reference():
    from efft.quant.peft import apply_lora

    lin = _linear(64, 32)
    net = torch.nn.Sequential(QuantLinear.from_linear(lin, quant_type="int8", compute_dtype=torch.float32))
    ref = torch.nn.Sequential(torch.nn.Linear(64, 32))
    ref[0].weight.data.copy_(net[0].dequantize())
    ref[0].bias.data.copy_(lin.bias.detach())
    cfg = {"type": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["0"], "task_type": None}
    pq, pr = apply_lora(net, cfg), apply_lora(ref, cfg)
    for m in (pq, pr):
        torch.manual_seed(1)
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data.normal_()
    x = torch.randn(5, 64)
    pq(x).square().sum().backward()
    pr(x).square().sum().backward()
    gq = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    gr = {n: p.grad for n, p in pr.named_parameters() if p.requires_grad}
    assert sorted(gq) == sorted(gr) and len(gq) == 2
    for n in gq:
        torch.testing.assert_close(gq[n], gr[n], rtol=1e-5, atol=1e-5)


def test_triton_kernel_path_matches_torch_reference():
    """kernel="triton" runs efft.ops' fused kernel (CUDA, or the interpreter on CPU)."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and the Triton interpreter is off")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lin = _linear(128, 64).to(dev)
    qt = QuantLinear.from_linear(lin, compute_dtype=torch.float32, kernel="triton", double_quant=True)
    qr = QuantLinear.from_linear(lin, compute_dtype=torch.float32, kernel="torch", double_quant=True)
    x = torch.randn(4, 128, device=dev, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = qt(x), qr(xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
