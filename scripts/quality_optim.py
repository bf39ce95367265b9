"""Training quality of each optimizer: a tiny Llama trained from scratch on generated text.

The text comes from a fixed random Markov chain over the vocabulary (each token has a few likely
successors), so there is something to learn and a known floor: the chain's entropy rate, the loss
of a model that has learned it perfectly. Every optimizer gets the same model init, the same
batches, the same number of steps, built through efft.optim.build_optimizer (the recipe path).
Writes the final-loss table (train and held-out, and the ratio to AdamW's) into cards/optim.md.

    python scripts/quality_optim.py --steps 300
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efft.optim import build_optimizer  # noqa: E402
from scripts.bench_optim import environment, write_card  # noqa: E402

# name -> (optim section, learning rate): the papers' settings where they give one.
RUNS = {
    "AdamW": (dict(name="adamw"), 3e-3),
    "AdamW (lr 1e-2)": (dict(name="adamw"), 1e-2),
    "AdamW 8-bit (bnb)": (dict(name="adamw8bit"), 3e-3),
    "GaLore (svd)": (dict(name="galore", projector="svd"), 1e-2),
    "GaLore (rsvd, 8-bit state)": (dict(name="galore", projector="rsvd", state_bits=8), 1e-2),
    "APOLLO": (dict(name="apollo", projector="random"), 1e-2),
    "APOLLO-Mini": (dict(name="apollo_mini", projector="random"), 1e-2),
    "FRUGAL (block, 0.25)": (dict(name="frugal", projector="block"), 3e-3),
}


def optim_cfg(rank: int, gap: int, **kw) -> SimpleNamespace:
    base = dict(name="adamw", rank=rank, update_proj_gap=gap, scale=None, proj_type="std", projector="svd", scale_type=None,
                target_modules="all-linear", exclude_modules=[], layerwise=False, state_bits=32, stagger_refresh=True,
                density=0.25, state_free_lr_scale=0.1, norm_growth_limit=1.01)
    base.update(kw)
    return SimpleNamespace(**base)


class MarkovText:
    """Token streams from a random sparse transition table (``branching`` successors a token)."""

    def __init__(self, vocab: int, branching: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.next_tokens = torch.stack([torch.randperm(vocab, generator=g)[:branching] for _ in range(vocab)])
        self.probs = torch.softmax(torch.randn(vocab, branching, generator=g) * 1.5, dim=1)

    def entropy_rate(self) -> float:
        """Per-token entropy of the chain, weighted by its stationary distribution (nats)."""
        T = torch.zeros(self.vocab, self.vocab)
        T.scatter_(1, self.next_tokens, self.probs)
        pi = torch.full((self.vocab,), 1.0 / self.vocab)
        for _ in range(500):
            pi = pi @ T
        h = -(self.probs * self.probs.log()).sum(1)
        return float((pi * h).sum())

    def batch(self, size: int, seq: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(size, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (size,), generator=g)
        for t in range(1, seq):
            choice = torch.multinomial(self.probs[ids[:, t - 1]], 1, generator=g).squeeze(1)
            ids[:, t] = self.next_tokens[ids[:, t - 1], choice]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def run(name, section, lr, data, args):
    model = tiny_llama(args.vocab, args.hidden, args.layers)
    opt = build_optimizer(model, optim_cfg(args.rank, args.gap, **section), lr=lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    losses, t0 = [], time.perf_counter()
    for s in range(args.steps):
        loss = model(**data.batch(args.batch, args.seq, seed=s)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        held = [model(**data.batch(args.batch, args.seq, seed=10_000 + i)).loss.item() for i in range(4)]
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    tail = losses[-20:]
    return dict(start=losses[0], train=sum(tail) / len(tail), eval=sum(held) / len(held), seconds=elapsed, state_bytes=state, lr=lr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gap", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--card", default=str(ROOT / "cards" / "optim.md"))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = MarkovText(args.vocab)
    floor = data.entropy_rate()
    results = {}
    for name, (section, lr) in RUNS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        results[name] = r = run(name, section, lr, data, args)
        print(f"{name:28s} lr {lr:g}  start {r['start']:.3f}  train {r['train']:.3f}  held-out {r['eval']:.3f}  "
              f"{r['seconds']:.0f}s  state {r['state_bytes']/2**10:.0f} KiB", flush=True)
    base = results.get("AdamW")
    lines = [
        f"## Training quality: tiny Llama from scratch ({args.steps} steps)",
        "",
        f"Device: {environment(torch.device('cpu'))}. Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq} tokens of a random Markov chain (4 successors a token); warmup 10% then cosine to "
        f"0.1x; grad clip 1.0; rank {args.rank} (APOLLO-Mini 1), update_proj_gap {args.gap}, stagger on. Same init and batches "
        f"for all. Entropy floor of the data: {floor:.3f} nats (a perfect model); uniform guess: {math.log(args.vocab):.3f}. "
        f"`python scripts/quality_optim.py --steps {args.steps}`.",
        "",
        "| optimizer | lr | first loss | final train loss (last 20) | held-out loss | held-out - AdamW | optimizer state (KiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        delta = f"{r['eval'] - base['eval']:+.3f}" if base else "n/a"
        lines.append(f"| {name} | {r['lr']:g} | {r['start']:.3f} | {r['train']:.3f} | {r['eval']:.3f} | {delta} | {r['state_bytes']/2**10:.0f} |")
    if args.note:
        lines += ["", args.note]
    section = "\n".join(lines)
    print("\n" + section)
    write_card(section, "quality", Path(args.card))


if __name__ == "__main__":
    main()
