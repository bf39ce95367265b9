"""Compile efft.ops' Triton kernels for a GPU target without a GPU (ahead of time, ptxas included in
the triton wheel) and report registers, spills and shared memory of every autotune config.

The interpreter checks what the kernels compute; this checks that they compile for the real
target (constructs the interpreter accepts but the compiler rejects, shared memory over the
limit, register spills). Used by ``scripts/bench_ops.py --compile-check`` and a test.
Must run with TRITON_INTERPRET unset (the configs it reads are the GPU ones).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Iterable, Optional

H100_SMEM = 232448  # max dynamic shared memory a block on sm_90 (227 KiB)

_Q = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32",
      "offset_ptr": "*fp32"}


def _sig_fwd(act, out):
    return {"x_ptr": act, **_Q, "bias_ptr": act, "y_ptr": out, "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "stride_xk": "i32", "stride_ym": "i32", "stride_yn": "i32", "M_BUCKET": "i32"}


def _sig_bwd(act, out):
    return {"dy_ptr": act, "w_ptr": act, "stride_wn": "i32", "stride_wk": "i32", **_Q, "idx_ptr": "*i64",
            "dx_ptr": out, "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32", "stride_dyn": "i32",
            "stride_dxm": "i32", "stride_dxk": "i32", "M_BUCKET": "i32"}


def _sig_wgrad(act, out):
    return {"dy_ptr": act, "x_ptr": act, "idx_ptr": "*i64", "scale_ptr": "*fp32", "dw_ptr": out, "R": "i32",
            "N": "i32", "K": "i32", "stride_dym": "i32", "stride_dyn": "i32", "stride_xm": "i32", "stride_xk": "i32",
            "stride_dwn": "i32", "stride_dwk": "i32", "R_BUCKET": "i32"}


def jobs(full: bool = True) -> Iterable[tuple]:
    """(name, kernel, signature, constexprs, num_warps, num_stages) for each config and variant."""
    from . import _dequant_matmul_triton as tk
    from . import _sparse_triton as st

    quant = dict(BS=64, BS2=256, NESTED=True, EVEN_K=True, K_ALIGNED=True)
    pick = (lambda cs: cs) if full else (lambda cs: cs[:1])
    for c in pick(tk.tile_configs()):
        yield ("fwd/tile", tk._fwd_kernel, _sig_fwd("*bf16", "*bf16"),
               dict(quant, HAS_BIAS=True, ATOMIC=False, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    for c in pick(tk.splitk_configs()):
        yield ("fwd/splitk", tk._fwd_kernel, _sig_fwd("*bf16", "*fp32"),
               dict(quant, HAS_BIAS=False, ATOMIC=True, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    bw = dict(W_DENSE=False, HAS_IDX=False, SCATTER=False)
    for c in pick(tk._bwd_config_view(tk.tile_configs())):
        yield ("bwd/tile", tk._bwd_kernel, _sig_bwd("*bf16", "*bf16"),
               dict(quant, **bw, ATOMIC=False, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    for c in pick(tk._bwd_config_view(tk.splitk_configs())):
        yield ("bwd/splitk", tk._bwd_kernel, _sig_bwd("*bf16", "*fp32"),
               dict(quant, **bw, ATOMIC=True, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    for c in pick(st.wgrad_configs(False)):
        yield ("wgrad/store", st._sparse_wgrad_kernel, _sig_wgrad("*bf16", "*fp32"),
               dict(HAS_SCALE=True, X_COMPACT=False, ATOMIC=False, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    for c in pick(st.wgrad_configs(True)):
        yield ("wgrad/split", st._sparse_wgrad_kernel, _sig_wgrad("*bf16", "*fp32"),
               dict(HAS_SCALE=False, X_COMPACT=True, ATOMIC=True, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    # the other code paths, once each: per-element dequant (odd K, blocks crossing rows), fp32 and
    # fp16 activations, sparse input grad (dense W gathered/scattered, 4-bit W gathered)
    c = tk.tile_configs()[0]
    general = dict(BS=64, BS2=256, NESTED=True, EVEN_K=False, K_ALIGNED=False)
    yield ("fwd/tile general", tk._fwd_kernel, _sig_fwd("*bf16", "*bf16"),
           dict(general, HAS_BIAS=True, ATOMIC=False, DOT_FP32_IEEE=False, **c.kwargs), c.num_warps, c.num_stages)
    yield ("fwd/tile fp32", tk._fwd_kernel, _sig_fwd("*fp32", "*fp32"),
           dict(quant, HAS_BIAS=False, ATOMIC=False, DOT_FP32_IEEE=True, **c.kwargs), c.num_warps, c.num_stages)
    cb = tk._bwd_config_view([c])[0]
    yield ("bwd/tile fp16 sparse 4-bit", tk._bwd_kernel, _sig_bwd("*fp16", "*fp16"),
           dict(quant, W_DENSE=False, HAS_IDX=True, SCATTER=True, ATOMIC=False, DOT_FP32_IEEE=False, **cb.kwargs),
           cb.num_warps, cb.num_stages)
    yield ("bwd/tile sparse dense-W", tk._bwd_kernel, _sig_bwd("*bf16", "*bf16"),
           dict(quant, W_DENSE=True, HAS_IDX=True, SCATTER=False, ATOMIC=False, DOT_FP32_IEEE=False, **cb.kwargs),
           cb.num_warps, cb.num_stages)


def _resources(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    out = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                if ":" in item:
                    k, v = item.split(":", 1)
                    if v.isdigit():
                        out[k] = int(v)
    return out


def compile_all(full: bool = True, arch: int = 90, log=print, names: Optional[set] = None) -> list[dict]:
    """Compile every job for ``cuda:sm_<arch>``; one dict per job (ok, error, regs, spill bytes, smem).
    full=False: the first config of each family; names: only these job names."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile check needs TRITON_INTERPRET unset (it compiles the GPU configs)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, fn, sig, consts, warps, stages in jobs(full):
        if names is not None and name not in names:
            continue
        sig = dict(sig, **{k: "constexpr" for k in consts})
        tile = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in consts)
        split = consts.get("SPLIT_K", consts.get("SPLIT_R", 1))
        row = dict(kernel=name, tile=tile, split=split, num_warps=warps, num_stages=stages)
        t0 = time.time()
        try:
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            res = _resources(k.asm["cubin"])
            row.update(ok=True, regs=res.get("REG"), spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
                       smem=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"])
            row["fits_smem"] = row["smem"] <= H100_SMEM
        except Exception as e:  # report, keep going
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        row["seconds"] = round(time.time() - t0, 1)
        log(_fmt(row))
        rows.append(row)
    return rows


def _fmt(r: dict) -> str:
    head = f"{r['kernel']:<28} {r['tile']:<11} split {r['split']:<2} warps {r['num_warps']:<2} stages {r['num_stages']}"
    if not r["ok"]:
        return f"{head}  FAILED {r['error']}"
    return (f"{head}  regs {r['regs']} spill {r['spill_bytes']} B smem {r['smem']} B"
            f"{'' if r['fits_smem'] else ' (OVER LIMIT)'}{' wgmma' if r['wgmma'] else ''}")


def summary(rows: list[dict], arch: Optional[int] = 90) -> str:
    bad = [r for r in rows if not r["ok"] or not r["fits_smem"]]
    spills = [r for r in rows if r["ok"] and r["spill_bytes"]]
    return (f"{len(rows)} kernel configs compiled for sm_{arch}: {len(rows) - len(bad)} ok, {len(bad)} failed or over "
            f"the shared-memory limit, {len(spills)} with register spills "
            f"(max {max([r['spill_bytes'] for r in spills], default=0)} B)")
