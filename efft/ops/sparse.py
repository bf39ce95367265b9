"""Sparse backward: gradients from the rows (tokens) that matter only.

Given ``idx``, the indices of the kept rows of dY / X (flattened over leading dimensions):

- ``sparse_weight_grad``: dW = dY[idx]^T X[idx] (optionally each kept row scaled, e.g. the
  reweighting of sampled rows in WTA-CRS), without materializing dY[idx] or X[idx]: the Triton
  kernel gathers rows while it streams them.
- ``sparse_input_grad`` / ``sparse_dequant_input_grad``: dX rows for the kept tokens only,
  dY[idx] W for a dense W or a 4-bit W (dequantized in-kernel), compact ``[len(idx), K]`` or
  scattered into ``out[idx]``.

Work and time scale with len(idx). Indices are not bounds-checked on CUDA (that would need a host
sync); the torch reference raises on an out-of-range index. With ``out``, indices must be unique.
"""
from __future__ import annotations

from typing import Optional

import torch

from efft.quant.state import QuantState

from ._dispatch import interpreter, resolve_impl

__all__ = ["sparse_weight_grad", "sparse_input_grad", "sparse_dequant_input_grad",
           "sparse_weight_grad_reference", "sparse_input_grad_reference", "sparse_dequant_input_grad_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [..., features] with at least 2 dims; got {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-1])


def _check_idx(idx: torch.Tensor, device) -> None:
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be a 1-D int32/int64 tensor of row indices; got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.device != torch.device(device):
        raise ValueError(f"idx must be on {device} like the activations; got {idx.device}")


def _reason(tensors, dtype) -> Optional[str]:
    if dtype not in _DTYPES:
        return f"expected float16/bfloat16/float32 activations, got {dtype}"
    dev = tensors[0].device
    if dtype == torch.bfloat16 and dev.type == "cpu" and interpreter():
        return "bfloat16 is not supported by the Triton CPU interpreter; use float32/float16 there"
    if dtype == torch.bfloat16 and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] < 8:
        return "bfloat16 needs a GPU of compute capability >= 8.0 (Ampere or newer)"
    for t in tensors:
        if t is not None and t.device != dev:
            return f"expected every tensor on {dev}, found one on {t.device}"
    return None


# ---------------------------------------------------------------------------------------------- weight grad
def sparse_weight_grad_reference(dy, x, idx, row_scale=None, out_dtype=None, x_compact=False):
    """Plain torch: gather the kept rows, then dY[idx]^T X[idx] (X itself when x_compact) in dy's dtype."""
    dy2, x2 = _rows(dy, "dy"), _rows(x, "x")
    d = dy2.index_select(0, idx)
    if row_scale is not None:
        d = (d.float() * row_scale.float()[:, None]).to(dy.dtype)
    xs = x2 if x_compact else x2.index_select(0, idx)
    dw = d.t() @ xs.to(dy.dtype)
    return dw.to(out_dtype or dy.dtype)


def sparse_weight_grad(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, row_scale: Optional[torch.Tensor] = None,
                       out_dtype: Optional[torch.dtype] = None, impl: str = "auto",
                       x_compact: bool = False) -> torch.Tensor:
    """dW [N, K] = sum over i of row_scale[i] * dy[idx[i]]^T x[idx[i]].

    dy [..., N], x [..., K] with the same leading shape; idx 1-D int indices into the flattened rows
    (repeats allowed: they add up, as sampling with replacement needs); row_scale optional
    [len(idx)] weights; out_dtype defaults to dy.dtype (fp32 for an fp32 master gradient).
    x_compact=True: x holds only the kept rows ([len(idx), K], e.g. the rows saved in forward) and
    row i of x pairs with dy[idx[i]]."""
    dy2, x2 = _rows(dy, "dy"), _rows(x, "x")
    want = idx.numel() if x_compact else dy2.shape[0]
    if x2.shape[0] != want:
        what = "len(idx) rows (x_compact=True)" if x_compact else "the same rows as dy"
        raise ValueError(f"x must have {what}; got dy {tuple(dy.shape)}, x {tuple(x.shape)}, {idx.numel()} indices")
    _check_idx(idx, dy.device)
    if row_scale is not None and (row_scale.dim() != 1 or row_scale.numel() != idx.numel()):
        raise ValueError(f"row_scale must have shape [{idx.numel()}] (one weight per kept row); got {tuple(row_scale.shape)}")
    out_dtype = out_dtype or dy.dtype
    reason = None if impl == "torch" else _reason([dy, x, idx, row_scale], dy.dtype)
    if reason is None and impl != "torch" and not x.is_floating_point():
        reason = f"expected floating-point x, got {x.dtype}"
    if resolve_impl(impl, "sparse_weight_grad", dy.device, reason) == "torch":
        return sparse_weight_grad_reference(dy, x, idx, row_scale, out_dtype, x_compact)
    from . import _sparse_triton

    return _sparse_triton.sparse_weight_grad(dy2, x2, idx, row_scale, out_dtype, x_compact=x_compact)


