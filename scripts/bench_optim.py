"""Optimizer step time and state memory on Llama-like weight shapes, efft against its peers.

One run, one process: torch AdamW, bitsandbytes AdamW8bit, galore-torch, apollo-torch (APOLLO and
APOLLO-Mini) and efft's optimizers step the same parameters with the same random gradients.
The optimizers are stepped in turn, one step each per round, so load from other processes on a
shared machine falls on all of them alike. Step time is the median of ordinary steps plus the projector refresh cost amortized over
``--gap`` steps (refresh cost = median refresh step - median ordinary step, measured on warm
refreshes, stagger off so each refresh step refreshes every matrix). State bytes are summed over
the tensors in ``optimizer.state`` (plus the projection matrices the peers keep inside projector
objects). Ratios are to torch AdamW: of the medians, and "paired" (the median over rounds of the ratio within
the round, robust to load that changes between rounds). Writes a section of cards/optim.md.

Two "GEMM floor" rows time only the matrix products a projected step cannot avoid (P^T G for
APOLLO; P^T G and the back-projection accumulated into the weight with ``addmm_`` for GaLore) with
fixed bases, in the same rounds: what no implementation of the method can go under on the device.

    python scripts/bench_optim.py                 # CPU shapes (hidden 1024)
    python scripts/bench_optim.py --shapes 7b     # two LLaMA-7B layers + embeddings, on a GPU
    python scripts/bench_optim.py --shapes 7b-mats --steps 4 --refresh-gap 1000 \
        --only AdamW galore-torch "efft GaLore (rsvd)" APOLLO floor   # one 4096x4096 + one 4096x11008
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efft.optim import APOLLOAdamW, FRUGAL, GaLoreAdamW  # noqa: E402
from efft.optim.projectors import add_back_projected_, choose_side, gaussian_basis, project  # noqa: E402

SHAPES = {
    # hidden, intermediate, kv dim, layers, vocab
    "cpu": dict(hidden=1024, inter=2752, kv=1024, layers=2, vocab=4096),
    "small": dict(hidden=256, inter=688, kv=256, layers=2, vocab=2048),
    "7b": dict(hidden=4096, inter=11008, kv=4096, layers=2, vocab=32000),
    # one LLaMA-7B q_proj-like and one down_proj-like matrix, no embeddings (CPU-sized 7B check)
    "7b-mats": dict(mats=[(4096, 4096), (4096, 11008)], hidden=4096),
}


def param_shapes(spec):
    """(low-rank matrix shapes, plain AdamW shapes) of a SHAPES entry."""
    if "mats" in spec:  # the listed matrices, and one norm weight for the plain group
        return list(spec["mats"]), [(spec["hidden"],)]
    h, i, kv, v = spec["hidden"], spec["inter"], spec["kv"], spec["vocab"]
    low, rest = [], [(v, h), (v, h)]  # embeddings, lm_head
    for _ in range(spec["layers"]):
        low += [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
        rest += [(h,), (h,)]
    rest.append((h,))
    return low, rest


def make_params(spec, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    low, rest = param_shapes(spec)

    def w(shape):
        return torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device))

    rest = [w(s) if len(s) == 2 else None for s in rest]  # embeddings drawn first
    low = [w(s) for s in low]
    rest = [p if p is not None else torch.nn.Parameter(torch.ones(s, device=device)) for p, s in zip(rest, param_shapes(spec)[1])]
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
    for _, basis in getattr(opt, "_proj_cache", {}).values():  # efft APOLLO's opt-in cached projection
        total += basis.numel() * basis.element_size()
    return total


class GemmFloor:
    """The matrix products of a projected step alone, with fixed Gaussian bases of the same shapes:
    R = P^T G (APOLLO) and, with ``back``, p += a P R accumulated with ``addmm_`` (GaLore). No Adam,
    no statistics, no refresh, nothing for the other parameters: a lower bound on any
    implementation's step, timed in the same rounds as the optimizers."""

    def __init__(self, groups, back: bool):
        self.low = [p for g in groups if "rank" in g for p in g["params"]]
        rank = next(g["rank"] for g in groups if "rank" in g)
        self.sides = [choose_side(tuple(p.shape), "std") for p in self.low]
        self.bases = [gaussian_basis(tuple(p.shape), min(rank, *p.shape), s, i, p.device, p.dtype)
                      for i, (p, s) in enumerate(zip(self.low, self.sides))]
        self.back = back
        self.state = {}

    @torch.no_grad()
    def step(self):
        for p, basis, side in zip(self.low, self.bases, self.sides):
            r = project(p.grad, basis, side)
            if self.back:
                add_back_projected_(p, r, basis, side, alpha=-1e-6)  # alpha != 0: BLAS skips A B at 0


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
        out[f"efft APOLLO (cache_projection){tag}"] = (
            lowrank(scale=1.0, scale_type="channel"),
            lambda g, b=bits: APOLLOAdamW(g, lr=1e-3, state_bits=b, cache_projection=True), True)
        out[f"efft APOLLO-Mini{tag}"] = (
            lambda low, rest: [{"params": rest}, {"params": low, "rank": 1, "update_proj_gap": gap, "scale": 128.0, "scale_type": "tensor"}],
            lambda g, b=bits: APOLLOAdamW(g, lr=1e-3, state_bits=b), True)
        out[f"efft FRUGAL (block){tag}"] = (lowrank(projector="block", density=0.25), lambda g, b=bits: FRUGAL(g, lr=1e-3, state_bits=b), True)
    out["GEMM floor: APOLLO (P^T G)"] = (lowrank(), lambda g: GemmFloor(g, back=False), False)
    out["GEMM floor: GaLore (P^T G + addmm_ back)"] = (lowrank(), lambda g: GemmFloor(g, back=True), False)
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
        if refresh_steps:
            refresh = max(0.0, statistics.median([times[s] for s in refresh_steps]) - med)
        elif r["projected"]:  # only the first step refreshed (gap >= steps): it also allocates the state
            refresh = max(0.0, times[0] - med)
        else:
            refresh = 0.0
        results[name] = dict(median_s=med, refresh_s=refresh, amortized_s=med + refresh / args.gap, first_step_s=times[0],
                             state_bytes=None if isinstance(r["opt"], GemmFloor) else peer_state_bytes(r["opt"]),
                             times_s=times)
    return results


