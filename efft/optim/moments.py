"""Storage of Adam's two moments, 32-bit tensors or (later) 8-bit blockwise codes, behind one API.

``init`` creates the state entries, ``adam_direction`` updates the moments with a gradient and
returns m / (sqrt(v) + eps) in fp32; ``reset`` zeroes them (FRUGAL's subspace change).
"""
from __future__ import annotations

import torch

BITS = (32,)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"state_bits must be one of {BITS}, got {bits!r}")
    return bits


def init(state: dict, shape, device, bits: int, dtype: torch.dtype = torch.float32) -> None:
    check_bits(bits)
    state["exp_avg"] = torch.zeros(shape, device=device, dtype=dtype)
    state["exp_avg_sq"] = torch.zeros(shape, device=device, dtype=dtype)


def reset(state: dict) -> None:
    state["exp_avg"].zero_()
    state["exp_avg_sq"].zero_()


def adam_direction(state: dict, g: torch.Tensor, beta1: float, beta2: float, eps: float, v_scale: float = 1.0) -> torch.Tensor:
    """Update the moments in place with ``g``; return m / (sqrt(v) * v_scale + eps).

    ``v_scale`` = 1 / sqrt(1 - beta2^t) puts eps after the bias correction (torch.optim.AdamW);
    1 puts it before (the GaLore/APOLLO authors' transformers-style AdamW)."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if g.dtype != m.dtype:
        g = g.to(m.dtype)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.sqrt()
    if v_scale != 1.0:
        denom.mul_(v_scale)
    return m / denom.add_(eps)
