#!/usr/bin/env python
"""Benchmark efft.offload: peak device memory and step time with and without each offload mode,
against torchao's CPU-offload optimizer and DeepSpeed ZeRO-Offload where they are installed.

GPU (the real benchmark; needs CUDA):
    python scripts/bench_offload.py                      # ~1.1B Llama (TinyLlama shape), random init
    python scripts/bench_offload.py --modes baseline,opt_offload --steps 6
Each mode runs in its own subprocess (clean allocator, exact peak). Results go to
cards/offload.json and the GPU section of cards/offload.md (the GPU is named there).

CPU (what a CPU can honestly show; host == device, so no memory is saved):
    python scripts/bench_offload.py --cpu-overlap        # does the eager CPU step overlap backward?
    python scripts/bench_offload.py --cpu-smoke          # tiny model, every mode runs once (CI)

Without a GPU and without a --cpu-* flag it prints why nothing ran and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ["baseline", "opt_offload", "opt_offload_lazy", "act_offload", "gc", "gc_act_offload", "opt_act_offload",
         "gc_opt_act_offload", "torchao_offload", "deepspeed_zero_offload"]
# Which baseline each mode is compared with (the same activation recipe without the offload).
BASE_OF = {"gc_act_offload": "gc", "gc_opt_act_offload": "gc"}

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=4096)
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


def offload_cfg(**kw):
    base = dict(optimizer=True, activations=True, activation_mode="all", min_offload_bytes=1 << 20, prefetch_layers=1,
                min_seq_length=0, pin_memory=True, max_pinned_bytes=64 << 30, keep_small_params_on_device_bytes=1 << 20)
    base.update(kw)
    return SimpleNamespace(**base)


def build_model(shape: dict, device, attn="sdpa"):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    model.train()
    return model


def make_optimizer(mode: str, model, lr: float, cfg):
    import torch

    from efft.offload import OffloadOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW everywhere it runs (CUDA and CPU kernels): the CPU step is the offload's cost.
    fused = torch.cuda.is_available()
    if "opt_offload" in mode:
        # release_grads: offloaded gradients leave the GPU once copied, as torchao's offload_gradients.
        return OffloadOptimizer(params, torch.optim.AdamW, cfg, lr=lr, fused=fused, eager=not mode.endswith("lazy"),
                                max_grad_norm=1.0, release_grads=True)
    if mode == "torchao_offload":
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError:  # older torchao; raises ImportError when torchao is absent
            from torchao.prototype.low_bit_optim import CPUOffloadOptimizer

        return CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=True, fused=fused, lr=lr)
    return torch.optim.AdamW(params, lr=lr, fused=fused)


def run_mode(mode: str, shape: dict, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    """One mode in this process: median step time, peak memory, bytes of weights and grads."""
    import torch

    from efft.offload import enable_activation_offload, peak_host_bytes

    cuda = device == "cuda"
    model = build_model(shape, device)
    if mode.startswith("gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = offload_cfg(activation_mode="checkpoint_inputs" if mode.startswith("gc") else "all")
    if not cuda:  # tiny shapes: offload everything so every path runs
        cfg.min_offload_bytes = 0
        cfg.keep_small_params_on_device_bytes = 4096
    handle = enable_activation_offload(model, cfg) if "act_offload" in mode else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)
    batch_kw = {"input_ids": ids, "labels": ids}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    if mode == "deepspeed_zero_offload":
        step_fn, peak_fn = _deepspeed(model, batch_kw, batch)
    else:
        opt = make_optimizer(mode, model, 1e-5, cfg)
        # Global-norm clipping at 1.0 everywhere it exists: on the device for plain AdamW, inside the
        # offload optimizer (max_grad_norm), inside DeepSpeed; torchao's offload (gradients moved
        # to host in backward) leaves none on the device to clip, so it runs without.
        plain = isinstance(opt, torch.optim.AdamW)

        def step_fn():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch_kw).loss
            loss.backward()
            if plain:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        peak_fn = None
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"mode": mode, "step_s": statistics.median(times), "step_s_all": times, "loss": float(loss.detach()),
           "weight_bytes": weight_bytes, "grad_bytes": weight_bytes, "host_peak_bytes": peak_host_bytes()}
    if cuda:
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    if handle is not None:
        out["activation_stats"] = dict(handle.stats)
    return out


def _deepspeed(model, batch_kw, batch):
    import deepspeed  # noqa: raises ImportError when absent

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)

    def step_fn():
        loss = engine(**batch_kw).loss
        engine.backward(loss)
        engine.step()
        return loss

    return step_fn, None


# ------------------------------------------------------------------------------------------ driver
def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def run_worker(mode: str, args, seq: int) -> dict:
    """One mode in a fresh subprocess (clean allocator, exact peak); errors come back as a reason."""
    cmd = [sys.executable, __file__, "--_worker", mode, "--batch", str(args.batch), "--seq", str(seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(f"[bench_offload] {mode} seq {seq} ...", flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {args.timeout} s"}
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        why = (p.stderr.strip().splitlines() or ["failed"])[-1][:300]
        print(f"    not run: {why}")
        return {"mode": mode, "error": why}
    r = json.loads(line[-1][7:])
    print(f"    step {r['step_s']:.3f} s   peak {r['peak_bytes'] / 2**30:.2f} GiB")
    return r


def seq_sweep(args) -> list[dict]:
    """Step time of activation offload vs none per sequence length: where offload stops paying is
    the min_seq_length to put in recipes (below it the copies are not hidden behind compute)."""
    rows = []
    for seq in args.sweep:
        pair = {m: run_worker(m, args, seq) for m in ("gc", "gc_act_offload", "baseline", "act_offload")}
        row = {"seq": seq}
        for off, base in (("gc_act_offload", "gc"), ("act_offload", "baseline")):
            if "error" not in pair[off] and "error" not in pair[base]:
                row[off] = pair[off]["step_s"] / pair[base]["step_s"]
        rows.append(row)
    return rows


def drive_gpu(args) -> int:
    results = {mode: run_worker(mode, args, args.seq) for mode in args.modes}
    sweep = seq_sweep(args) if args.sweep else []
    report = summarize(results)
    meta = {"device": gpu_name(), "shape": LLAMA_1B, "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "torch": __import__("torch").__version__, "python": platform.python_version()}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "summary": report, "seq_sweep": sweep}, indent=1))
    md = gpu_markdown(meta, report)
    if sweep:
        md += "\n\nStep time with activation offload / without, by sequence length (offload pays where the ratio is near 1):\n\n"
        md += "| seq | checkpoint inputs offloaded / gc | all offloaded / none |\n| ---: | ---: | ---: |\n"
        md += "\n".join(f"| {r['seq']} | {r.get('gc_act_offload', float('nan')):.2f} | {r.get('act_offload', float('nan')):.2f} |"
                         for r in sweep)
    write_card_section(Path(args.card), "gpu", md)
    print(md)
    return 0


def summarize(results: dict) -> list[dict]:
    """Per mode: peak, step time and the saving on (peak - weights): gradients + optimizer state +
    activations + transient buffers, relative to its baseline (offload modes here also free the
    offloaded gradients, as torchao's offload_gradients and ZeRO-Offload do)."""
    rows = []
    for mode, r in results.items():
        if "error" in r:
            rows.append({"mode": mode, "error": r["error"]})
            continue
        base = results.get(BASE_OF.get(mode, "baseline"), {})
        row = {"mode": mode, "peak_gib": r["peak_bytes"] / 2**30, "step_s": r["step_s"]}
        if "peak_bytes" in base:
            fixed = r["weight_bytes"]
            b_rest, m_rest = base["peak_bytes"] - fixed, r["peak_bytes"] - fixed
            row["state_act_saving"] = 1 - m_rest / b_rest if b_rest > 0 else None
            row["time_ratio"] = r["step_s"] / base["step_s"]
            row["vs"] = BASE_OF.get(mode, "baseline")
        rows.append(row)
    return rows


def gpu_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Measured on **{meta['device']}**, torch {meta['torch']}, Llama {meta['shape']['num_hidden_layers']} layers x "
             f"{meta['shape']['hidden_size']} (~1.1B parameters, fp32 weights, bf16 autocast), batch {meta['batch']} x "
             f"{meta['seq']} tokens, median of {meta['steps']} steps.", "",
             "| mode | peak GiB | step s | vs | memory beyond weights saved (grads + state + activations) | step time ratio | target (>= 60% saved, <= 1.15x) |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | not run: {r['error']} | | | | | |")
            continue
        saving, ratio = r.get("state_act_saving"), r.get("time_ratio")
        sv = f"{100 * saving:.0f}%" if saving is not None else ""
        tr = f"{ratio:.2f}x" if ratio is not None else ""
        met = "" if saving is None or ratio is None or r["mode"] in ("baseline", "gc") else (
            "met" if saving >= 0.60 and ratio <= 1.15 else "missed")
        lines.append(f"| {r['mode']} | {r['peak_gib']:.2f} | {r['step_s']:.3f} | {r.get('vs', '')} | {sv} | {tr} | {met} |")
    return "\n".join(lines)


