"""Storage of Adam's two moments: 32-bit tensors, or 8-bit blockwise codes with the dynamic map
(bitsandbytes' 8-bit optimizer layout: blocks of 256, fp32 absmax per block, a signed map for m
and an unsigned one for v, which is never negative), behind one API.

``init`` creates the state entries, ``adam_direction`` updates the moments with a gradient and
returns m / (sqrt(v) * v_scale + eps) in fp32; ``reset`` zeroes them (FRUGAL's subspace change).
The 8-bit codes come from efft.quant.formats (one quantizer for the whole toolkit), with exact
nearest-code rounding.
"""
from __future__ import annotations

import math

import torch

BITS = (32, 8)
BLOCK = 256
_maps: dict = {}


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"state_bits must be one of {BITS}, got {bits!r}")
    return bits


def _map(signed: bool, device) -> torch.Tensor:
    key = (signed, torch.device(device))
    if key not in _maps:
        from efft.quant.formats import create_dynamic_map

        _maps[key] = create_dynamic_map(signed=signed).to(device)
    return _maps[key]


def init(state: dict, shape, device, bits: int, dtype: torch.dtype = torch.float32) -> None:
    check_bits(bits)
    if bits == 32:
        state["exp_avg"] = torch.zeros(shape, device=device, dtype=dtype)
        state["exp_avg_sq"] = torch.zeros(shape, device=device, dtype=dtype)
        return
    blocks = math.ceil(math.prod(shape) / BLOCK)
    for name in ("exp_avg", "exp_avg_sq"):
        state[f"{name}_q"] = torch.zeros(shape, device=device, dtype=torch.uint8)
        state[f"{name}_absmax"] = torch.zeros(blocks, device=device, dtype=torch.float32)  # 0: value 0


def reset(state: dict) -> None:
    if "exp_avg" in state:
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
    else:
        state["exp_avg_absmax"].zero_()
        state["exp_avg_sq_absmax"].zero_()


def _load(state: dict, name: str, signed: bool) -> torch.Tensor:
    from efft.quant.formats import dequantize_blockwise

    q = state[f"{name}_q"]
    return dequantize_blockwise(q, state[f"{name}_absmax"], _map(signed, q.device), blocksize=BLOCK)


def _store(state: dict, name: str, value: torch.Tensor, signed: bool) -> None:
    from efft.quant.formats import quantize_blockwise

    q, absmax = quantize_blockwise(value, _map(signed, value.device), blocksize=BLOCK)
    state[f"{name}_q"].copy_(q)
    state[f"{name}_absmax"].copy_(absmax)


def adam_direction(state: dict, g: torch.Tensor, beta1: float, beta2: float, eps: float, v_scale: float = 1.0) -> torch.Tensor:
    """Update the moments in place with ``g``; return m / (sqrt(v) * v_scale + eps).

    ``v_scale`` = 1 / sqrt(1 - beta2^t) puts eps after the bias correction (torch.optim.AdamW);
    1 puts it before (the GaLore/APOLLO authors' transformers-style AdamW)."""
    quantized = "exp_avg_q" in state
    if quantized:
        m, v = _load(state, "exp_avg", True), _load(state, "exp_avg_sq", False)
    else:
        m, v = state["exp_avg"], state["exp_avg_sq"]
    if g.dtype != m.dtype:
        g = g.to(m.dtype)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if quantized:
        _store(state, "exp_avg", m, True)
        _store(state, "exp_avg_sq", v, False)
    denom = v.sqrt()
    if v_scale != 1.0:
        denom.mul_(v_scale)
    return torch.div(m, denom.add_(eps), out=denom)  # into denom: one temporary, same rounding