# ---------------------------------------------------------------------------------------------- input grad
def _place(res: torch.Tensor, idx: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return res
    out[idx] = res.to(out.dtype)
    return out


def _check_out(out, idx, k, device):
    if out is None:
        return
    if out.dim() != 2 or out.shape[1] != k:
        raise ValueError(f"out must have shape [rows, {k}]; got {tuple(out.shape)}")
    if out.device != torch.device(device):
        raise ValueError(f"out must be on {device}; got {out.device}")


def sparse_input_grad_reference(dy, w, idx, out=None):
    """Plain torch: dY[idx] @ W in dy's dtype."""
    res = _rows(dy, "dy").index_select(0, idx) @ w.to(dy.dtype)
    return _place(res, idx, out)


def sparse_input_grad(dy: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, out: Optional[torch.Tensor] = None,
                      impl: str = "auto") -> torch.Tensor:
    """dX for the kept rows: dY[idx] @ W with W dense [N, K] (any float dtype, cast to dy's).

    Returns [len(idx), K], or writes row i into out[idx[i]] (out [rows, K]) and returns out."""
    if w.dim() != 2 or dy.shape[-1] != w.shape[0]:
        raise ValueError(f"w must be [N, K] with N = dy.shape[-1] = {dy.shape[-1]}; got w {tuple(w.shape)}")
    _rows(dy, "dy")
    _check_idx(idx, dy.device)
    _check_out(out, idx, w.shape[1], dy.device)
    reason = None if impl == "torch" else _reason([dy, w, idx, out], dy.dtype)
    if resolve_impl(impl, "sparse_input_grad", dy.device, reason) == "torch":
        return sparse_input_grad_reference(dy, w, idx, out)
    from . import _dequant_matmul_triton as tk

    return tk.backward_input(dy, None, None, w=w, idx=idx, out=out)


def sparse_dequant_input_grad_reference(dy, packed, state, idx, out=None):
    """Plain torch: dY[idx] @ dequantize(W) in dy's dtype."""
    from .dequant_matmul import dequant_matmul_backward_input_reference

    res = dequant_matmul_backward_input_reference(_rows(dy, "dy").index_select(0, idx), packed, state)
    return _place(res, idx, out)


def sparse_dequant_input_grad(dy: torch.Tensor, packed: torch.Tensor, state: QuantState, idx: torch.Tensor,
                              out: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """As sparse_input_grad with a 4-bit W (packed, state), dequantized tile by tile in the kernel."""
    from .dequant_matmul import _check, unsupported_reason

    _check(dy.new_empty((1, int(state.shape[1]))), packed, state, None)
    if dy.shape[-1] != int(state.shape[0]):
        raise ValueError(f"dy's last dim must equal out_features={int(state.shape[0])}; got {tuple(dy.shape)}")
    _rows(dy, "dy")
    _check_idx(idx, dy.device)
    _check_out(out, idx, int(state.shape[1]), dy.device)
    reason = None
    if impl != "torch":
        reason = _reason([dy, idx, out], dy.dtype) or unsupported_reason(dy, packed, state)
    if resolve_impl(impl, "sparse_dequant_input_grad", dy.device, reason) == "torch":
        return sparse_dequant_input_grad_reference(dy, packed, state, idx, out)
    from . import _dequant_matmul_triton as tk

    return tk.backward_input(dy, packed, state, idx=idx, out=out)