def write_card_section(card: Path, name: str, body: str) -> None:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = card.read_text() if card.exists() else "# Offload run card\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(text)


# ------------------------------------------------------------------------------------------ CPU
def cpu_overlap(args) -> int:
    """On CPU (host == device): backward + step() time with the plain optimizer, the offload
    optimizer stepping at step() (torchao's schedule) and stepping eagerly in backward; and how much
    of the CPU step work finished before backward returned."""
    import torch

    from efft.offload import OffloadOptimizer

    shape = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=1024)
    cfg = offload_cfg(keep_small_params_on_device_bytes=1 << 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=g)
    modes = ("plain", "offload_at_step", "offload_eager")
    runs = {}
    for mode in modes:
        model = build_model(shape, "cpu", attn="eager")
        params = list(model.parameters())
        if mode == "plain":
            opt = torch.optim.AdamW(params, lr=1e-4)
        else:
            opt = OffloadOptimizer(params, torch.optim.AdamW, cfg, lr=1e-4, eager=mode == "offload_eager", trace=True,
                                   workers=args.workers)
        runs[mode] = (model, opt, {"fwd": [], "bwd": [], "stp": [], "during": []})
    # Modes interleaved step by step, order rotated: a shared machine's load spreads over all of them.
    for i in range(args.warmup + args.steps):
        for mode in modes[i % 3:] + modes[: i % 3]:
            model, opt, rec = runs[mode]
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            opt.zero_grad()
            if i >= args.warmup:
                rec["fwd"].append(t1 - t0)
                rec["bwd"].append(t2 - t1)
                rec["stp"].append(t3 - t2)
                if mode != "plain":
                    done = [e for e in opt.trace if e[0] == "step" and len(e) > 3 and t1 <= e[3]]
                    rec["during"].append(sum(e[3] <= t2 for e in done) / max(1, len(done)))
            if mode != "plain":
                opt.trace.clear()
    rows = {}
    for mode in modes:
        model, opt, rec = runs[mode]
        rows[mode] = {"forward_s": statistics.median(rec["fwd"]), "backward_s": statistics.median(rec["bwd"]),
                      "step_s": statistics.median(rec["stp"]),
                      "backward_plus_step_s": statistics.median(b + s for b, s in zip(rec["bwd"], rec["stp"])),
                      "steps_done_in_backward": statistics.median(rec["during"]) if rec["during"] else None}
        if mode != "plain":
            opt.close()
    n = sum(p.numel() for p in build_model(shape, "meta").parameters())
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                      f"{torch.get_num_threads()})", "params": n, "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "workers": args.workers}
    md = cpu_markdown(meta, rows)
    print(md)
    if args.card:
        write_card_section(Path(args.card), "cpu", md)
    return 0


