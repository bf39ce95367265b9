"""Triton kernels: fused 4-bit dequantize + matmul, forward (X W^T) and backward-input (dY W).

Tiles of W are dequantized in registers (nibble -> code table -> times block absmax, the absmax
itself dequantized from its 8-bit code when double-quantized) and fed to tl.dot: the
full-precision W never exists in memory. Layout = efft.quant.state.QuantState (bitsandbytes):
row-major flattened W [N, K], element 2p in the high nibble of byte p, one absmax per ``blocksize``
consecutive elements of the flattened W (blocks may cross rows when K % blocksize != 0).

Two launch families, each autotuned on (M bucket, N, K):
- "tile": training shapes (M large). Big BLOCK_M so each dequantized W tile feeds many rows;
  bias fused; output stored once in the activation dtype.
- "splitk": decode shapes (M small). The reduction dimension is split over the grid so a GEMV-like
  launch still fills the GPU; partial sums are atomically added into an fp32 buffer.
Under TRITON_INTERPRET=1 each family has a single config (the interpreter cannot autotune).

This module imports triton at import time; efft.ops loads it lazily.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from efft.quant.state import QuantState

from ._dispatch import interpreter

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _absmax_tile(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, BS2: tl.constexpr, NESTED: tl.constexpr):
    """Block scales (fp32) at block indices ``blk``; 0 where ``mask`` is false."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0) + tl.load(offset_ptr)
        s = tl.where(mask, s, 0.0)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, offs_n, k0, N, K,
                  BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                  NESTED: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, DT: tl.constexpr):
    """Tile W[offs_n, k0:k0+BK] in dtype DT (zeros outside [N, K]); code[q] * absmax in fp32, then DT,
    exactly like the reference dequantize."""
    mask_n = offs_n < N
    if EVEN_K and K_ALIGNED and ((BK % BS == 0) or (BS % BK == 0)):
        # Fast path: rows start on a byte and absmax blocks never cross a row or a tile edge. Work on
        # the BK/2 bytes of each row: high nibbles = even columns, low = odd; both nibbles of a byte
        # share one absmax block (BS is even). Only the final DT tile is interleaved (16-bit join).
        offs_j = k0 // 2 + tl.arange(0, BK // 2)
        bmask = mask_n[:, None] & (offs_j[None, :] * 2 < K)
        b = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_j[None, :], mask=bmask, other=0)
        vh = tl.load(code_ptr + (b >> 4).to(tl.int32))
        vl = tl.load(code_ptr + (b & 15).to(tl.int32))
        if BK % BS == 0:
            blk = (offs_n[:, None] * K + k0) // BS + tl.arange(0, BK // BS)[None, :]
            m = mask_n[:, None] & ((k0 + tl.arange(0, BK // BS) * BS) < K)[None, :]
            s = _absmax_tile(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, m, BS2, NESTED)
            wh = (vh.reshape(BN, BK // BS, BS // 2) * s[:, :, None]).reshape(BN, BK // 2).to(DT)
            wl = (vl.reshape(BN, BK // BS, BS // 2) * s[:, :, None]).reshape(BN, BK // 2).to(DT)
        else:
            blk = (offs_n * K + k0) // BS
            s = _absmax_tile(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask_n & ((offs_n * 0 + k0) < K),
                             BS2, NESTED)
            wh = (vh * s[:, None]).to(DT)
            wl = (vl * s[:, None]).to(DT)
        w = tl.join(wh, wl).reshape(BN, BK)
    else:
        # General path: any K (odd K: rows start mid-byte) and blocks crossing rows; per element.
        offs_k = k0 + tl.arange(0, BK)
        f = offs_n[:, None] * K + offs_k[None, :]
        m = mask_n[:, None] & (offs_k[None, :] < K)
        b = tl.load(packed_ptr + (f >> 1), mask=m, other=0).to(tl.int32)
        q = (b >> ((1 - (f & 1)) * 4)) & 15
        s = _absmax_tile(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, f // BS, m, BS2, NESTED)
        w = (tl.load(code_ptr + q) * s).to(DT)
    return w


@triton.jit
def _w_tile(w_ptr, stride_wn, stride_wk, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
            offs_n, k0, N, K, BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
            NESTED: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, W_DENSE: tl.constexpr,
            DT: tl.constexpr):
    """W[offs_n, k0:k0+BK] in dtype DT: dequantized 4-bit, or loaded from a dense W (sparse backward)."""
    if W_DENSE:
        offs_k = k0 + tl.arange(0, BK)
        m = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=m, other=0.0).to(DT)
    else:
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, offs_n, k0, N, K,
                          BN, BK, BS, BS2, NESTED, EVEN_K, K_ALIGNED, DT)
    return w


@triton.jit
def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row-tiles share each column-tile while it is in L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, y_ptr,
                M, N, K, stride_xm, stride_xk, stride_ym, stride_yn, M_BUCKET,
                BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr,
                K_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, DOT_FP32_IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """Y[M, N] = X[M, K] @ W[N, K]^T (+ bias). ATOMIC: add fp32 partial sums into y (split-K)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _w_tile(x_ptr, 0, 0, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, offs_n, k0,
                    N, K, BLOCK_N, BLOCK_K, BS, BS2, NESTED, EVEN_K, K_ALIGNED, False,
                    x_ptr.dtype.element_ty)
        if DOT_FP32_IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(dy_ptr, w_ptr, stride_wn, stride_wk, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr,
                offset_ptr, idx_ptr, dx_ptr, M, N, K, stride_dym, stride_dyn, stride_dxm, stride_dxk, M_BUCKET,
                BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr,
                K_ALIGNED: tl.constexpr, W_DENSE: tl.constexpr, HAS_IDX: tl.constexpr, SCATTER: tl.constexpr,
                ATOMIC: tl.constexpr, DOT_FP32_IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """dX[M, K] = dY[rows, N] @ W[N, K]; rows = idx[m] when HAS_IDX (gathered in-kernel), written to
    row m of dX, or to row idx[m] when SCATTER. SPLIT_K splits the N reduction (ATOMIC fp32 output)."""
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if HAS_IDX:
        rows = tl.load(idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_m
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(pid_s * BLOCK_N, N, BLOCK_N * SPLIT_K):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & (offs_n[None, :] < N), other=0.0)
        w = _w_tile(w_ptr, stride_wn, stride_wk, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr,
                    offset_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K, BS, BS2, NESTED, EVEN_K, K_ALIGNED, W_DENSE,
                    dy_ptr.dtype.element_ty)
        if DOT_FP32_IEEE:
            acc = tl.dot(dy, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w, acc)
    if SCATTER:
        out_rows = rows
    else:
        out_rows = offs_m
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    dx_ptrs = dx_ptr + out_rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    if ATOMIC:
        tl.atomic_add(dx_ptrs, acc, mask=mask)
    else:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, split, warps, stages, group=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=group),
                         num_warps=warps, num_stages=stages)


def tile_configs():
    """Training shapes: BLOCK_M rows share each dequantized W tile. Chosen by compiling for sm_90
    (scripts/bench_ops.py --compile-check): W tile elements a thread <= 32 and fp32 accumulator
    <= 64 registers a thread keep these under 255 registers without spills; larger tiles
    (256x128, 128x256, 256x64x64, BLOCK_K=128 with 8 warps) spill."""
    if interpreter():
        return [_cfg(32, 32, 64, 1, 4, 1)]
    return [
        _cfg(128, 128, 64, 1, 8, 3),
        _cfg(128, 128, 64, 1, 8, 4),
        _cfg(64, 128, 64, 1, 8, 4),
        _cfg(128, 64, 64, 1, 8, 4),
        _cfg(128, 128, 32, 1, 8, 4),
        _cfg(256, 64, 32, 1, 8, 4),  # dequant work per MMA work ~ 1/BLOCK_M: 256 rows halve it
    ]


def splitk_configs():
    """Decode shapes (M <= 64): memory-bound on the packed weight; the reduction is split over the
    grid so that even M = 1 puts every SM on the weight stream."""
    if interpreter():
        return [_cfg(16, 32, 64, 2, 4, 1)]
    out = []
    for split in (1, 2, 4, 8):
        out += [_cfg(16, 64, 128, split, 8, 4), _cfg(16, 64, 256, split, 8, 3), _cfg(16, 32, 256, split, 4, 4)]
    out += [_cfg(32, 64, 128, 4, 8, 4), _cfg(64, 64, 128, 2, 8, 4)]
    return out


def _bwd_config_view(cfgs):
    """Backward-input kernel: the reduction is over N (BLOCK_N), the output tile is BLOCK_M x BLOCK_K."""
    out = []
    for c in cfgs:
        kw = dict(c.kwargs)
        kw["BLOCK_N"], kw["BLOCK_K"] = c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


_KEY = ["M_BUCKET", "N", "K"]


def _prune_small_m(configs, named_args, **kwargs):
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return kept or configs[:1]


_fwd_tile = triton.autotune(tile_configs(), key=_KEY)(_fwd_kernel)
_fwd_splitk = triton.autotune(splitk_configs(), key=_KEY, reset_to_zero=["y_ptr"],
                              prune_configs_by={"early_config_prune": _prune_small_m})(_fwd_kernel)
_bwd_tile = triton.autotune(_bwd_config_view(tile_configs()), key=_KEY)(_bwd_kernel)
_bwd_splitk = triton.autotune(_bwd_config_view(splitk_configs()), key=_KEY, reset_to_zero=["dx_ptr"],
                              prune_configs_by={"early_config_prune": _prune_small_m})(_bwd_kernel)

SMALL_M = 64  # M at or below this takes the split-K (decode) family


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


# ----------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------
def _qargs(packed: torch.Tensor, state: QuantState):
    """Kernel pointer args and constexprs for the 4-bit weight (placeholders when not nested)."""
    n, k = int(state.shape[0]), int(state.shape[1])
    if n * k > _INT32_MAX:
        raise ValueError(f"fused dequant kernels index W with int32; W{(n, k)} has more than 2**31 elements")
    packed = packed.reshape(-1)
    if state.nested:
        code2, absmax2, offset = state.state2.code, state.state2.absmax, state.offset.reshape(1)
        bs2 = int(state.state2.blocksize)
    else:
        code2 = absmax2 = offset = state.code  # never read
        bs2 = 256
    code = state.code if state.code.dtype == torch.float32 else state.code.float()
    args = (packed, state.absmax, code, code2.float(), absmax2.float(), offset.float())
    meta = dict(BS=int(state.blocksize), BS2=bs2, NESTED=state.nested, EVEN_K=(k % 2 == 0),
                K_ALIGNED=(k % int(state.blocksize) == 0))
    return args, meta


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs: exact fp32 dot unless torch itself allows TF32 for matmuls."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _launch(tuned, raw, grid_fn, args, kwargs, config: Optional[dict]):
    if config is None:
        tuned[grid_fn](*args, **kwargs)
    else:  # tests pin one config (split-K, scale modes) without autotuning
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 1)
        cfg.setdefault("GROUP_M", 8)
        cfg.setdefault("SPLIT_K", 1)
        raw[grid_fn](*args, **kwargs, **cfg, num_warps=warps, num_stages=stages)


def forward(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
            config: Optional[dict] = None) -> torch.Tensor:
    """Y = x W^T (+ bias) with the fused kernel; x [..., K] in fp16/bf16/fp32."""
    n, k = int(state.shape[0]), int(state.shape[1])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros(*lead, n)
    qargs, meta = _qargs(packed, state)
    small = m <= SMALL_M if config is None else config.get("SPLIT_K", 1) > 1
    y = torch.zeros((m, n), device=x.device, dtype=torch.float32) if small else torch.empty(
        (m, n), device=x.device, dtype=x.dtype)
    bias_arg = bias if bias is not None else qargs[2]
    args = (x2, *qargs, bias_arg, y, m, n, k, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), _m_bucket(m))
    kwargs = dict(meta, HAS_BIAS=(bias is not None and not small), ATOMIC=small, DOT_FP32_IEEE=_ieee(x.dtype))

    def grid(c):
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])

    _launch(_fwd_splitk if small else _fwd_tile, _fwd_kernel, grid, args, kwargs, config)
    if small:
        if bias is not None:
            y += bias.to(torch.float32)
        y = y.to(x.dtype)
    return y.reshape(*lead, n)


def backward_input(dy: torch.Tensor, packed: Optional[torch.Tensor], state: Optional[QuantState],
                   w: Optional[torch.Tensor] = None, idx: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """dX = dY W for a 4-bit W (packed, state) or a dense W [N, K] (``w``).

    idx: rows of dY (flattened over leading dims) to use, gathered in-kernel; the result has
    len(idx) rows, or, with ``out`` [R, K], row i is written to out[idx[i]] (other rows untouched).
    """
    if w is not None:
        n, k = int(w.shape[0]), int(w.shape[1])
    else:
        n, k = int(state.shape[0]), int(state.shape[1])
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, n)
    m = dy2.shape[0] if idx is None else idx.numel()
    scatter = out is not None
    if w is not None:
        qargs = (w, w, w, w, w, w)  # never read
        meta = dict(BS=64, BS2=256, NESTED=False, EVEN_K=True, K_ALIGNED=True)
        wstrides = (w.stride(0), w.stride(1))
    else:
        qargs, meta = _qargs(packed, state)
        wstrides = (0, 0)
    small = m <= SMALL_M if config is None else config.get("SPLIT_K", 1) > 1
    if scatter:
        target = out
        if small and out.dtype != torch.float32:
            target = torch.zeros((m, k), device=dy.device, dtype=torch.float32)
    else:
        target = (torch.zeros((m, k), device=dy.device, dtype=torch.float32) if small
                  else torch.empty((m, k), device=dy.device, dtype=dy.dtype))
    scatter_now = scatter and target is out
    if scatter_now and small:
        out.index_fill_(0, idx, 0)  # atomic partial sums land on zeros
    if m > 0:
        idx_arg = idx if idx is not None else dy2
        args = (dy2, w if w is not None else dy2, *wstrides, *qargs, idx_arg, target, m, n, k,
                dy2.stride(0), dy2.stride(1), target.stride(0), target.stride(1), _m_bucket(m))
        kwargs = dict(meta, W_DENSE=w is not None, HAS_IDX=idx is not None, SCATTER=scatter_now, ATOMIC=small,
                      DOT_FP32_IEEE=_ieee(dy.dtype))

        def grid(c):
            return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(k, c["BLOCK_K"]), c["SPLIT_K"])

        tuned = _bwd_splitk if small else _bwd_tile
        if small and scatter_now:
            # reset_to_zero would zero the whole of `out`; pinned to the raw kernel with zeroed rows instead
            cfg = config or _first_fitting(_bwd_config_view(splitk_configs()), m)
            _launch(None, _bwd_kernel, grid, args, kwargs, cfg)
        else:
            _launch(tuned, _bwd_kernel, grid, args, kwargs, config)
    if scatter:
        if target is not out:
            out[idx] = target.to(out.dtype)
        return out
    if small:
        target = target.to(dy.dtype)
    return target.reshape(*lead, k) if idx is None else target


def _first_fitting(cfgs, m):
    c = _prune_small_m(cfgs, {"M": m})[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
