"""Number formats of quantized weights: NF4/FP4 codes, blockwise absmax, packing, double quant,
the 8-bit dynamic map, and int8 row-wise absmax (LLM.int8()).

Plain torch, vectorized, any device. The 4-bit quantizer reproduces bitsandbytes' CPU results byte
for byte (packed codes, absmax, nested statistics), so checkpoints move between the two:

* scale: full blocks are multiplied by ``1 / absmax`` (absmax clamped at 1e-38 for the division
  only), the trailing partial block is divided by its absmax, which is stored clamped;
* code choice: nearest code, a value exactly between two codes takes the lower one; for FP4 the
  codes are searched in value order (its two zeros: scaled values in (-eps, 0] take code 0, values
  in (0, eps] take code 8, as bitsandbytes' ordering does);
* packing: row-major flatten, element 2p in the high nibble of byte p; bytes shaped ``[(n+1)//2, 1]``;
* double quant: ``offset = absmax.mean()``; ``absmax - offset`` is quantized with the 8-bit dynamic
  map in blocks of 256, nested absmax in float32.

The 8-bit blockwise quantizer has two rounding rules. ``"nearest"`` is the exact nearest code (what
the CUDA kernels intend; best for values spanning decades, such as optimizer moments).
``"bnb_cpu"`` is bitsandbytes' CPU rule: the normalized value is snapped to a 65536-point grid on
[-1, 1] and the grid point's nearest code is taken. It is coarser near zero (an exact 0 becomes
code 131 = 2.1e-5 x absmax) but it is what bitsandbytes' CPU backend writes, so double-quantized
statistics use it by default to stay byte-equal with bitsandbytes on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from .state import QuantState

__all__ = [
    "NF4_CODE", "FP4_CODE", "BLOCKSIZES_4BIT", "NESTED_BLOCKSIZE",
    "get_4bit_code", "create_dynamic_map", "dynamic_map",
    "quantize_blockwise", "dequantize_blockwise",
    "pack_4bit", "unpack_4bit", "quantize_4bit", "dequantize_4bit", "dequantize_absmax",
    "quantize_int8_rowwise", "dequantize_int8_rowwise",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_TINY = 1e-38  # bitsandbytes' clamp on the absmax used as a divisor

# NormalFloat4 (QLoRA): quantiles of N(0, 1) scaled to [-1, 1]; index order = value order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, / 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_RAW)
# Codes of FP4 sorted by value, with the tie between +0 (code 0) and -0 (code 8) in the order
# bitsandbytes' CPU quantizer uses.
_FP4_VALUE_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

_cache: dict = {}


def _cached(key, make):
    t = _cache.get(key)
    if t is None:
        t = _cache[key] = make()
    return t


def get_4bit_code(quant_type: str, device=None) -> torch.Tensor:
    """The 16 values of a 4-bit code book (float32), indexed by code."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    device = torch.device("cpu" if device is None else device)
    values = NF4_CODE if quant_type == "nf4" else FP4_CODE
    return _cached(("code4", quant_type, device), lambda: torch.tensor(values, dtype=torch.float32, device=device))