def cpu_markdown(meta: dict, rows: dict) -> str:
    lines = [f"CPU numbers ({meta['device']}; host == device, so no memory is saved and copies are memcpy): Llama "
             f"{meta['params'] / 1e6:.1f}M parameters fp32, batch {meta['batch']} x {meta['seq']}, median of {meta['steps']} "
             f"steps (modes interleaved step by step), {meta['workers']} worker threads, load average "
             f"{os.getloadavg()[0]:.1f} at the end.", "",
             "| optimizer | forward s | backward s | step() s | backward + step() s | CPU steps done before backward returned |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode, r in rows.items():
        frac = f"{100 * r['steps_done_in_backward']:.0f}%" if r["steps_done_in_backward"] is not None else "n/a"
        lines.append(f"| {mode} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['step_s']:.3f} | "
                     f"{r['backward_plus_step_s']:.3f} | {frac} |")
    return "\n".join(lines)


def cpu_smoke(args) -> int:
    """Every efft mode once on a tiny model on CPU: the script's code paths work (numbers meaningless)."""
    out = {}
    for mode in ("baseline", "opt_offload", "opt_offload_lazy", "act_offload", "gc", "gc_act_offload", "gc_opt_act_offload"):
        r = run_mode(mode, LLAMA_TINY, batch=2, seq=32, steps=1, warmup=1, device="cpu")
        out[mode] = r
        print(f"{mode:22s} step {r['step_s']:.3f} s  loss {r['loss']:.4f}  host peak {r['host_peak_bytes']} B")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="--cpu-overlap: offload worker threads")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per GPU mode")
    ap.add_argument("--sweep", default="", help="GPU: comma-separated sequence lengths for the min_seq_length sweep, e.g. 256,512,1024,2048")
    ap.add_argument("--json", default=None)
    ap.add_argument("--card", default=None)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--cpu-overlap", action="store_true")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args.modes = [m for m in args.modes.split(",") if m]
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
    if args._worker:
        r = run_mode(args._worker, LLAMA_1B, args.batch, args.seq, args.steps, args.warmup, "cuda")
        print("RESULT " + json.dumps(r))
        return 0
    if args.cpu_smoke:
        return cpu_smoke(args)
    if args.cpu_overlap:
        args.batch, args.seq, args.steps = args.batch or 4, args.seq or 256, args.steps or 5
        return cpu_overlap(args)
    import torch

    if not torch.cuda.is_available():
        print("bench_offload: no CUDA device here, so the GPU benchmark (peak memory, step time, ~1B Llama) did not run. "
              "Run it on a GPU machine; --cpu-overlap measures the CPU-side overlap, --cpu-smoke checks the code paths.")
        return 0
    args.batch, args.seq, args.steps = args.batch or 4, args.seq or 2048, args.steps or 6
    args.json = args.json or str(ROOT / "cards" / "offload.json")
    args.card = args.card or str(ROOT / "cards" / "offload.md")
    return drive_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
