"""A small learnable task for quality checks: arithmetic sequences modulo the vocabulary.

Each row starts at a random token and steps by a random stride in 1..3; after a few tokens the next
token is fully determined, so a tiny model's loss falls quickly when it trains properly.
"""
from __future__ import annotations

import torch


def arithmetic_batch(batch: int, seq: int, vocab: int, seed: int, prompt: int = 0, strides=(1, 3)) -> dict:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    stride = torch.randint(strides[0], strides[1] + 1, (batch, 1), generator=g)
    ids = (start + stride * torch.arange(seq)[None, :]) % vocab
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_losses(model, steps: int, lr: float, batch: int = 8, seq: int = 32, vocab: int = 64, prompt: int = 0,
                 eval_seed: int = 10_000, strides=(1, 3), seed: int = 0) -> tuple[list[float], float]:
    """AdamW on fresh batches (seeds seed, seed+1, ...); returns the training losses and the loss on a held-out batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        out = model(**arithmetic_batch(batch, seq, vocab, seed=seed + step, prompt=prompt, strides=strides))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.eval()
    with torch.no_grad():
        held = float(model(**arithmetic_batch(32, seq, vocab, seed=eval_seed, prompt=prompt, strides=strides)).loss)
    return losses, held


_BASE: dict = {}


def pretrained_base(steps: int = 120):
    """A tiny llama trained on strides 1..3 (cached per process): fine-tuning checks start from it,
    so adapters and sparse variants adapt real features instead of random ones. Returns a copy."""
    import copy

    from tests.tiny import tiny_model

    if steps not in _BASE:
        torch.manual_seed(0)
        m = tiny_model("llama", vocab_size=32, hidden=32, layers=2)
        train_losses(m, steps, 3e-3, seq=16, vocab=32, strides=(1, 3), seed=50_000)
        _BASE[steps] = m
    return copy.deepcopy(_BASE[steps])
