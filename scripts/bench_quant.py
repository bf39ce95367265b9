"""Benchmark efft's quantized weights against bitsandbytes (and torchao's NF4 when importable).

Measures, in one run so ratios compare like with like:
  * bits per parameter (bytes of packed weight + statistics, counted from the tensors),
  * SQNR vs the fp32 weight (Gaussian and heavy-tailed Student-t weights),
  * whether efft's bytes equal bitsandbytes' for the same input,
  * quantize, dequantize and Linear forward+backward time (best of N repeats).
Writes cards/quant.md (and cards/quant.json). CPU rows always; GPU rows when CUDA is available.

    python scripts/bench_quant.py                 # defaults: 2048x2048 weight, 512-token batch
    PYTHONPATH=/path/to/torchao python scripts/bench_quant.py   # include torchao NF4
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from efft.quant import QuantLinear, dequantize_4bit, quantize_4bit  # noqa: E402
from efft.quant.formats import dequantize_int8_rowwise, quantize_int8_rowwise  # noqa: E402

FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def _try_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        return bnb, F
    except Exception:
        return None, None


def _try_torchao():
    try:
        import torchao
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        return torchao.__version__, to_nf4, linear_nf4
    except Exception:
        try:
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4  # older layout

            import torchao

            return torchao.__version__, to_nf4, linear_nf4
        except Exception:
            return None, None, None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)  # best of N: on a shared machine the least-disturbed run is the estimate


def sqnr(w, wq):
    w, wq = w.double(), wq.double()
    return 10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum()).item()


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def state_bytes(packed, st):
    return nbytes(packed) + st.nbytes()


def weights(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(*shape, generator=g) * 0.02
    t = torch.distributions.StudentT(3.0).sample(shape) * 0.02  # heavy tails, like real LLM weights
    return {"gaussian": gauss.to(device), "student-t(3)": t.to(device)}


def quality_rows(device, shape, bnbF, to_nf4):
    rows = []
    ws = weights(shape, device)
    n = shape[0] * shape[1]
    for qt, dq in FORMATS:
        row = {"device": device.type, "format": qt + (" + double quant" if dq else ""), "library": "efft"}
        p, st = quantize_4bit(ws["gaussian"], qt, 64, dq)
        row["bits/param"] = 8 * state_bytes(p, st) / n
        for name, w in ws.items():
            p, st = quantize_4bit(w, qt, 64, dq)
            row[f"SQNR {name} (dB)"] = sqnr(w, dequantize_4bit(p, st, torch.float32))
        if bnbF is not None and device.type == "cpu":
            w = ws["gaussian"]
            p, st = quantize_4bit(w, qt, 64, dq)
            rp, rst = bnbF.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
            same = torch.equal(p, rp) and torch.equal(st.absmax, rst.absmax)
            if dq:
                same = same and torch.equal(st.state2.absmax, rst.state2.absmax) and torch.equal(st.offset, rst.offset)
            row["bytes = bitsandbytes"] = "yes" if same else "NO"
        rows.append(row)
    row = {"device": device.type, "format": "int8 row-wise", "library": "efft"}
    q, s, _ = quantize_int8_rowwise(ws["gaussian"])
    row["bits/param"] = 8 * nbytes(q, s) / n
    for name, w in ws.items():
        q, s, _ = quantize_int8_rowwise(w)
        row[f"SQNR {name} (dB)"] = sqnr(w, dequantize_int8_rowwise(q, s))
    rows.append(row)
    if to_nf4 is not None:
        row = {"device": device.type, "format": "nf4 + double quant", "library": "torchao"}
        t = to_nf4(ws["gaussian"], 64, 256)
        inner = [t.quantized_scalers, t.quantization_factor, t.quantized_data, t.nf4]
        row["bits/param"] = 8 * nbytes(*inner) / n
        for name, w in ws.items():
            row[f"SQNR {name} (dB)"] = sqnr(w, to_nf4(w, 64, 256).get_original_weight())
        rows.append(row)
    return rows


def speed_rows(device, shape, tokens, repeats, bnb, bnbF, to_nf4, linear_nf4):
    rows = []
    out_f, in_f = shape
    w = weights(shape, device)["gaussian"]
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    x0 = torch.randn(tokens, in_f, device=device, dtype=compute)
    dy = torch.randn(tokens, out_f, device=device, dtype=compute)

    def fwd_bwd(layer_fn):
        def run():
            x = x0.detach().requires_grad_(True)
            y = layer_fn(x)
            y.backward(dy)
        return run

    for qt, dq in [("nf4", False), ("nf4", True)]:
        label = qt + (" + dq" if dq else "")
        r = {"device": device.type, "format": label, "shape": f"{out_f}x{in_f}", "tokens": tokens,
             "compute": str(compute).replace("torch.", "")}
        p, st = quantize_4bit(w, qt, 64, dq)
        r["efft quantize (ms)"] = 1e3 * timeit(lambda: quantize_4bit(w, qt, 64, dq), device, repeats)
        r["efft dequantize (ms)"] = 1e3 * timeit(lambda: dequantize_4bit(p, st, compute), device, repeats)
        ql = QuantLinear.from_weight(w, quant_type=qt, double_quant=dq, compute_dtype=compute)
        r["efft Linear fwd+bwd (ms)"] = 1e3 * timeit(fwd_bwd(ql), device, repeats)
        if bnb is not None:
            rp, rst = bnbF.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
            r["bnb quantize (ms)"] = 1e3 * timeit(
                lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq), device, repeats)
            r["bnb dequantize (ms)"] = 1e3 * timeit(lambda: bnbF.dequantize_4bit(rp, rst), device, repeats)
            bl = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute, quant_type=qt,
                                   compress_statistics=dq)
            bl.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=qt, compress_statistics=dq,
                                          blocksize=64)
            bl = bl.to(device).train()  # train mode: the fp dequantize + matmul path used for fine-tuning
            r["bnb Linear fwd+bwd (ms)"] = 1e3 * timeit(fwd_bwd(bl), device, repeats)
            for k in ("quantize", "dequantize", "Linear fwd+bwd"):
                r[f"efft/bnb {k}"] = r[f"efft {k} (ms)"] / r[f"bnb {k} (ms)"]
        if to_nf4 is not None and dq:
            t = to_nf4(w.to(compute), 64, 256)
            r["torchao quantize (ms)"] = 1e3 * timeit(lambda: to_nf4(w.to(compute), 64, 256), device, repeats)
            r["torchao dequantize (ms)"] = 1e3 * timeit(lambda: t.get_original_weight(), device, repeats)
            r["torchao Linear fwd+bwd (ms)"] = 1e3 * timeit(fwd_bwd(lambda x: linear_nf4(x, t)), device, repeats)
            for k in ("quantize", "dequantize", "Linear fwd+bwd"):
                r[f"efft/torchao {k}"] = r[f"efft {k} (ms)"] / r[f"torchao {k} (ms)"]
        dense = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=compute).requires_grad_(False)
        r["dense Linear fwd+bwd (ms)"] = 1e3 * timeit(fwd_bwd(dense), device, repeats)
        rows.append(r)
    return rows


def table(rows, cols):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


NOTES = [
    "efft's packed bytes, absmax, offset and nested statistics equal bitsandbytes' CPU output for NF4/FP4 with and"
    " without double quant, fp32/fp16/bf16, sizes not divisible by the blocksize (tests/quant/test_formats.py).",
    "bitsandbytes 0.50.2's CPU (AVX512) `dequantize_4bit` mis-scales blocks that cross a row boundary (e.g. a"
    " 64x64 weight with blocksize 128); efft's dequantization is right there, so its dequantize is compared with"
    " an independent formula everywhere and with bitsandbytes where blocks stay inside rows.",
    "bitsandbytes' CPU 8-bit `quantize_blockwise` snaps values to a 65536-point grid before the code lookup (an exact"
    " 0 becomes code 131 = 2.1e-5 x absmax). efft reproduces it byte for byte for the nested statistics and offers"
    " exact nearest rounding (`rounding=\"nearest\"`, its default) for general tensors such as optimizer moments.",
    "bitsandbytes' Linear4bit in eval mode on AVX512-BF16 CPUs repacks the weight for a bf16 kernel (lower"
    " precision); the timings and the equality tests use its train mode, the fine-tuning path.",
    "efft's CPU path is plain torch (one gather per byte + a scale multiply); bitsandbytes' CPU dequantize is a"
    " multi-threaded C kernel. On CUDA the 4-bit matmul goes through efft.ops.dequant_matmul (Triton).",
]


def _gpu_note(rows) -> list:
    """Say so when the card has CPU rows only (the GPU rows come from a run on a CUDA machine)."""
    if any(r.get("device") == "cuda" for r in rows):
        return []
    return ["No GPU rows: the machine that wrote this card had no GPU. On a CUDA machine the same command adds"
            " them (efft's fused Triton dequantize-matmul from efft.ops against bitsandbytes' CUDA kernels)."]


def render(env, quality, speed, qshape):
    qcols = ["device", "library", "format", "bits/param", "SQNR gaussian (dB)", "SQNR student-t(3) (dB)",
             "bytes = bitsandbytes"]
    scols = ["device", "format", "shape", "tokens", "compute",
             "efft quantize (ms)", "bnb quantize (ms)", "torchao quantize (ms)", "efft/bnb quantize",
             "efft dequantize (ms)", "bnb dequantize (ms)", "torchao dequantize (ms)", "efft/bnb dequantize",
             "efft/torchao dequantize",
             "efft Linear fwd+bwd (ms)", "bnb Linear fwd+bwd (ms)", "torchao Linear fwd+bwd (ms)",
             "dense Linear fwd+bwd (ms)", "efft/bnb Linear fwd+bwd", "efft/torchao Linear fwd+bwd"]
    ao = env.get("torchao", "")
    md = [
        "# Quantized base weights: efft vs bitsandbytes" + ("" if str(ao).startswith("not") else " vs torchao"),
        "",
        f"Written by `scripts/bench_quant.py` on {env['date']}.",
        "",
        "## Environment",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        "",
        "## Size and accuracy",
        "",
        f"Weight {qshape[0]}x{qshape[1]}, blocksize 64 (torchao: 64, scaler blocks 256). Bits/param counts the",
        "packed codes and every statistic tensor (absmax, code books, nested scales, offset). SQNR =",
        "10 log10(|W|^2 / |W - deq(W)|^2) against the fp32 weight.",
        "",
        table(quality, qcols),
        "",
        "## Speed",
        "",
        "Best of N repeats after warm-up (the machine is shared), all libraries in this one run. Linear fwd+bwd: y = x W^T with",
        "dy given, input gradient only (frozen base), bitsandbytes in train mode (its fine-tuning path).",
        "Ratios < 1 mean efft is faster.",
        "",
        table(speed, scols),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in NOTES + _gpu_note(quality + speed)],
        "",
        "## Usage",
        "",
        "```yaml",
        "quant: {type: nf4, double_quant: true, compute_dtype: bfloat16, skip: [lm_head]}",
        "adapter: {type: lora, r: 16, lora_alpha: 32}      # or dora, or peqa (train the scales)",
        "```",
        "",
        "```python",
        "from efft.quant import quantize_from_checkpoint, save_quantized, prepare",
        "from efft.quant.peft import apply_lora, export_merged",
        "model = quantize_from_checkpoint(\"ckpt_dir\", {\"type\": \"nf4\", \"double_quant\": True})  # layer by layer",
        "model = apply_lora(model, {\"type\": \"lora\", \"r\": 16, \"lora_alpha\": 32})   # = prepare(model, None, adapter)",
        "# ... train ...; model.save_pretrained(\"adapter\") also loads onto a transformers+bitsandbytes 4-bit base",
        "full = export_merged(model)                       # full-precision model with the adapter merged",
        "save_quantized(quantized_model, \"out_dir\")        # opens with AutoModelForCausalLM.from_pretrained + bitsandbytes",
        "```",
        "",
    ]
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="2048x2048", help="weight [out]x[in] for the timings")
    ap.add_argument("--quality-shape", default="1024x4096", help="weight for bits/param and SQNR")
    ap.add_argument("--tokens", type=int, default=512, help="rows of x for Linear forward+backward")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--machine", default=None, help="words describing the machine, for the card")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cards", "quant.md"))
    ap.add_argument("--from-json", default=None, help="re-render the card from a saved cards/quant.json (no measuring)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        qshape = tuple(int(s) for s in data.get("quality_shape", args.quality_shape).split("x"))
        md = render(data["env"], data["quality"], data["speed"], qshape)
        with open(os.path.abspath(args.out), "w") as f:
            f.write("\n".join(md))
        print("\n".join(md))
        return
    shape = tuple(int(s) for s in args.shape.split("x"))
    qshape = tuple(int(s) for s in args.quality_shape.split("x"))
    bnb, bnbF = _try_bnb()
    ao_version, to_nf4, linear_nf4 = _try_torchao()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    quality, speed = [], []
    for dev in devices:
        print(f"[bench_quant] {dev.type}: quality", flush=True)
        quality += quality_rows(dev, qshape, bnbF, to_nf4)
        print(f"[bench_quant] {dev.type}: speed", flush=True)
        speed += speed_rows(dev, shape, args.tokens, args.repeats, bnb, bnbF, to_nf4, linear_nf4)

    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    machine = args.machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine, "load average (1/5/15 min)": load,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "bitsandbytes": getattr(bnb, "__version__", None) if bnb else "not installed",
        "torchao": ao_version or "not importable (pip install torchao leaves torch alone; put it on PYTHONPATH)",
    }
    md = render(env, quality, speed, qshape)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(md))
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"env": env, "quality": quality, "speed": speed, "quality_shape": args.quality_shape}, f,
                  indent=2, default=str)
    print("\n".join(md))
    print(f"[bench_quant] wrote {out}")


if __name__ == "__main__":
    main()
