"""Triton kernel for the sparse weight gradient dW = dY[idx]^T X[idx] (rows gathered in-kernel).

The input gradient for the kept rows reuses the backward-input kernel of _dequant_matmul_triton
(dense or 4-bit W, HAS_IDX/SCATTER). Imports triton at import time; efft.ops loads it lazily.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._dequant_matmul_triton import _ieee, _m_bucket, _tile_ids
from ._dispatch import interpreter
@triton.jit
def _sparse_wgrad_kernel(dy_ptr, x_ptr, idx_ptr, scale_ptr, dw_ptr, R, N, K, stride_dym, stride_dyn,
                         stride_xm, stride_xk, stride_dwn, stride_dwk, R_BUCKET,
                         HAS_SCALE: tl.constexpr, X_COMPACT: tl.constexpr, ATOMIC: tl.constexpr,
                         DOT_FP32_IEEE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         SPLIT_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dW[N, K] = sum_r scale[r] * dY[idx[r], :]^T X[xr, :] with xr = r if X_COMPACT else idx[r];
    rows gathered in-kernel.
    SPLIT_R splits the row reduction over the grid (ATOMIC fp32 output) when N x K has few tiles."""
    pid_n, pid_k = _tile_ids(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    pid_r = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(pid_r * BLOCK_R, R, BLOCK_R * SPLIT_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        rows = tl.load(idx_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_r[:, None] & (offs_n[None, :] < N), other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * sc[:, None]).to(dy_ptr.dtype.element_ty)
        if X_COMPACT:
            xrows = offs_r.to(tl.int64)
        else:
            xrows = rows
        x = tl.load(x_ptr + xrows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_r[:, None] & (offs_k[None, :] < K), other=0.0).to(dy_ptr.dtype.element_ty)
        if DOT_FP32_IEEE:
            acc = tl.dot(tl.trans(dy), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dy), x, acc)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    ptrs = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)


def _wcfg(bn, bk, br, split, warps, stages):
    return triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, SPLIT_R=split, GROUP_M=8),
                         num_warps=warps, num_stages=stages)


def wgrad_configs(split: bool):
    """split=False: N x K has enough tiles to fill the GPU, each program owns its tile (direct store).
    split=True: few tiles (small layers); the row reduction is split over the grid, fp32 atomics."""
    if interpreter():
        return [_wcfg(32, 32, 32, 2 if split else 1, 4, 1)]
    if not split:
        return [_wcfg(128, 128, 64, 1, 8, 3), _wcfg(128, 128, 32, 1, 8, 4), _wcfg(64, 128, 64, 1, 4, 4),
                _wcfg(128, 64, 64, 1, 8, 4)]
    return [_wcfg(64, 64, 64, s, 4, 4) for s in (2, 4, 8, 16)] + [_wcfg(128, 64, 64, s, 8, 3) for s in (2, 4, 8)]

_WKEY = ["R_BUCKET", "N", "K"]
_wgrad_store = triton.autotune(wgrad_configs(False), key=_WKEY)(_sparse_wgrad_kernel)
_wgrad_split = triton.autotune(wgrad_configs(True), key=_WKEY, reset_to_zero=["dw_ptr"])(_sparse_wgrad_kernel)
_FEW_TILES = 256  # below this many 128x128 output tiles, split the row reduction


def sparse_weight_grad(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, row_scale: Optional[torch.Tensor],
                       out_dtype: torch.dtype, config: Optional[dict] = None, x_compact: bool = False) -> torch.Tensor:
    """dW [N, K] from the rows ``idx`` of dy [R, N] and of x [R, K] (or x's rows 0..len(idx)-1 when
    x_compact); 2-D views, any strides.

    The dot runs in dy's dtype (x is cast in-kernel) with fp32 accumulation."""
    n, k = dy.shape[1], x.shape[1]
    r = idx.numel()
    if r == 0:
        return torch.zeros((n, k), device=dy.device, dtype=out_dtype)
    if config is None:
        split = triton.cdiv(n, 128) * triton.cdiv(k, 128) < _FEW_TILES and r >= 256
    else:
        split = config.get("SPLIT_R", 1) > 1
    dw = (torch.zeros((n, k), device=dy.device, dtype=torch.float32) if split
          else torch.empty((n, k), device=dy.device, dtype=out_dtype))
    args = (dy, x, idx, row_scale if row_scale is not None else dy, dw, r, n, k, dy.stride(0), dy.stride(1),
            x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), _m_bucket(r))
    kwargs = dict(HAS_SCALE=row_scale is not None, X_COMPACT=x_compact, ATOMIC=split, DOT_FP32_IEEE=_ieee(dy.dtype))

    def grid(c):
        return (triton.cdiv(n, c["BLOCK_N"]) * triton.cdiv(k, c["BLOCK_K"]), c["SPLIT_R"])

    if config is None:
        (_wgrad_split if split else _wgrad_store)[grid](*args, **kwargs)
    else:
        cfg = dict(config)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 1)
        cfg.setdefault("SPLIT_R", 1)
        cfg.setdefault("GROUP_M", 8)
        _sparse_wgrad_kernel[grid](*args, **kwargs, **cfg, num_warps=warps, num_stages=stages)
    return dw if dw.dtype == out_dtype else dw.to(out_dtype)
