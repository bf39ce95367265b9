#!/usr/bin/env python
"""Benchmark efft.ops on a GPU: fused 4-bit dequant-matmul vs bitsandbytes vs dense bf16, sparse backward.

    python scripts/bench_ops.py                 # CUDA GPU: all shapes, writes cards/ops.md + cards/ops.json
    python scripts/bench_ops.py --cpu-smoke     # no GPU: Triton interpreter, tiny shapes, checks the script runs
    python scripts/bench_ops.py --compile-check # no GPU needed: compile every autotune config for sm_90,
                                                # report registers / spills / shared memory

Shapes: Llama-3-8B linear layers given as in_features x out_features: 4096x4096 (q/o proj),
4096x14336 (gate/up), 14336x4096 (down), tokens M in {1, 16, 512, 4096, 16384}, bf16, NF4 with
double quantization, blocksize 64 (the QLoRA setting). For each: forward Y = X W^T and
backward-input dX = dY W, timed for
  efft   efft.ops fused kernel (W dequantized tile by tile in registers)
  bnb    bitsandbytes as Linear4bit does it in training: dequantize_4bit(W) to bf16, then matmul
  dense  torch.matmul with a bf16 W already in memory (the upper bound)
with TFLOP/s (2 M N K / t), the ratios efft/bnb and efft/dense, and the peak CUDA memory a call
allocates above its inputs and output. Sparse backward: dW = dY[idx]^T X[idx] and dX[idx] at kept
token fractions 25/50/100%. Without a CUDA GPU (and without --cpu-smoke) it says so and exits 0
without writing a card.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features K, out_features N)
GPU_MS = [1, 16, 512, 4096, 16384]
GPU_SPARSE = dict(tokens=16384, shapes=[(4096, 4096), (4096, 14336)], fractions=[0.25, 0.5, 1.0])
SMOKE_SHAPES = [(64, 48)]
SMOKE_MS = [1, 33]
SMOKE_SPARSE = dict(tokens=40, shapes=[(64, 48)], fractions=[0.25, 0.5, 1.0])
TARGETS = "efft >= 1.5x bnb at M >= 4096; efft >= 0.85x dense; efft >= 2x bnb at M = 1"


def _timer(cuda: bool, reps: int):
    import torch

    if cuda:
        import triton.testing

        def t(fn):
            fn()  # compile + autotune outside the timed region
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")
    else:
        def t(fn):
            fn()
            times = []
            for _ in range(max(1, reps)):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return t


def _extra_memory(fn, cuda: bool):
    """Bytes a call allocates at its peak beyond the memory held before it and its returned output."""
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    extra = peak - base - out.numel() * out.element_size()
    del out
    return max(int(extra), 0)


def _quantize(w, have_bnb: bool):
    """NF4 + double quant, blocksize 64: bitsandbytes' state when available (same layout as efft's)."""
    import torch

    from efft.quant import QuantState, quantize_4bit

    if have_bnb:
        import bitsandbytes as bnb

        p, s = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        s2 = QuantState(absmax=s.state2.absmax, shape=s.state2.absmax.shape, dtype=torch.float32,
                        blocksize=s.state2.blocksize, quant_type="dynamic", code=s.state2.code)
        st = QuantState(absmax=s.absmax, shape=torch.Size(s.shape), dtype=s.dtype, blocksize=s.blocksize,
                        quant_type=s.quant_type, code=s.code, offset=s.offset, state2=s2)
        return p, st, s
    p, st = quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    return p, st, None


def _fmt_ms(v):
    return "n/a" if v is None else f"{v:.3f}"


def _fmt_mib(v):
    return "n/a" if v is None else f"{v / 2**20:.1f}"


def run(smoke: bool, reps: int, shapes=None, ms=None, sparse_on: bool = True):
    import torch

    import efft.ops as ops
    from efft.ops import _dequant_matmul_triton as tk
    from efft.ops.dequant_matmul import dequant_matmul_backward_input_reference, dequant_matmul_reference
    from efft.quant import dequantize_4bit

    cuda = not smoke
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter has no bf16 arithmetic
    try:
        import bitsandbytes as bnb

        have_bnb = True
    except Exception as e:  # GPU boxes without a bnb wheel: the column is left out, said in the card
        print(f"bitsandbytes unavailable ({e.__class__.__name__}: {e}); 'bnb' column skipped", file=sys.stderr)
        have_bnb = False
    timer = _timer(cuda, reps)
    shapes = shapes or (SMOKE_SHAPES if smoke else GPU_SHAPES)
    ms = ms or (SMOKE_MS if smoke else GPU_MS)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for K, N in shapes:
        w = torch.randn(N, K, device=dev, dtype=dtype, generator=gen) * 0.02
        packed, state, bnb_state = _quantize(w, have_bnb)
        w_dense = dequantize_4bit(packed, state, dtype)  # the dense baseline's weight: same values
        del w
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)
            dy = torch.randn(M, N, device=dev, dtype=dtype, generator=gen)
            flops = 2.0 * M * N * K
            for direction in ("forward", "backward_input"):
                if direction == "forward":
                    efft_fn = lambda: tk.forward(x, packed, state)  # noqa: E731
                    dense_fn = lambda: torch.matmul(x, w_dense.t())  # noqa: E731
                    if have_bnb:
                        bnb_fn = lambda: torch.nn.functional.linear(  # noqa: E731
                            x, bnb.functional.dequantize_4bit(packed, bnb_state).to(dtype))
                    ref = dequant_matmul_reference(x, packed, state)
                else:
                    efft_fn = lambda: tk.backward_input(dy, packed, state)  # noqa: E731
                    dense_fn = lambda: torch.matmul(dy, w_dense)  # noqa: E731
                    if have_bnb:
                        bnb_fn = lambda: torch.matmul(  # noqa: E731
                            dy, bnb.functional.dequantize_4bit(packed, bnb_state).to(dtype))
                    ref = dequant_matmul_backward_input_reference(dy, packed, state)
                out = efft_fn()
                err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
                del out, ref
                r = dict(K=K, N=N, M=M, direction=direction, rel_err=err,
                         efft_ms=timer(efft_fn), dense_ms=timer(dense_fn),
                         efft_extra=_extra_memory(efft_fn, cuda), dense_extra=_extra_memory(dense_fn, cuda),
                         bnb_ms=None, bnb_extra=None)
                if have_bnb:
                    r["bnb_ms"] = timer(bnb_fn)
                    r["bnb_extra"] = _extra_memory(bnb_fn, cuda)
                for k in ("efft", "bnb", "dense"):
                    t = r[f"{k}_ms"]
                    r[f"{k}_tflops"] = None if t is None else flops / (t * 1e-3) / 1e12
                r["vs_bnb"] = None if r["bnb_ms"] is None else r["bnb_ms"] / r["efft_ms"]
                r["vs_dense"] = r["dense_ms"] / r["efft_ms"]
                rows.append(r)
                print(f"K={K:>5} N={N:>5} M={M:>5} {direction:<14} efft {r['efft_ms']:.3f} ms "
                      f"({r['efft_tflops']:.1f} TFLOP/s)  bnb {_fmt_ms(r['bnb_ms'])}  dense {r['dense_ms']:.3f}  "
                      f"x bnb {r['vs_bnb'] or float('nan'):.2f}  x dense {r['vs_dense']:.2f}  err {err:.1e}",
                      flush=True)
            del x, dy
        del w_dense, packed, state

    sparse_cfg = SMOKE_SPARSE if smoke else GPU_SPARSE
    sparse = []
    T = sparse_cfg["tokens"]
    for K, N in (sparse_cfg["shapes"] if sparse_on else []):
        x = torch.randn(T, K, device=dev, dtype=dtype, generator=gen)
        dy = torch.randn(T, N, device=dev, dtype=dtype, generator=gen)
        packed, state, _ = _quantize(torch.randn(N, K, device=dev, dtype=dtype, generator=gen) * 0.02, False)
        full_ms = timer(lambda: dy.t() @ x)
        for frac in sparse_cfg["fractions"]:
            kept = max(1, int(T * frac))
            idx = torch.randperm(T, device=dev, generator=gen)[:kept].sort().values
            wg = lambda: ops.sparse_weight_grad(dy, x, idx, out_dtype=torch.float32, impl="triton")  # noqa: E731
            wg_ref = lambda: ops.sparse_weight_grad_reference(dy, x, idx, out_dtype=torch.float32)  # noqa: E731
            ig = lambda: ops.sparse_dequant_input_grad(dy, packed, state, idx, impl="triton")  # noqa: E731
            err = ((wg() - wg_ref()).norm() / wg_ref().norm().clamp_min(1e-12)).item()
            s = dict(K=K, N=N, tokens=T, fraction=frac, kept=kept, rel_err=err,
                     wgrad_ms=timer(wg), wgrad_torch_ms=timer(wg_ref), dense_all_rows_ms=full_ms,
                     dequant_igrad_ms=timer(ig), wgrad_extra=_extra_memory(wg, cuda),
                     wgrad_torch_extra=_extra_memory(wg_ref, cuda))
            sparse.append(s)
            print(f"sparse K={K} N={N} kept {frac:.0%}: dW {s['wgrad_ms']:.3f} ms (torch gather+mm "
                  f"{s['wgrad_torch_ms']:.3f}, dense all rows {full_ms:.3f}), dX[idx] 4-bit {s['dequant_igrad_ms']:.3f} ms",
                  flush=True)
    return rows, sparse, have_bnb


def environment(cuda: bool, have_bnb: bool):
    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__,
               date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "unavailable"
    if have_bnb:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    env["device"] = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, smoke run: timings meaningless)"
    return env


def card(rows, sparse, env, have_bnb, smoke: bool) -> str:
    lines = [f"# efft.ops benchmark: {env['device']}", ""]
    if smoke:
        lines += ["**Smoke run on CPU under the Triton interpreter: checks the script, not the speed.**", ""]
    lines += [", ".join(f"{k} {v}" for k, v in env.items()), "",
              "Command: `python scripts/bench_ops.py" + (" --cpu-smoke" if smoke else "") + "`", "",
              "NF4 + double quant, blocksize 64; activations bf16 (fp16 in the smoke run). K = in_features, "
              "N = out_features, M = tokens. Times are medians (ms). `x bnb` = bnb time / efft time; "
              "`x dense` = dense time / efft time. `extra MiB` = peak CUDA memory a call allocates above "
              "its inputs and output (bnb: the dequantized weight).", ""]
    if not have_bnb:
        lines += ["bitsandbytes was not installed on this machine: its columns are n/a.", ""]
    lines += [f"Targets: {TARGETS}.", "",
              "| K | N | M | pass | efft ms | efft TFLOP/s | bnb ms | bnb TFLOP/s | dense ms | dense TFLOP/s "
              "| x bnb | x dense | efft extra MiB | bnb extra MiB | rel err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def tf(k):
            return "n/a" if r[f"{k}_tflops"] is None else f"{r[k + '_tflops']:.1f}"

        vs_bnb = "n/a" if r["vs_bnb"] is None else f"{r['vs_bnb']:.2f}"
        lines.append(
            f"| {r['K']} | {r['N']} | {r['M']} | {'fwd' if r['direction'] == 'forward' else 'bwd-input'} "
            f"| {r['efft_ms']:.3f} | {tf('efft')} | {_fmt_ms(r['bnb_ms'])} | {tf('bnb')} | {r['dense_ms']:.3f} "
            f"| {tf('dense')} | {vs_bnb} "
            f"| {r['vs_dense']:.2f} | {_fmt_mib(r['efft_extra'])} | {_fmt_mib(r['bnb_extra'])} | {r['rel_err']:.1e} |")
    lines += ["", "## Target check", ""]
    lines += _targets(rows, have_bnb)
    lines += ["", "## Sparse backward (kept-token fraction)", "",
              "dW = dY[idx]^T X[idx] with rows gathered in the kernel (fp32 output), vs torch gather + matmul "
              "and vs the dense dY^T X over all rows; dX[idx] = dY[idx] W with W 4-bit.", "",
              "| K | N | tokens | kept | efft dW ms | torch dW ms | dense all rows ms | efft dX[idx] 4-bit ms "
              "| efft dW extra MiB | torch dW extra MiB | rel err |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sparse:
        lines.append(f"| {s['K']} | {s['N']} | {s['tokens']} | {s['fraction']:.0%} | {s['wgrad_ms']:.3f} "
                     f"| {s['wgrad_torch_ms']:.3f} | {s['dense_all_rows_ms']:.3f} | {s['dequant_igrad_ms']:.3f} "
                     f"| {_fmt_mib(s['wgrad_extra'])} | {_fmt_mib(s['wgrad_torch_extra'])} | {s['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def _targets(rows, have_bnb):
    out = []
    big = [r for r in rows if r["M"] >= 4096]
    one = [r for r in rows if r["M"] == 1]
    if have_bnb and big:
        worst = min(r["vs_bnb"] for r in big)
        out.append(f"- M >= 4096, efft vs bnb (>= 1.5x): worst {worst:.2f}x -> {'met' if worst >= 1.5 else 'NOT met'}")
    if big:
        worst = min(r["vs_dense"] for r in big)
        out.append(f"- M >= 4096, efft vs dense (>= 0.85x): worst {worst:.2f}x -> {'met' if worst >= 0.85 else 'NOT met'}")
    if have_bnb and one:
        worst = min(r["vs_bnb"] for r in one)
        out.append(f"- M = 1, efft vs bnb (>= 2x): worst {worst:.2f}x -> {'met' if worst >= 2 else 'NOT met'}")
    ext = [r["efft_extra"] for r in rows if r["efft_extra"] is not None]
    if ext:
        full = min(r["N"] * r["K"] * 2 for r in rows)
        out.append(f"- efft extra memory at most {max(ext) / 2**20:.1f} MiB; smallest full bf16 weight "
                   f"{full / 2**20:.1f} MiB -> {'no full-size weight allocated' if max(ext) < full else 'CHECK'}")
    return out or ["- (no rows)"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run tiny shapes on CPU under the Triton interpreter to check the script works")
    ap.add_argument("--compile-check", action="store_true",
                    help="compile every kernel config for an H100 (sm_90) ahead of time and report resources")
    ap.add_argument("--out", type=Path, default=None,
                    help="card path (default cards/ops.md on a GPU; the smoke run writes a card only when given)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated KxN (in x out) shapes instead of the Llama-8B ones, e.g. 4096x14336")
    ap.add_argument("--ms", default=None, help="comma-separated token counts M instead of 1,16,512,4096,16384")
    ap.add_argument("--no-sparse", action="store_true", help="skip the sparse-backward section")
    ap.add_argument("--reps", type=int, default=None, help="timing: ms per do_bench on GPU, repetitions on CPU")
    args = ap.parse_args(argv)
    if args.compile_check:
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        sys.path.insert(0, str(ROOT))
        from efft.ops._compile_check import compile_all, summary

        rows = compile_all(full=True)
        print(summary(rows))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
        return 0 if all(r["ok"] and r["fits_smem"] for r in rows) else 1
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (efft.ops imports it lazily)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_ops: no CUDA GPU here; the GPU benchmark needs one (run it on an H100/H200). "
              "Nothing written. Use --cpu-smoke to check the script under the Triton interpreter.")
        return 0
    sys.path.insert(0, str(ROOT))
    reps = args.reps if args.reps is not None else (2 if args.cpu_smoke else 100)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes else None
    ms = [int(v) for v in args.ms.split(",")] if args.ms else None
    rows, sparse, have_bnb = run(args.cpu_smoke, reps, shapes, ms, not args.no_sparse)
    env = environment(not args.cpu_smoke, have_bnb)
    text = card(rows, sparse, env, have_bnb, args.cpu_smoke)
    out = args.out if args.out is not None else (None if args.cpu_smoke else ROOT / "cards" / "ops.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(dict(environment=env, rows=rows, sparse=sparse), indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
