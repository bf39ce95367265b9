"""Optimizer step time and state memory on Llama-like weight shapes, efft against its peers.

One run, one process: torch AdamW, bitsandbytes AdamW8bit, galore-torch, apollo-torch (APOLLO and
APOLLO-Mini) and efft's optimizers step the same parameters with the same random gradients.
The optimizers are stepped in turn, one step each per round, so load from other processes on a
shared machine falls on all of them alike. Step time is the median of ordinary steps plus the projector refresh cost amortized over
``--gap`` steps (refresh cost = median refresh step - median ordinary step, measured on warm
refreshes, stagger off so each refresh step refreshes every matrix). State bytes are summed over
the tensors in ``optimizer.state`` (plus the projection matrices the peers keep inside projector
objects). Ratios are to torch AdamW. Writes a section of cards/optim.md.

    python scripts/bench_optim.py                 # CPU shapes (hidden 1024)
    python scripts/bench_optim.py --shapes 7b     # two LLaMA-7B layers + embeddings, on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efft.optim import APOLLOAdamW, FRUGAL, GaLoreAdamW  # noqa: E402

SHAPES = {
    # hidden, intermediate, kv dim, layers, vocab
    "cpu": dict(hidden=1024, inter=2752, kv=1024, layers=2, vocab=4096),
    "small": dict(hidden=256, inter=688, kv=256, layers=2, vocab=2048),
    "7b": dict(hidden=4096, inter=11008, kv=4096, layers=2, vocab=32000),
}


def make_params(spec, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, i, kv, v = spec["hidden"], spec["inter"], spec["kv"], spec["vocab"]

    def w(m, n):
        return torch.nn.Parameter((torch.randn(m, n, generator=g) * 0.02).to(device))

    low, rest = [], [w(v, h), w(v, h)]  # embeddings, lm_head
    for _ in range(spec["layers"]):
        low += [w(h, h), w(kv, h), w(kv, h), w(h, h), w(i, h), w(i, h), w(h, i)]
        rest += [torch.nn.Parameter(torch.ones(h, device=device)) for _ in range(2)]
    rest.append(torch.nn.Parameter(torch.ones(h, device=device)))
    return low, rest


def make_grads(params, device, sets=3):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(p.shape, generator=g) * 1e-3).to(device) for p in params] for _ in range(sets)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peer_state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif k == "projector" and getattr(v, "ortho_matrix", None) is not None:
                om = v.ortho_matrix
                for t in (om if isinstance(om, (list, tuple)) else [om]):
                    total += t.numel() * t.element_size()
    return total


def candidates(args):
    r, gap = args.rank, args.refresh_gap
    out = {}

    def lowrank(**kw):
        return lambda low, rest: [{"params": rest}, {"params": low, "rank": r, "update_proj_gap": gap, "proj_type": "std", **kw}]

    def plain(low, rest):
        return [{"params": rest + low}]

    out["torch AdamW"] = (plain, lambda g: torch.optim.AdamW(g, lr=1e-3), False)
    try:
        import bitsandbytes as bnb

        out["bnb AdamW8bit"] = (plain, lambda g: bnb.optim.AdamW8bit(g, lr=1e-3), False)
    except Exception as e:  # noqa: BLE001  (GPU machines may lack it)
        print("bitsandbytes unavailable:", e)
    try:
        import galore_torch

        out["galore-torch GaLore"] = (lowrank(scale=0.25), lambda g: galore_torch.GaLoreAdamW(g, lr=1e-3), True)
    except ImportError as e:
        print("galore-torch unavailable:", e)
    try:
        import apollo_torch

        out["apollo-torch APOLLO"] = (lowrank(scale=1.0, proj="random", scale_type="channel"), lambda g: apollo_torch.APOLLOAdamW(g, lr=1e-3), True)
        out["apollo-torch APOLLO-Mini"] = (
            lambda low, rest: [{"params": rest}, {"params": low, "rank": 1, "update_proj_gap": gap, "proj_type": "std",
                                                  "scale": 128.0, "proj": "random", "scale_type": "tensor"}],
            lambda g: apollo_torch.APOLLOAdamW(g, lr=1e-3), True)
    except ImportError as e:
        print("apollo-torch unavailable:", e)
    for bits in args.bits:
        tag = "" if bits == 32 else " 8-bit"
        out[f"efft GaLore (svd){tag}"] = (lowrank(scale=0.25), lambda g, b=bits: GaLoreAdamW(g, lr=1e-3, state_bits=b), True)
        out[f"efft GaLore (rsvd){tag}"] = (lowrank(scale=0.25), lambda g, b=bits: GaLoreAdamW(g, lr=1e-3, projector="rsvd", state_bits=b), True)
        out[f"efft APOLLO{tag}"] = (lowrank(scale=1.0, scale_type="channel"), lambda g, b=bits: APOLLOAdamW(g, lr=1e-3, state_bits=b), True)
        out[f"efft APOLLO-Mini{tag}"] = (
            lambda low, rest: [{"params": rest}, {"params": low, "rank": 1, "update_proj_gap": gap, "scale": 128.0, "scale_type": "tensor"}],
            lambda g, b=bits: APOLLOAdamW(g, lr=1e-3, state_bits=b), True)
        out[f"efft FRUGAL (block){tag}"] = (lowrank(projector="block", density=0.25), lambda g, b=bits: FRUGAL(g, lr=1e-3, state_bits=b), True)
    return out


def bench_all(cands, spec, device, args):
    """Build every optimizer on its own copy of the same parameters, then step them in turn, one
    step each per round: on a shared machine, load changes hit every candidate alike."""
    low, rest = make_params(spec, device)
    grads = make_grads(low + rest, device)
    runs = {}
    for name, (make_groups, make_opt, projected) in cands.items():
        l2 = [torch.nn.Parameter(p.detach().clone()) for p in low]
        r2 = [torch.nn.Parameter(p.detach().clone()) for p in rest]
        try:
            runs[name] = dict(params=l2 + r2, opt=make_opt(make_groups(l2, r2)), projected=projected, times=[])
        except Exception as e:  # noqa: BLE001
            runs[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    del low, rest
    for s in range(args.steps):
        for name, r in runs.items():
            if "error" in r:
                continue
            for p, gr in zip(r["params"], grads[s % len(grads)]):
                p.grad = gr
            try:
                sync(device)
                t0 = time.perf_counter()
                r["opt"].step()
                sync(device)
                r["times"].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001  (a peer failing on this device is a result too)
                runs[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            for p in r["params"]:
                p.grad = None
        print(f"round {s + 1}/{args.steps} done", flush=True)
    results = {}
    gap = args.refresh_gap
    for name, r in runs.items():
        if "error" in r:
            results[name] = r
            continue
        times = r["times"]
        refresh_steps = list(range(gap, args.steps, gap)) if r["projected"] else []
        ordinary = [t for s, t in enumerate(times) if s > 0 and s not in refresh_steps]
        med = statistics.median(ordinary)
        refresh = max(0.0, statistics.median([times[s] for s in refresh_steps]) - med) if refresh_steps else 0.0
        results[name] = dict(median_s=med, refresh_s=refresh, amortized_s=med + refresh / args.gap, first_step_s=times[0],
                             state_bytes=peer_state_bytes(r["opt"]), times_s=times)
    return results


def environment(device) -> str:
    cpu = platform.processor() or platform.machine()
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write_card(section: str, key: str, path: Path) -> None:
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = path.read_text() if path.exists() else "# Projected optimizers (efft.optim)\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap the refresh cost is amortized over")
    ap.add_argument("--refresh-gap", type=int, default=4, help="refresh every this many steps while measuring")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--bits", type=int, nargs="+", default=[32], choices=[32, 8])
    ap.add_argument("--only", nargs="*", help="substrings of the candidates to run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--card", default=str(ROOT / "cards" / "optim.md"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--note", default="", help="appended to the card section (e.g. machine load)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = SHAPES[args.shapes]
    cands = {n: c for n, c in candidates(args).items() if not args.only or any(x in n for x in args.only)}
    results = bench_all(cands, spec, device, args)
    for name, r in results.items():
        print(f"{name:28s} " + (r["error"] if "error" in r else
              f"median {r['median_s']*1e3:8.1f} ms  refresh {r['refresh_s']*1e3:9.1f} ms  amortized {r['amortized_s']*1e3:8.1f} ms  state {r['state_bytes']/2**20:8.1f} MiB"), flush=True)
    base = results.get("torch AdamW", {})
    h, i, kv, v, L = spec["hidden"], spec["inter"], spec["kv"], spec["vocab"], spec["layers"]
    n_params = 2 * v * h + L * (2 * h * h + 2 * kv * h + 3 * i * h + 2 * h) + h
    lines = [
        f"## Step time and optimizer state ({args.shapes} shapes, rank {args.rank})",
        "",
        f"Device: {environment(device)}. Shapes: hidden {spec['hidden']}, intermediate {spec['inter']}, "
        f"{spec['layers']} layers, vocab {spec['vocab']} ({n_params/1e6:.1f}M parameters, fp32); rank {args.rank} "
        f"(APOLLO-Mini 1), refresh cost amortized over update_proj_gap={args.gap}. Median of {args.steps} steps, "
        f"the optimizers stepped in turn (one step each per round) in one process; `python scripts/bench_optim.py --shapes {args.shapes}`.",
        "",
        "| optimizer | median step (ms) | refresh (ms, all matrices) | amortized step (ms) | x AdamW | state (MiB) | x AdamW |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        tr = r["amortized_s"] / base["amortized_s"] if base else float("nan")
        sr = r["state_bytes"] / base["state_bytes"] if base else float("nan")
        lines.append(f"| {name} | {r['median_s']*1e3:.1f} | {r['refresh_s']*1e3:.0f} | {r['amortized_s']*1e3:.1f} | {tr:.2f} | "
                     f"{r['state_bytes']/2**20:.1f} | {sr:.3f} |")
    g_peer, g_ours = results.get("galore-torch GaLore", {}), results.get("efft GaLore (rsvd)", {})
    if "amortized_s" in g_peer and "amortized_s" in g_ours:
        lines += ["", f"efft GaLore (rsvd) / galore-torch amortized step: {g_ours['amortized_s']/g_peer['amortized_s']:.2f} (target <= 0.5)."]
    for n in ("efft APOLLO", "efft APOLLO-Mini"):
        if "amortized_s" in results.get(n, {}) and base:
            lines.append(f"{n} / torch AdamW amortized step: {results[n]['amortized_s']/base['amortized_s']:.2f} (target <= 1.5).")
    if args.note:
        lines += ["", args.note]
    section = "\n".join(lines)
    print("\n" + section)
    write_card(section, f"bench-{args.shapes}" + ("" if args.rank == 128 else f"-r{args.rank}"), Path(args.card))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
