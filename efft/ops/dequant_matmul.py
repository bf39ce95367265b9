"""Y = X W^T (+ bias) with W stored 4-bit (NF4/FP4, block absmax, optional double quant).

The autograd.Function never saves a dequantized W: forward and backward each rebuild it (torch
reference) or dequantize tiles in registers (Triton kernel), so a frozen 4-bit base costs 4 bits a
weight in the autograd graph. W is frozen: no weight gradient; bias gets one if it requires grad.
"""
from __future__ import annotations

from typing import Optional

import torch

from efft.quant.state import QuantState

from ._dispatch import resolve_impl

__all__ = ["dequant_matmul", "dequant_matmul_reference", "dequant_matmul_backward_input_reference",
           "DequantMatmul"]


def _dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Full-precision W [out, in] in ``dtype`` via the shared format code (efft.quant.formats)."""
    from efft.quant.formats import dequantize_4bit  # lazy: efft.quant may import efft.ops

    return dequantize_4bit(packed, state, dtype)


def _check(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor]):
    if len(state.shape) != 2:
        raise ValueError(f"dequant_matmul expects a 2-D quantized weight [out, in]; got shape {tuple(state.shape)}")
    n, k = int(state.shape[0]), int(state.shape[1])
    if x.shape[-1] != k:
        raise ValueError(f"dequant_matmul: x's last dim must equal in_features={k} of W{tuple(state.shape)}; "
                         f"got x of shape {tuple(x.shape)}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequant_matmul expects packed weights as uint8 (two 4-bit codes a byte); got {packed.dtype}")
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"dequant_matmul: packed has {packed.numel()} bytes, expected {(n * k + 1) // 2} for W{(n, k)}")
    if not x.is_floating_point():
        raise TypeError(f"dequant_matmul expects floating-point activations (fp16/bf16/fp32); got {x.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"dequant_matmul: bias must have shape [{n}]; got {tuple(bias.shape)}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(x, packed, state: QuantState, bias=None) -> Optional[str]:
    """None when the Triton kernel can take these inputs, else what it expected."""
    from ._dispatch import interpreter

    if x.dtype not in _DTYPES:
        return f"expected x in float16/bfloat16/float32, got {x.dtype}"
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreter():
        return "bfloat16 is not supported by the Triton CPU interpreter; use float32/float16 there"
    if x.dtype == torch.bfloat16 and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 8:
        return "bfloat16 needs a GPU of compute capability >= 8.0 (Ampere or newer)"
    if int(state.shape[0]) * int(state.shape[1]) >= 2**31:
        return f"the kernel indexes W with int32; W{tuple(state.shape)} has 2**31 elements or more"
    if state.code.numel() != 16:
        return f"expected a 16-entry 4-bit code table, got {state.code.numel()} entries"
    if state.nested and (state.state2.code.numel() != 256 or state.offset is None):
        return "expected nested statistics with a 256-entry code and an offset"
    tensors = [packed, state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    tensors += [] if bias is None else [bias]
    for t in tensors:
        if t.device != x.device:
            return f"expected the packed weight, its statistics and bias on {x.device}, found one on {t.device}"
    return None


def dequant_matmul_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: dequantize W to x.dtype, then x @ W^T (+ bias)."""
    w = _dequantize(packed, state, x.dtype)
    y = torch.matmul(x, w.t())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def dequant_matmul_backward_input_reference(dy: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Plain torch: dX = dY @ W with W dequantized to dy.dtype."""
    w = _dequantize(packed, state, dy.dtype)
    return torch.matmul(dy, w)


def _forward(x, packed, state, bias, impl):
    if impl == "triton":
        from . import _dequant_matmul_triton as tk

        return tk.forward(x, packed, state, bias)
    return dequant_matmul_reference(x, packed, state, bias)


def _backward_input(dy, packed, state, impl):
    if impl == "triton":
        from . import _dequant_matmul_triton as tk

        return tk.backward_input(dy, packed, state)
    return dequant_matmul_backward_input_reference(dy, packed, state)


class DequantMatmul(torch.autograd.Function):
    """Autograd glue. Saves only the packed weight (and its state), never a dequantized W."""

    @staticmethod
    def forward(ctx, x, packed, bias, state, impl_fwd, impl_bwd):
        ctx.state = state
        ctx.impl_bwd = impl_bwd
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(packed)
        return _forward(x, packed, state, bias, impl_fwd)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _backward_input(dy.to(ctx.x_dtype), packed, ctx.state, ctx.impl_bwd)
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, db, None, None, None


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                   bias: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """X W^T (+ bias) for a 4-bit W [out, in]; x has any leading shape and a floating dtype.

    impl: "triton" (fused kernel; CUDA tensors, or CPU under TRITON_INTERPRET=1), "torch" (reference),
    "auto" (Triton on CUDA when the inputs are supported, else the reference with a one-time warning
    for CUDA inputs the kernel cannot take).
    """
    _check(x, packed, state, bias)
    reason = None
    if impl != "torch":
        reason = unsupported_reason(x, packed, state, bias)
    impl_fwd = resolve_impl(impl, "dequant_matmul", x.device, reason)
    # backward sees dy of x's dtype and device: the same decision holds
    impl_bwd = impl_fwd
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return DequantMatmul.apply(x, packed, bias, state, impl_fwd, impl_bwd)
    return _forward(x, packed, state, bias, impl_fwd)
