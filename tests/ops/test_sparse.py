"""Sparse backward kernels (interpreter on CPU) vs their torch references and vs dense autograd.

The independent check: the gradient of a dense linear layer whose upstream gradient is zero on the
dropped rows equals the sparse weight gradient from the kept rows alone.
"""
import pytest
import torch

from efft.ops import (sparse_dequant_input_grad, sparse_dequant_input_grad_reference, sparse_input_grad,
                      sparse_input_grad_reference, sparse_weight_grad, sparse_weight_grad_reference)

from .helpers import TOL, bnb_dequantize, quantize

st = pytest.importorskip("efft.ops._sparse_triton")
tk = pytest.importorskip("efft.ops._dequant_matmul_triton")

WCONFIGS = {"auto": None, "split": dict(BLOCK_N=16, BLOCK_K=32, BLOCK_R=16, SPLIT_R=3)}
# (rows as leading shape, N, K, kept)
WSHAPES = [((2, 9), 40, 72, 7), ((33,), 24, 36, 33), ((5,), 17, 129, 1), ((3, 11), 64, 48, 20)]


def _idx(rows, kept, seed):
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:kept]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(WCONFIGS))
@pytest.mark.parametrize("i", range(len(WSHAPES)))
def test_weight_grad_matches_reference(i, config, dtype):
    lead, N, K, kept = WSHAPES[i]
    g = torch.Generator().manual_seed(i)
    dy = torch.randn(*lead, N, generator=g).to(dtype)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    rows = dy.numel() // N
    idx = _idx(rows, kept, i)
    scale = torch.rand(kept, generator=g) + 0.5 if i % 2 else None
    ref = sparse_weight_grad_reference(dy, x, idx, scale)
    got = st.sparse_weight_grad(dy.reshape(-1, N), x.reshape(-1, K), idx, scale, dtype, config=WCONFIGS[config])
    assert got.shape == (N, K) and got.dtype == dtype
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_grad_equals_dense_autograd_with_dropped_rows(dtype):
    torch.manual_seed(1)
    x = torch.randn(3, 8, 40).to(dtype)
    w = torch.randn(24, 40).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 8, 24).to(dtype)
    idx = torch.tensor([0, 5, 6, 13, 23], dtype=torch.int32)
    mask = torch.zeros(24, 1, dtype=dtype)
    mask[idx.long()] = 1
    (x @ w.t()).backward((dy.reshape(-1, 24) * mask).reshape(dy.shape))
    got = sparse_weight_grad(dy, x, idx, out_dtype=torch.float32, impl="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, w.grad.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(WCONFIGS))
def test_weight_grad_compact_x_with_repeated_indices(dtype, config):
    """WTA-CRS style: x holds only the saved rows; indices drawn with replacement repeat."""
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(30, 24, generator=g).to(dtype)
    idx = torch.tensor([3, 3, 0, 29, 7, 3, 12])
    x_kept = torch.randn(7, 40, generator=g).to(dtype)
    scale = torch.rand(7, generator=g) + 0.5
    want = ((dy[idx].float() * scale[:, None]).to(dtype).t() @ x_kept).to(dtype)
    got = st.sparse_weight_grad(dy, x_kept, idx, scale, dtype, config=WCONFIGS[config], x_compact=True)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(sparse_weight_grad(dy, x_kept, idx, scale, x_compact=True, impl="torch"), want,
                               **TOL[dtype])


def test_weight_grad_non_contiguous_and_mixed_dtype():
    torch.manual_seed(2)
    dy = torch.randn(24, 30).t()  # [30 rows, 24], stride (1, 30)
    x = torch.randn(30, 96)[:, ::2].half()  # fp16 x, cast to dy's fp32 in-kernel
    idx = torch.tensor([29, 0, 3, 17])
    torch.testing.assert_close(sparse_weight_grad(dy, x, idx, impl="triton"),
                               sparse_weight_grad_reference(dy, x, idx), **TOL[torch.float32])


def test_weight_grad_empty_idx():
    out = sparse_weight_grad(torch.randn(4, 8), torch.randn(4, 16), torch.zeros(0, dtype=torch.long), impl="triton")
    assert out.shape == (8, 16) and out.abs().sum() == 0


ICONFIGS = {"auto": None, "tile": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=1),
            "split": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(ICONFIGS))
