"""Block-wise absmax int8 weights that can be trained: encode/decode, stochastic rounding, scale refresh.

Format (symmetric linear int8, one float32 scale per ``blocksize`` consecutive elements of the
row-major flattened weight, the last block may be partial)::

    w = code * scale[block]          code in [-127, 127] (int8),  scale = absmax(block) / 127

With ``blocksize`` equal to the row length this is LLM.int8()'s row-wise absmax format
(``efft.quant.formats.quantize_int8_rowwise``), and nearest rounding gives the same codes.

Why stochastic rounding: an optimizer update smaller than half a quantization step is erased by
round-to-nearest every time, so training stalls once updates shrink below ``scale / 2``. Rounding
up with probability equal to the fractional part (``floor(x + u)``, ``u ~ U[0, 1)``) keeps the
expected stored value equal to the high-precision one, so small updates accumulate in expectation.

Write-back keeps each block's grid unless the block's range changed (its new absmax exceeds the
largest code, or shrank below ``shrink`` of it): re-gridding a block re-rounds every element and
adds rounding noise to weights whose update was zero, so it is done only when needed. On an
unchanged grid the write-back rounds ``code + delta / scale``, so a zero update is exactly a no-op.

Randomness is counter based: the noise of a write-back is drawn from a generator seeded with
``mix(seed, counter)``, so resuming from a checkpoint (seed and counter saved with the codes)
reproduces the same rounding decisions bit for bit, independent of torch's global RNG.
"""
from __future__ import annotations

from typing import Optional

import torch

QMAX = 127
ROUNDINGS = ("stochastic", "nearest")


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a positive power of two, got {blocksize!r}")


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [n_blocks, blocksize], zero padded at the end."""
    rem = flat.numel() % blocksize
    if rem:
        flat = torch.nn.functional.pad(flat, (0, blocksize - rem))
    return flat.view(-1, blocksize)


def block_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 absmax of each block of the flattened tensor."""
    _check_blocksize(blocksize)
    return _blocks(w.reshape(-1).float(), blocksize).abs().amax(dim=1)


def mix_seed(seed: int, counter: int) -> int:
    """splitmix64 of (seed, counter): a well-spread 63-bit generator seed for one write-back."""
    m = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(counter) + 0x632BE59BD9B4E019) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _noise(shape, device, seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def round_codes(x: torch.Tensor, rounding: str = "stochastic", *, seed: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round float32 code values to int8 in [-127, 127].

    ``stochastic``: ``floor(x + u)``, u ~ U[0, 1): ``E[result] = x`` for x in [-127, 127] (up to the
    float32 resolution of ``x + u``, < 1e-5 of a step at |x| <= 127). ``nearest``: half to even.
    """
    if rounding == "stochastic":
        q = torch.floor(x + _noise(x.shape, x.device, seed, generator))
    elif rounding == "nearest":
        q = torch.round(x)
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return q.clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_int8_blockwise(w: torch.Tensor, blocksize: int = 64, rounding: str = "nearest", *,
                            seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
    """Float tensor -> ``(codes int8 of w's shape, scale float32 [n_blocks])``, scale = absmax / 127."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_int8_blockwise: expected a float tensor, got {w.dtype}")
    _check_blocksize(blocksize)
    n = w.numel()
    blocks = _blocks(w.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    scale = absmax / QMAX
    # w * (127 / absmax), the order LLM.int8() uses; an all-zero block keeps scale 0 and codes 0
    inv = torch.where(absmax > 0, QMAX / absmax, torch.zeros_like(absmax))
    x = blocks * inv.unsqueeze(1)
    q = round_codes(x, rounding, seed=seed, generator=generator)
    return q.reshape(-1)[:n].reshape(w.shape), scale


def dequantize_int8_blockwise(codes: torch.Tensor, scale: torch.Tensor, blocksize: int = 64,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale[block]`` computed in float32, cast to ``dtype``."""
    if codes.dtype != torch.int8:
        raise TypeError(f"dequantize_int8_blockwise: expected int8 codes, got {codes.dtype}")
    _check_blocksize(blocksize)
    n = codes.numel()
    if scale.numel() != n_blocks(n, blocksize):
        raise ValueError(f"dequantize_int8_blockwise: {n} codes in blocks of {blocksize} need "
                         f"{n_blocks(n, blocksize)} scales, got {scale.numel()}")
    out = _blocks(codes.reshape(-1).float(), blocksize).mul_(scale.float().unsqueeze(1))  # one float32 temporary
    return out.reshape(-1)[:n].reshape(codes.shape).to(dtype)


#: requantize works on this many elements at a time, bounding its float32 temporaries (~6 of them)
CHUNK_ELEMS = 1 << 22


def requantize(w_new: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, blocksize: int,
               rounding: str = "stochastic", *, shrink: float = 0.5, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None):
    """Write an updated high-precision weight back onto int8 codes.

    ``codes``/``scale`` are the current encoding (the one ``w_new`` was updated from). Blocks whose
    new absmax exceeds ``127 * scale`` or falls below ``shrink * 127 * scale`` get a fresh scale
    (absmax / 127) and are re-rounded on the new grid; the others keep their scale and round
    ``code + (w_new - code * scale) / scale``. Returns ``(new_codes, new_scale, refreshed_mask)``.
    Works in chunks of whole blocks (``CHUNK_ELEMS``) so a large layer's temporaries stay small.
    """
    _check_blocksize(blocksize)
    if not 0.0 <= shrink < 1.0:
        raise ValueError(f"shrink must be in [0, 1), got {shrink}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    n, nb = codes.numel(), scale.numel()
    if w_new.numel() != n or nb != n_blocks(n, blocksize):
        raise ValueError(f"requantize: {w_new.numel()} weights, {n} codes and {nb} scales do not match "
                         f"(blocksize {blocksize})")
    if rounding == "stochastic" and generator is None and seed is not None:
        generator = torch.Generator(device=codes.device)
        generator.manual_seed(seed)
    flat_w, flat_q = w_new.reshape(-1), codes.reshape(-1)
    out = torch.empty(n, dtype=torch.int8, device=codes.device)
    s_out = torch.empty(nb, dtype=torch.float32, device=codes.device)
    r_out = torch.empty(nb, dtype=torch.bool, device=codes.device)
    step = max(1, CHUNK_ELEMS // blocksize)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        e0, e1 = b0 * blocksize, min(n, b1 * blocksize)
        wb = _blocks(flat_w[e0:e1].float(), blocksize)
        qb = _blocks(flat_q[e0:e1].float(), blocksize)
        s = scale[b0:b1].float()
        new_absmax = wb.abs().amax(dim=1)
        limit = s * QMAX
        refresh = (new_absmax > limit) | (new_absmax < shrink * limit)
        s_new = torch.where(refresh, new_absmax / QMAX, s)
        # kept grid: code + delta / scale (exactly the old code when delta == 0); refreshed: w / scale
        s_safe = torch.where(s_new > 0, s_new, torch.ones_like(s_new)).unsqueeze(1)
        x = torch.where(refresh.unsqueeze(1), wb / s_safe, qb + (wb - qb * s.unsqueeze(1)) / s_safe)
        x.masked_fill_((s_new == 0).unsqueeze(1), 0.0)
        out[e0:e1] = round_codes(x, rounding, generator=generator).reshape(-1)[: e1 - e0]
        s_out[b0:b1], r_out[b0:b1] = s_new, refresh
    return out.reshape(codes.shape), s_out, r_out