def paired_ratio(rx: dict, rb: dict, args) -> float:
    """Median over the rounds where neither refreshed (nor warmed up) of this round's amortized-step
    ratio: both were stepped back to back in the round, so the load of the moment cancels out."""
    refresh_rounds = set(range(args.refresh_gap, args.steps, args.refresh_gap))
    ax, ab = rx["refresh_s"] / args.gap, rb["refresh_s"] / args.gap
    return statistics.median((tx + ax) / (tb + ab) for s, (tx, tb) in enumerate(zip(rx["times_s"], rb["times_s"]))
                             if s > 0 and s not in refresh_rounds)


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
    load_start, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = bench_all(cands, spec, device, args)
    load_end = os.getloadavg()[0]
    for name, r in results.items():
        print(f"{name:28s} " + (r["error"] if "error" in r else
              f"median {r['median_s']*1e3:8.1f} ms  refresh {r['refresh_s']*1e3:9.1f} ms  amortized {r['amortized_s']*1e3:8.1f} ms"), flush=True)
    base = results.get("torch AdamW", {})
    n_params = sum(math.prod(s) for shapes in param_shapes(spec) for s in shapes)
    if "mats" in spec:
        shapes = " + ".join(f"{m}x{n}" for m, n in spec["mats"]) + " (low-rank) and one norm weight (AdamW)"
    else:
        shapes = (f"hidden {spec['hidden']}, intermediate {spec['inter']}, {spec['layers']} layers, vocab {spec['vocab']}")
    if args.refresh_gap >= args.steps:
        refresh_how = ("refresh cost = first step - median step (only the first step refreshes; it also allocates "
                       "the state, so the refresh is over-counted alike for every optimizer)")
    else:
        refresh_how = f"refresh cost measured on refresh steps every {args.refresh_gap} steps (warm)"
    cmd = shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"## Step time and optimizer state ({args.shapes} shapes, rank {args.rank})",
        "",
        f"Device: {environment(device)}. Shapes: {shapes} ({n_params/1e6:.1f}M parameters, fp32); rank {args.rank} "
        f"(APOLLO-Mini 1); {refresh_how}, amortized over update_proj_gap={args.gap}. Median of the ordinary steps (not the first, "
        f"not refresh steps; {args.steps} steps in all), the optimizers stepped in turn (one step each per round) in one process; "
        f"`python scripts/bench_optim.py {cmd}`.",
        "",
        "| optimizer | median step (ms) | refresh (ms, all matrices) | amortized step (ms) | x AdamW | x AdamW, paired | state (MiB) | x AdamW |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        tr = r["amortized_s"] / base["amortized_s"] if base else float("nan")
        pr = paired_ratio(r, base, args) if base else float("nan")
        if r["state_bytes"] is None:
            state = "- | -"
        else:
            sr = r["state_bytes"] / base["state_bytes"] if base else float("nan")
            state = f"{r['state_bytes']/2**20:.1f} | {sr:.3f}"
        lines.append(f"| {name} | {r['median_s']*1e3:.1f} | {r['refresh_s']*1e3:.0f} | {r['amortized_s']*1e3:.1f} | {tr:.2f} | {pr:.2f} | {state} |")
    lines.append("")
    g_peer = results.get("galore-torch GaLore", {})
    for n in ("efft GaLore (rsvd)", "efft GaLore (svd)", "GEMM floor: GaLore (P^T G + addmm_ back)"):
        if "amortized_s" in g_peer and "amortized_s" in results.get(n, {}):
            what = "(target <= 0.5)" if n.startswith("efft") else "(no GaLore step can go under this on this device)"
            lines.append(f"{n} / galore-torch amortized step: {results[n]['amortized_s']/g_peer['amortized_s']:.2f}, "
                         f"paired {paired_ratio(results[n], g_peer, args):.2f} {what}.")
    for n in ("efft APOLLO", "efft APOLLO (cache_projection)", "efft APOLLO-Mini", "GEMM floor: APOLLO (P^T G)"):
        if "amortized_s" in results.get(n, {}) and base:
            what = "(target <= 1.5)" if n.startswith("efft") else "(the rank-r projection alone)"
            lines.append(f"{n} / torch AdamW amortized step: {results[n]['amortized_s']/base['amortized_s']:.2f}, "
                         f"paired {paired_ratio(results[n], base, args):.2f} {what}.")
    lines += ["", f"Run started {started}; 1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end "
              f"({os.cpu_count()} cores; other processes than this benchmark count in it)."]
    if args.note:
        lines += ["", args.note]
    section = "\n".join(lines)
    print("\n" + section)
    write_card(section, f"bench-{args.shapes}" + ("" if args.rank == 128 else f"-r{args.rank}"), Path(args.card))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