def _4bit_search(quant_type: str, device):
    """(midpoints between value-sorted codes, code index of each sorted position)."""
    def make():
        code = get_4bit_code(quant_type, "cpu")
        order = torch.arange(16) if quant_type == "nf4" else torch.tensor(_FP4_VALUE_ORDER)
        s = code[order]
        mids = (s[:-1] + s[1:]) / 2
        return mids.to(device), order.to(torch.uint8).to(device)
    return _cached(("search4", quant_type, torch.device(device)), make)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (8-bit) data type of Dettmers (2015): a sign, a run-length exponent in base 10 and
    a linear fraction, sorted ascending in [-1, 1]. Same construction and float32 rounding as
    bitsandbytes, so the 256 values are bit-identical.
    """
    non_sign = total_bits - 1
    values: list[float] = []

    def fractions(n_items: int, scale: float):
        edges = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        mid = (edges[:-1] + edges[1:]) / 2.0
        vals = (scale * mid).tolist()
        values.extend(vals)
        if signed:
            values.extend((-scale * mid).tolist())

    for e in range(max_exponent_bits):
        width = e + non_sign - max_exponent_bits + (0 if signed else 1)
        fractions(int(2 ** width + 1), 10 ** (-(max_exponent_bits - 1) + e))
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    if extra > 0:
        fractions(extra + 1, 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(f"dynamic map with {max_exponent_bits} exponent bits has {len(values)} values, "
                         f"expected {2 ** total_bits}")
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device=None) -> torch.Tensor:
    """The default signed 8-bit dynamic map (256 values), cached per device."""
    device = torch.device("cpu" if device is None else device)
    return _cached(("dynamic", device), lambda: create_dynamic_map().to(device))


# ------------------------------------------------------------------------------------------ checks
def _check_float(A: torch.Tensor, what: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: expected a float32/float16/bfloat16 tensor, got {A.dtype} "
                        f"(shape {tuple(A.shape)})")
    if A.numel() == 0:
        raise ValueError(f"{what}: expected a non-empty tensor, got shape {tuple(A.shape)}")


def _check_blocksize(blocksize, allowed=None, what="blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"{what} must be a positive int, got {blocksize!r}")
    if allowed is not None and blocksize not in allowed:
        raise ValueError(f"{what} must be a power of two in {allowed[0]}..{allowed[-1]}, got {blocksize}")


# ---------------------------------------------------------------------------------- block scaling
def _blocks(flat: torch.Tensor, blocksize: int):
    """Zero-pad a flat float32 tensor to whole blocks: [n_blocks, blocksize], and the tail length."""
    n = flat.numel()
    rem = n % blocksize
    if rem:
        flat = torch.nn.functional.pad(flat, (0, blocksize - rem))
    return flat.view(-1, blocksize), rem


def _absmax_scale(A: torch.Tensor, blocksize: int):
    """Per-block absmax (float32) and A scaled into [-1, 1], bitsandbytes' arithmetic."""
    blocks, rem = _blocks(A.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    if rem:
        # the partial last block: clamped absmax is stored, values are divided (not multiplied)
        absmax[-1] = absmax[-1].clamp(min=_TINY)
    scaled = blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)
    if rem:
        scaled[-1] = blocks[-1] / absmax[-1]
    return absmax, scaled.clamp_(-1.0, 1.0)


# -------------------------------------------------------------------------------- 8-bit blockwise
_LUT_POINTS = 65536


