"""NF4/FP4/8-bit/int8 formats against bitsandbytes' CPU implementation (the independent reference):
packed bytes, absmax, offset and nested statistics must be EQUAL, not close."""
import itertools

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from efft.quant import formats as E  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(64, 64), (7, 9), (3,), (33, 70), (96, 300), (513, 17), (2, 3, 40)]
BLOCKS = [32, 64, 256, 4096]


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * (0.02 + 3 * torch.rand(1, generator=g))
    if w.numel() > 10:  # a few outliers and exact zeros
        flat = w.view(-1)
        flat[::7] *= 8
        flat[3::11] = 0
    return w.to(dtype)


def _plain_dequant(packed, absmax, code, blocksize, n):
    """Independent formula: unpack by hand, code value times its block's absmax."""
    b = packed.reshape(-1).long()
    codes = torch.stack([b // 16, b % 16], dim=1).reshape(-1)[:n]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return code[codes] * scale


def test_code_books_match_bitsandbytes():
    assert torch.equal(E.get_4bit_code("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(E.get_4bit_code("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(E.create_dynamic_map(signed=signed), bnbF.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_equals_bitsandbytes(dtype, quant_type, double_quant):
    for i, (shape, bs) in enumerate(itertools.product(SHAPES, BLOCKS)):
        w = _weights(shape, dtype, seed=i)
        ref_p, ref = bnbF.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=double_quant)
        p, st = E.quantize_4bit(w, quant_type=quant_type, blocksize=bs, compress_statistics=double_quant)
        where = f"{shape} bs={bs}"
        assert p.dtype == torch.uint8 and p.shape == ref_p.shape, where
        assert torch.equal(p, ref_p), f"packed bytes differ for {where}"
        assert torch.equal(st.absmax, ref.absmax), f"absmax differs for {where}"
        assert torch.equal(st.code, ref.code)
        assert st.shape == ref.shape and st.dtype == ref.dtype and st.blocksize == bs
        if double_quant:
            assert st.absmax.dtype == torch.uint8
            assert torch.equal(st.offset, ref.offset), where
            assert torch.equal(st.state2.absmax, ref.state2.absmax), where
            assert torch.equal(st.state2.code, ref.state2.code), where
            assert st.state2.blocksize == ref.state2.blocksize == 256
        # dequantize: equal to an independent formula everywhere ...
        n = w.numel()
        scales = E.dequantize_absmax(st)
        want = _plain_dequant(p, scales, st.code, bs, n).reshape(shape).to(dtype)
        got = E.dequantize_4bit(p, st)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, want), where
        # ... and to bitsandbytes' C kernel where it is right: its AVX512 kernel mis-scales blocks
        # that cross a row boundary (e.g. 64x64 with blocksize 128); other shapes go to a
        # torch.compile'd fallback, too slow to compile here
        if len(shape) == 2 and shape[-1] % 2 == 0 and shape[-1] % bs == 0:
            assert torch.equal(got, bnbF.dequantize_4bit(ref_p, ref)), where


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_blocksize_equals_bitsandbytes(quant_type, double_quant):
    """All eight blocksizes 32..4096 (the main test covers four on many shapes). 131x100 weights:
    the last block is partial for every size; at 32, the 410 absmax values fill two nested blocks."""
    assert E.BLOCKSIZES_4BIT == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    for i, bs in enumerate(E.BLOCKSIZES_4BIT):
        w = _weights((131, 100), torch.float16, seed=100 + i)
        ref_p, ref = bnbF.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=double_quant)
        p, st = E.quantize_4bit(w, quant_type=quant_type, blocksize=bs, compress_statistics=double_quant)
        assert torch.equal(p, ref_p) and torch.equal(st.absmax, ref.absmax), bs
        if double_quant:
            assert torch.equal(st.offset, ref.offset) and torch.equal(st.state2.absmax, ref.state2.absmax), bs
        want = _plain_dequant(p, E.dequantize_absmax(st), st.code, bs, w.numel()).reshape(w.shape).to(w.dtype)
        assert torch.equal(E.dequantize_4bit(p, st), want), bs


def test_single_element_and_tiny_tensors():
    for n in (1, 2, 3):
        w = torch.randn(n)
        for dq in (False, True):
            p, st = E.quantize_4bit(w, compress_statistics=dq)
            rp, rst = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            assert torch.equal(p, rp) and torch.equal(st.absmax, rst.absmax)


def test_fp4_zero_codes_and_ties():
    """Values near zero and exactly between codes: bitsandbytes' choice, not ours."""
    vals = [1.0, 0.001, -0.001, 0.0, -0.0, 0.0026, -0.0027, 0.004, 0.5 * (0.6961928009986877 + 0.5250730514526367)]
    w = torch.tensor(vals + [0.0] * (64 - len(vals)))
    for qt in ("nf4", "fp4"):
        assert torch.equal(E.quantize_4bit(w, qt)[0], bnbF.quantize_4bit(w, blocksize=64, quant_type=qt)[0])


def test_zero_blocks():
    w = torch.zeros(4, 100)
    w[0, 0] = 1.0
    for dq in (False, True):
        p, st = E.quantize_4bit(w, compress_statistics=dq)
        rp, rst = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        assert torch.equal(p, rp) and torch.equal(st.absmax, rst.absmax)
        assert torch.equal(E.dequantize_4bit(p, st), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blockwise_8bit_bnb_cpu_rounding_equals_bitsandbytes(dtype):
    for n, bs in itertools.product([1, 5, 256, 1000, 20000], [64, 100, 256, 4096]):
        g = torch.Generator().manual_seed(n + bs)
        x = (torch.randn(n, generator=g) * torch.logspace(-6, 0, n)).to(dtype)  # spans decades
        q, absmax = E.quantize_blockwise(x, blocksize=bs, rounding="bnb_cpu")
        rq, rst = bnbF.quantize_blockwise(x, blocksize=bs)
        assert torch.equal(q, rq), f"n={n} bs={bs}"
        assert torch.equal(absmax, rst.absmax)
        assert torch.equal(E.dequantize_blockwise(q, absmax, blocksize=bs, dtype=dtype), bnbF.dequantize_blockwise(rq, rst))


def test_blockwise_8bit_nearest_is_nearest_and_beats_the_grid():
    """"nearest" picks the closest code (checked by brute force) and is more accurate near zero
    than the 65536-point grid rule, which sends an exact 0 to 2.1e-5 x absmax."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, generator=g) * torch.logspace(-7, 0, 700)
    code = E.create_dynamic_map()
    q, absmax = E.quantize_blockwise(x, blocksize=256)
    assert q.shape == x.shape and absmax.shape == (-(-2100 // 256),)
    scaled = (x.reshape(-1) / absmax.repeat_interleave(256)[:2100])
    best = (scaled[:, None] - code[None, :]).abs().argmin(1)
    assert torch.equal(code[q.reshape(-1).long()], code[best])
    err_nearest = (E.dequantize_blockwise(q, absmax, blocksize=256) - x).abs().sum()
    q2, a2 = E.quantize_blockwise(x, blocksize=256, rounding="bnb_cpu")
    err_grid = (E.dequantize_blockwise(q2, a2, blocksize=256) - x).abs().sum()
    assert err_nearest < err_grid
    z = torch.zeros(256)
    z[0] = 1
    assert E.dequantize_blockwise(*E.quantize_blockwise(z, blocksize=256), blocksize=256)[1] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_rowwise_equals_bitsandbytes(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 80, generator=g).clamp(-4, 4).to(dtype)
    q, absmax, cols = E.quantize_int8_rowwise(w)
    rq, rabs, rcols = torch.ops.bitsandbytes.int8_vectorwise_quant(w.clone(), 0.0)
    assert cols is None and rcols is None
    assert torch.equal(q, rq) and torch.equal(absmax, rabs)
    assert torch.equal(E.dequantize_int8_rowwise(q, absmax), torch.ops.bitsandbytes.int8_vectorwise_dequant(rq, rabs))
    # with outliers (LLM.int8()): same columns, same codes, same row statistics
    w = w.clone()
    w[3, 5] = 9.0
    w[10, 70] = -7.5
    q, absmax, cols = E.quantize_int8_rowwise(w, threshold=6.0)
    rq, rabs, rcols = torch.ops.bitsandbytes.int8_vectorwise_quant(w.clone(), 6.0)
    assert cols.tolist() == rcols.tolist() == [5, 70]
    assert torch.equal(q, rq) and torch.equal(absmax, rabs)


def test_bad_input_names_what_was_expected():
    with pytest.raises(TypeError, match="float32/float16/bfloat16.*torch.int32"):
        E.quantize_4bit(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="power of two.*got 48"):
        E.quantize_4bit(torch.ones(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="power of two.*got 8192"):
        E.quantize_4bit(torch.ones(4, 64), blocksize=8192)
    with pytest.raises(ValueError, match="'nf4' or 'fp4'.*'int4'"):
        E.quantize_4bit(torch.ones(4, 64), quant_type="int4")
    with pytest.raises(ValueError, match="non-empty"):
        E.quantize_4bit(torch.ones(0, 64))
    with pytest.raises(TypeError, match="float32/float16/bfloat16.*torch.int64"):
        E.quantize_blockwise(torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="positive int"):
        E.quantize_blockwise(torch.ones(10), blocksize=0)
    with pytest.raises(TypeError, match="float32/float16/bfloat16.*torch.uint8"):
        E.quantize_int8_rowwise(torch.ones(4, 4, dtype=torch.uint8))
    p, st = E.quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="packs into 256 bytes, got 255"):
        E.dequantize_4bit(p[:-1], st)