@pytest.mark.parametrize("scatter", [False, True])
def test_input_grad_dense_matches_reference(dtype, config, scatter):
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(4, 9, 40, generator=g).to(dtype)
    w = torch.randn(40, 56, generator=g)  # fp32 weight, cast to dy's dtype in-kernel
    idx = _idx(36, 11, 3)
    out = out_ref = None
    if scatter:
        out = torch.full((36, 56), 7.0, dtype=dtype)
        out_ref = out.clone()
    ref = sparse_input_grad_reference(dy, w, idx, out_ref)
    got = tk.backward_input(dy, None, None, w=w, idx=idx, out=out, config=ICONFIGS[config])
    torch.testing.assert_close(got, ref, **TOL[dtype])
    if scatter:
        assert got is out
        untouched = torch.ones(36, dtype=torch.bool)
        untouched[idx] = False
        assert (out[untouched] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(ICONFIGS))
@pytest.mark.parametrize("nested", [False, True])
def test_input_grad_4bit_matches_reference(dtype, config, nested):
    torch.manual_seed(4)
    packed, state = quantize(torch.randn(40, 72), "nf4" if nested else "fp4", 64, nested)
    dy = torch.randn(2, 17, 40).to(dtype)
    idx = _idx(34, 9, 4)
    ref = sparse_dequant_input_grad_reference(dy, packed, state, idx)
    got = tk.backward_input(dy, packed, state, idx=idx, config=ICONFIGS[config])
    assert got.shape == (9, 72)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    out = torch.zeros(34, 72, dtype=torch.float32)
    sparse_dequant_input_grad(dy, packed, state, idx, out=out, impl="triton")
    torch.testing.assert_close(out[idx], ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_input_grad_one_kept_row_and_non_contiguous_dy(dtype):
    """M = 1 (a single kept token) and a transposed dY, for a dense W and a 4-bit W with odd K (rows
    start mid-byte, blocks cross rows), compact and scattered; reference: dY[idx] @ W in torch."""
    from efft.ops.dequant_matmul import _dequantize

    g = torch.Generator().manual_seed(8)
    dy = torch.randn(40, 30, generator=g).to(dtype).t()  # [30 rows, 40], stride (1, 30)
    assert not dy.is_contiguous()
    w = torch.randn(40, 56, generator=g)
    packed, state = quantize(torch.randn(40, 129, generator=g), "nf4", 64, True)
    w4 = _dequantize(packed, state, dtype)
    for idx in (torch.tensor([17]), torch.tensor([29, 0, 3, 17, 8])):
        torch.testing.assert_close(sparse_input_grad(dy, w, idx, impl="triton"), dy[idx] @ w.to(dtype), **TOL[dtype])
        want = dy[idx] @ w4
        got = sparse_dequant_input_grad(dy, packed, state, idx, impl="triton")
        assert got.shape == (idx.numel(), 129)
        torch.testing.assert_close(got, want, **TOL[dtype])
        out = torch.full((30, 129), 3.0, dtype=dtype)
        assert sparse_dequant_input_grad(dy, packed, state, idx, out=out, impl="triton") is out
        torch.testing.assert_close(out[idx], want, **TOL[dtype])
        rest = torch.ones(30, dtype=torch.bool)
        rest[idx] = False
        assert (out[rest] == 3.0).all()


def test_input_grad_4bit_matches_bitsandbytes():
    torch.manual_seed(5)
    w_bnb, (packed, state) = bnb_dequantize(torch.randn(48, 128), "nf4", 64, True)
    dy = torch.randn(20, 48)
    idx = torch.tensor([19, 2, 3, 11])
    torch.testing.assert_close(sparse_dequant_input_grad(dy, packed, state, idx, impl="triton"),
                               dy[idx] @ w_bnb, **TOL[torch.float32])


def test_public_input_grad_dispatch_and_errors():
    dy, w = torch.randn(6, 8), torch.randn(8, 16)
    idx = torch.tensor([1, 4])
    torch.testing.assert_close(sparse_input_grad(dy, w, idx, impl="triton"), dy[idx] @ w, **TOL[torch.float32])
    torch.testing.assert_close(sparse_input_grad(dy, w, idx, impl="auto"), dy[idx] @ w, **TOL[torch.float32])
    with pytest.raises(ValueError, match=r"w must be \[N, K\]"):
        sparse_input_grad(dy, torch.randn(16, 8), idx)
    with pytest.raises(TypeError, match="1-D int32/int64"):
        sparse_input_grad(dy, w, idx.float())
    with pytest.raises(ValueError, match="row_scale must have shape"):
        sparse_weight_grad(dy, torch.randn(6, 16), idx, row_scale=torch.ones(3))
    with pytest.raises(ValueError, match="len\\(idx\\) rows"):
        sparse_weight_grad(dy, torch.randn(6, 16), idx, x_compact=True)
    with pytest.raises(ValueError, match="same rows"):
        sparse_weight_grad(dy, torch.randn(5, 16), idx)
    with pytest.raises(ValueError, match="bfloat16 is not supported by the Triton CPU interpreter"):
        sparse_weight_grad(dy.bfloat16(), torch.randn(6, 16), idx, impl="triton")