def _lut(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 grid points on [-1, 1]: the nearest code (the lower one on a tie)."""
    code = code.float()
    key = ("lut", code.device, tuple(code.tolist()))

    def make():
        i = torch.arange(_LUT_POINTS, dtype=torch.float32, device=code.device)
        grid = -1.0 + (2.0 * i) / float(_LUT_POINTS - 1)
        mids = 0.5 * (code[:-1] + code[1:])
        return torch.searchsorted(mids, grid, right=False).to(torch.uint8)
    return _cached(key, make)


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 4096,
                       rounding: str = "nearest"):
    """8-bit blockwise absmax quantization of any float tensor.

    Returns ``(q, absmax)``: uint8 codes of A's shape and float32 absmax, one per ``blocksize``
    consecutive elements of the row-major flattened tensor (the last block may be partial).
    ``code`` is an ascending table of 256 values in [-1, 1] (default: the dynamic map).
    ``rounding``: "nearest" or "bnb_cpu" (see the module docstring).
    """
    _check_float(A, "quantize_blockwise")
    _check_blocksize(blocksize)
    code = dynamic_map(A.device) if code is None else code.to(device=A.device, dtype=torch.float32)
    if code.dim() != 1 or code.numel() < 2:
        raise ValueError(f"quantize_blockwise: code must be a 1-D ascending table, got shape {tuple(code.shape)}")
    if rounding not in ("nearest", "bnb_cpu"):
        raise ValueError(f"rounding must be 'nearest' or 'bnb_cpu', got {rounding!r}")
    n = A.numel()
    flat = A.reshape(-1).float()
    blocks, rem = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if rounding == "nearest":
        scaled = (blocks / absmax.clamp(min=_TINY).unsqueeze(1)).clamp_(-1.0, 1.0)
        mids = 0.5 * (code[:-1] + code[1:])
        q = torch.searchsorted(mids, scaled.reshape(-1), right=False).to(torch.uint8)
    else:
        # bitsandbytes CPU: v * (1/absmax), grid index trunc((v + 1) * 0.5 * 65535 + 0.5), table lookup;
        # an all-zero block gets codes 0.
        inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
        v = (blocks * inv.unsqueeze(1)).clamp_(-1.0, 1.0)
        idx = ((v + 1.0) * 0.5 * float(_LUT_POINTS - 1) + 0.5).to(torch.int64)
        q = _lut(code)[idx]
        q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q).reshape(-1)
    q = q[:n] if q.numel() == n else q[:n].clone()  # no padding kept alive behind a view
    return q.reshape(A.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None,
                         blocksize: int = 4096, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in float32, cast to ``dtype``."""
    if q.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: expected uint8 codes, got {q.dtype}")
    _check_blocksize(blocksize)
    n = q.numel()
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"dequantize_blockwise: {n} codes in blocks of {blocksize} need {n_blocks} absmax "
                         f"values, got {absmax.numel()}")
    code = dynamic_map(q.device) if code is None else code.to(device=q.device, dtype=torch.float32)
    vals, _ = _blocks(code[q.reshape(-1).long()], blocksize)
    out = (vals * absmax.float().reshape(-1, 1)).reshape(-1)[:n]
    return out.reshape(q.shape).to(dtype)


