"""Matmul against a frozen int8 row-wise weight, with LLM.int8()'s outlier decomposition.

Two modes, both keeping only the int8 weight and its row scales in the autograd graph (the
dequantized weight is rebuilt in backward, never saved):

* ``threshold=None``: weight-only int8 (W8A16): ``x @ dequant(W)^T`` in x's dtype. This is what
  bitsandbytes' Linear8bitLt computes on CPU while training.
* ``threshold=t``: LLM.int8() (Dettmers et al. 2022): input columns holding any ``|x| >= t`` are
  multiplied in floating point against the matching dequantized weight columns; everything else
  is quantized row-wise to int8 and multiplied in integer arithmetic (exact int32 sums), then
  scaled by ``row_scale x col_scale / 127^2``. This is bitsandbytes' inference path.

The input gradient is ``dy @ dequant(W)`` in both modes (the weight is frozen: no weight grad).
"""
from __future__ import annotations

from typing import Optional

import torch

from .formats import dequantize_int8_rowwise, quantize_int8_rowwise

# fp32 sums of int8 x int8 products are exact while K * 127 * 127 < 2**24
_EXACT_K = 1024


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b^T`` for int8 a [M, K], b [N, K] (K split so fp32 partial sums stay exact)."""
    k = a.shape[1]
    out = None
    for k0 in range(0, k, _EXACT_K):
        part = (a[:, k0:k0 + _EXACT_K].float() @ b[:, k0:k0 + _EXACT_K].float().t()).to(torch.int32)
        out = part if out is None else out + part
    return out


def int8_outlier_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        threshold: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLM.int8() forward (no autograd): int8 x int8 for regular columns, float for outlier columns."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xscale, cols = quantize_int8_rowwise(x2, threshold=threshold)
    acc = _int_matmul(xq, q)
    y = acc * (xscale.unsqueeze(1) * scale.float().unsqueeze(0)) * (1.0 / (127.0 * 127.0))
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if cols is not None and cols.numel():
        w_cols = dequantize_int8_rowwise(q[:, cols].contiguous(), scale, x.dtype)
        y = y.addmm(x2[:, cols], w_cols.t())
    return y.reshape(*shape[:-1], q.shape[0])


def int8_dequant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A16 forward (no autograd): ``x @ dequant(W)^T + bias`` in x's dtype."""
    w = dequantize_int8_rowwise(q, scale, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


class Int8Matmul(torch.autograd.Function):
    """Autograd glue: saves the int8 weight and its scales (already alive as module buffers)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, threshold):
        ctx.save_for_backward(q, scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        if threshold is None:
            return int8_dequant_matmul(x, q, scale, bias)
        return int8_outlier_matmul(x, q, scale, threshold, bias)

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ dequantize_int8_rowwise(q, scale, dy.dtype)
        if ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, None, db, None


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                threshold: Optional[float] = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for an int8 row-wise W [out, in]; see the module docstring for ``threshold``."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"int8_matmul: expected an int8 weight [out, in], got {q.dtype} of shape {tuple(q.shape)}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"int8_matmul: x's last dim must equal in_features={q.shape[1]}; got x of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"int8_matmul: expected floating-point activations, got {x.dtype}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return Int8Matmul.apply(x, q, scale, bias, threshold)
    if threshold is None:
        return int8_dequant_matmul(x, q, scale, bias)
    return int8_outlier_matmul(x, q, scale, threshold, bias)
