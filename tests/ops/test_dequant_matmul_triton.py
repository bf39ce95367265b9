"""Fused Triton dequant-matmul (run by the interpreter on CPU) vs its torch reference and bitsandbytes.

Every case is compared with the reference computed in the same dtype, within TOL[dtype]. Shapes are
small (the interpreter is ~1000x slower than torch) but cover: M = 1, M not a multiple of the tile,
K not a multiple of the blocksize (absmax blocks crossing rows), odd K and an odd number of
weights (rows starting mid-byte), each absmax addressing mode of the kernel (several blocks per K
tile, several tiles per block, per element), NF4/FP4, double quant, bias, non-contiguous inputs,
and both launch families (split-K for decode, tiles for training).
"""
import pytest
import torch

from efft.ops import dequant_matmul
from efft.ops.dequant_matmul import (_dequantize, dequant_matmul_backward_input_reference,
                                     dequant_matmul_reference)

from .helpers import TOL, bnb_dequantize, quantize

tk = pytest.importorskip("efft.ops._dequant_matmul_triton")

# (M, N, K, blocksize): what each exercises
SHAPES = [
    (1, 48, 128, 64),  # decode GEMV, K = 2 absmax blocks
    (33, 40, 72, 64),  # M, N not multiples of the tile; K % blocksize != 0 -> blocks cross rows
    (7, 24, 129, 64),  # odd K: rows start mid-byte
    (5, 17, 129, 32),  # odd number of weights (last byte half used)
    (16, 36, 128, 128),  # a K tile inside one absmax block
    (3, 32, 128, 32),  # several absmax blocks in one K tile
    (4, 80, 128, 32),  # nested: 320 absmax blocks -> 2 blocks of the second-level absmax
]
# launch families: None = what the public path picks (split-K for M <= 64), else pinned configs
CONFIGS = {
    "auto": None,
    "tile": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1),
    "splitk3": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3),
}
VARIANTS = [("nf4", False, True), ("fp4", True, False), ("nf4", True, True), ("fp4", False, False)]


def _case(i, shape):
    quant_type, nested, bias = VARIANTS[i % len(VARIANTS)]
    M, N, K, bs = shape
    g = torch.Generator().manual_seed(i)
    w = torch.randn(N, K, generator=g)
    packed, state = quantize(w, quant_type, bs, nested)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    return packed, state, x, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_forward_matches_reference(i, config, dtype):
    packed, state, x, b = _case(i, SHAPES[i])
    x = x.to(dtype)
    b = None if b is None else b.to(dtype)
    y = tk.forward(x, packed, state, b, config=CONFIGS[config])
    assert y.dtype == dtype and y.shape == (x.shape[0], state.shape[0])
    torch.testing.assert_close(y, dequant_matmul_reference(x, packed, state, b), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_backward_input_matches_reference(i, config, dtype):
    packed, state, x, _ = _case(i, SHAPES[i])
    dy = torch.randn(x.shape[0], state.shape[0], generator=torch.Generator().manual_seed(100 + i)).to(dtype)
    dx = tk.backward_input(dy, packed, state, config=CONFIGS[config])
    assert dx.dtype == dtype and dx.shape == x.shape
    torch.testing.assert_close(dx, dequant_matmul_backward_input_reference(dy, packed, state), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_and_leading_dims(dtype):
    torch.manual_seed(3)
    packed, state = quantize(torch.randn(24, 96), "nf4", 64, True)
    b = torch.randn(24).to(dtype)
    # transposed view: stride (1, M)
    xt = torch.randn(96, 9).to(dtype).t()
    assert not xt.is_contiguous()
    torch.testing.assert_close(dequant_matmul(xt, packed, state, b, impl="triton"),
                               dequant_matmul_reference(xt, packed, state, b), **TOL[dtype])
    # every other column of a wider tensor, with two leading dims
    x3 = torch.randn(2, 3, 192).to(dtype)[..., ::2]
    y = dequant_matmul(x3, packed, state, b, impl="triton")
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, dequant_matmul_reference(x3, packed, state, b), **TOL[dtype])
    dy = torch.randn(24, 2, 3).to(dtype).permute(1, 2, 0)
    torch.testing.assert_close(tk.backward_input(dy, packed, state),
                               dequant_matmul_backward_input_reference(dy, packed, state), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_autograd_gradient_equals_reference_autograd(dtype, bias, nested):
    """The autograd.Function's input gradient (Triton forward and backward) equals autograd through
    the reference dequantize + matmul."""
    torch.manual_seed(4)
    packed, state = quantize(torch.randn(40, 72), "nf4", 64, nested)
    x = torch.randn(2, 5, 72).to(dtype).requires_grad_(True)
    b = torch.randn(40).to(dtype).requires_grad_(True) if bias else None
    dy = torch.randn(2, 5, 40).to(dtype)
    y = dequant_matmul(x, packed, state, b, impl="triton")
    y.backward(dy)

    x2 = x.detach().clone().requires_grad_(True)
    b2 = None if b is None else b.detach().clone().requires_grad_(True)
    w = _dequantize(packed, state, dtype)
    y2 = x2 @ w.t() + (0 if b2 is None else b2)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, **TOL[dtype])
    torch.testing.assert_close(x.grad, x2.grad, **TOL[dtype])
    if bias:
        torch.testing.assert_close(b.grad, b2.grad, **TOL[dtype])


def test_backward_is_adjoint_of_forward():
    """The backward is the exact adjoint of the forward: <dy, f(x)> == <f*(dy), x> (fp32, tile path)."""
    torch.manual_seed(5)
    packed, state = quantize(torch.randn(24, 64), "fp4", 64, True)
    x = torch.randn(70, 64)
    dy = torch.randn(70, 24)
    cfg = CONFIGS["tile"]
    lhs = (dy * tk.forward(x, packed, state, config=cfg)).sum()
    rhs = (tk.backward_input(dy, packed, state, config=cfg) * x).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_matches_bitsandbytes(quant_type, nested):
    """Independent reference: bitsandbytes' own quantize + dequantize, then torch matmul."""
    torch.manual_seed(6)
    w = torch.randn(48, 128)
    w_bnb, (packed, state) = bnb_dequantize(w, quant_type, 64, nested)
    x = torch.randn(17, 128)
    b = torch.randn(48)
    torch.testing.assert_close(dequant_matmul(x, packed, state, b, impl="triton"), x @ w_bnb.t() + b,
                               **TOL[torch.float32])
    dy = torch.randn(17, 48)
    torch.testing.assert_close(tk.backward_input(dy, packed, state), dy @ w_bnb, **TOL[torch.float32])
    xh = x.half()
    torch.testing.assert_close(dequant_matmul(xh, packed, state, b.half(), impl="triton"),
                               xh @ w_bnb.half().t() + b.half(), **TOL[torch.float16])


def test_efft_and_bitsandbytes_states_agree_in_kernel():
    """The same weight quantized by efft.quant and by bitsandbytes gives the same kernel output."""
    torch.manual_seed(7)
    w = torch.randn(32, 128)
    _, (p_bnb, s_bnb) = bnb_dequantize(w, "nf4", 64, True)
    p, s = quantize(w, "nf4", 64, True)
    x = torch.randn(4, 128)
    torch.testing.assert_close(tk.forward(x, p, s), tk.forward(x, p_bnb, s_bnb), rtol=0, atol=0)


def test_empty_rows():
    packed, state = quantize(torch.randn(16, 64))
    y = dequant_matmul(torch.randn(0, 64), packed, state, impl="triton")
    assert y.shape == (0, 16)
