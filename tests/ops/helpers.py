"""Shared test inputs for efft.ops: 4-bit weights in efft's QuantState layout, and tolerances."""
from __future__ import annotations

import torch

from efft.quant.state import QuantState

# Liger-Kernel style: per activation dtype, (atol, rtol) against the torch reference run in the same dtype.
# fp32: the kernel accumulates in fp32 like torch; differences come from summation order only.
# fp16: kernel accumulates in fp32 while the CPU reference rounds differently; one fp16 ulp at |y|~8.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


def _from_bnb(packed, s) -> tuple[torch.Tensor, QuantState]:
    state2 = None
    if s.nested:
        state2 = QuantState(absmax=s.state2.absmax, shape=s.state2.absmax.shape, dtype=torch.float32,
                            blocksize=s.state2.blocksize, quant_type="dynamic", code=s.state2.code)
    st = QuantState(absmax=s.absmax, shape=torch.Size(s.shape), dtype=s.dtype, blocksize=s.blocksize,
                    quant_type=s.quant_type, code=s.code, offset=s.offset if s.nested else None, state2=state2)
    return packed, st


def quantize(w: torch.Tensor, quant_type="nf4", blocksize=64, nested=False):
    """(packed uint8, QuantState) for w from efft.quant (bitsandbytes-identical layout)."""
    from efft.quant import quantize_4bit

    return quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)


def bnb_dequantize(w: torch.Tensor, quant_type="nf4", blocksize=64, nested=False):
    """bitsandbytes' own quantize+dequantize of w: an independent reference for the fused kernels.

    bitsandbytes 0.50's native CPU dequantize is only right when the row length is a multiple of the
    blocksize (it restarts blocks per row); callers use shapes where that holds."""
    import bitsandbytes as bnb

    assert w.shape[-1] % blocksize == 0
    p, s = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return bnb.functional.dequantize_4bit(p, s), _from_bnb(p, s)
