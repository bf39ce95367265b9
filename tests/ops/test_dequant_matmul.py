"""dequant_matmul: torch reference vs bitsandbytes, autograd.Function gradients vs plain autograd."""
import pytest
import torch

from efft.ops import dequant_matmul
from efft.ops.dequant_matmul import _dequantize

from .helpers import TOL, bnb_dequantize, quantize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_reference_matches_bitsandbytes(quant_type, nested):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    w_bnb, (packed, state) = bnb_dequantize(w, quant_type, 64, nested)
    x = torch.randn(2, 3, 128)
    b = torch.randn(48)
    y = dequant_matmul(x, packed, state, b, impl="torch")
    torch.testing.assert_close(y, x @ w_bnb.t() + b, **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["torch"])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_autograd_through_dequantize(impl, bias):
    torch.manual_seed(1)
    w = torch.randn(40, 72)
    packed, state = quantize(w, "nf4", 64, True)
    x = torch.randn(5, 72, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    dy = torch.randn(5, 40)
    y = dequant_matmul(x, packed, state, b, impl=impl)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = None if b is None else b.detach().clone().requires_grad_(True)
    w_ref = _dequantize(packed, state, torch.float32)
    y2 = torch.nn.functional.linear(x2, w_ref, b2)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, **TOL[torch.float32])
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float32])
    if bias:
        torch.testing.assert_close(b.grad, b2.grad, **TOL[torch.float32])


def test_backward_saves_no_dequantized_weight():
    w = torch.randn(64, 64)
    packed, state = quantize(w, "nf4", 64, False)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dequant_matmul(x, packed, state, impl="torch")
    assert all(t.dtype == torch.uint8 for t in saved), [(t.dtype, t.shape) for t in saved]


def test_errors_say_what_was_expected():
    w = torch.randn(16, 64)
    packed, state = quantize(w)
    with pytest.raises(ValueError, match="in_features=64"):
        dequant_matmul(torch.randn(2, 32), packed, state)
    with pytest.raises(ValueError, match="impl must be one of"):
        dequant_matmul(torch.randn(2, 64), packed, state, impl="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        dequant_matmul(torch.ones(2, 64, dtype=torch.int32), packed, state)