# --------------------------------------------------------------------------------------- 4-bit
def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes (0..15) -> bytes ``[(n+1)//2, 1]``: element 2p high nibble, 2p+1 low nibble."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    c = c.view(-1, 2)
    return ((c[:, 0] << 4) | c[:, 1]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Bytes -> the first ``n`` 4-bit codes (uint8), in element order."""
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    return torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)[:n]


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  compress_statistics: bool = False):
    """NF4/FP4 blockwise quantization: ``(packed uint8 [(n+1)//2, 1], QuantState)``.

    Equal to ``bitsandbytes.functional.quantize_4bit`` on CPU for the same input (bytes, absmax,
    offset, nested absmax and map). ``compress_statistics`` = double quantization of absmax.
    """
    _check_float(w, "quantize_4bit")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    absmax, scaled = _absmax_scale(w, blocksize)
    mids, order = _4bit_search(quant_type, w.device)
    n = w.numel()
    # an odd count is padded with the code of 0.0 (the block padding is zeros), as bitsandbytes does
    pos = torch.searchsorted(mids, scaled.reshape(-1)[: n + n % 2], right=False, out_int32=True)
    packed = pack_4bit(pos if quant_type == "nf4" else order[pos])  # NF4 codes are in value order
    code = get_4bit_code(quant_type, w.device).clone()
    if not compress_statistics:
        state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code)
        return packed, state
    offset = absmax.mean()
    qabs, absmax2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE, rounding="bnb_cpu")
    state2 = QuantState(absmax=absmax2, shape=qabs.shape, dtype=torch.float32, blocksize=NESTED_BLOCKSIZE,
                        quant_type="dynamic", code=dynamic_map(w.device).clone())
    state = QuantState(absmax=qabs, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code, offset=offset, state2=state2)
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 per-block scales of a 4-bit state (undoing double quantization if present)."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    return dequantize_blockwise(state.absmax, s2.absmax, s2.code, s2.blocksize) + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, cast to ``dtype`` (default ``state.dtype``), shaped ``state.shape``."""
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit: expected an efft QuantState, got {type(state).__name__}")
    n = state.numel
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit: a weight of shape {tuple(state.shape)} packs into {(n + 1) // 2} "
                         f"bytes, got {packed.numel() * packed.element_size()}")
    _check_blocksize(state.blocksize, BLOCKSIZES_4BIT, "state.blocksize")
    n_blocks = -(-n // state.blocksize)
    if state.absmax.numel() != n_blocks:
        raise ValueError(f"dequantize_4bit: {n} values in blocks of {state.blocksize} need {n_blocks} absmax "
                         f"values, got {state.absmax.numel()}")
    absmax = dequantize_absmax(state)
    # one gather per byte: a 256-entry table of (high nibble value, low nibble value) float32
    # pairs, each pair read as one 8-byte item so the gather is 1-D
    pairs = state.code.to(packed.device, torch.float32)[_nibble_table(packed.device)].contiguous()
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    vals = pairs.view(torch.int64).reshape(256).index_select(0, p.int()).view(torch.float32)
    if vals.numel() != n_blocks * state.blocksize:
        vals = torch.nn.functional.pad(vals[:n], (0, n_blocks * state.blocksize - n))
    out = vals.view(n_blocks, state.blocksize).mul_(absmax.reshape(-1, 1)).reshape(-1)[:n]  # fresh: in place
    return out.reshape(state.shape).to(dtype or state.dtype)


def _nibble_table(device) -> torch.Tensor:
    """[256, 2] int64: the high and low 4-bit code of every byte value."""
    def make():
        b = torch.arange(256)
        return torch.stack((b >> 4, b & 0xF), dim=1).to(device)
    return _cached(("nibbles", torch.device(device)), make)


# ---------------------------------------------------------------------------------------- int8
def quantize_int8_rowwise(w: torch.Tensor, threshold: Optional[float] = None):
    """Row-wise absmax int8 (LLM.int8()'s vector-wise quantization), as bitsandbytes does it.

    Returns ``(q int8 [rows, cols], absmax float32 [rows], outlier_cols or None)``: each row scaled
    by ``127 / absmax``, rounded half to even. With ``threshold``, entries with ``|x| >= threshold``
    are left out of the row statistics, the columns holding any of them are listed in
    ``outlier_cols`` and set to 0 in ``q`` (the caller computes those columns in floating point).
    """
    _check_float(w, "quantize_int8_rowwise")
    if w.dim() < 2:
        raise ValueError(f"quantize_int8_rowwise: expected a tensor with >= 2 dims [..., cols], got shape {tuple(w.shape)}")
    if threshold is not None and not threshold > 0:
        raise ValueError(f"quantize_int8_rowwise: threshold must be > 0 (or None), got {threshold}")
    a = w.reshape(-1, w.shape[-1])
    cols = None
    if threshold is not None:
        out_mask = a.abs() >= threshold
        cols = torch.nonzero(out_mask.any(dim=0)).view(-1)
        a = a.masked_fill(out_mask, 0)
    absmax = a.abs().amax(dim=1).float()
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))  # an all-zero row stays 0
    q = torch.round(a * scale.unsqueeze(1)).to(torch.int8)
    if cols is not None and a.shape[0] > 1:
        q[:, cols] = 0
    return q.reshape(w.shape), absmax, cols


def dequantize_int8_rowwise(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * absmax[row] * (1/127)`` in float32 (bitsandbytes' order of operations), cast to ``dtype``."""
    if q.dtype != torch.int8:
        raise TypeError(f"dequantize_int8_rowwise: expected int8 codes, got {q.dtype}")
    rows = q.numel() // q.shape[-1]
    if absmax.numel() != rows:
        raise ValueError(f"dequantize_int8_rowwise: {rows} rows need {rows} absmax values, got {absmax.numel()}")
    out = q.reshape(rows, -1).float() * absmax.float().reshape(-1, 1) * (1.0 / 127.0)
    return out.reshape(q.shape).to(dtype)
