"""Shared pieces of the optimizer tests: a tiny Llama, its param groups, a fixed batch stream."""
from __future__ import annotations

import torch

from tests.tiny import tiny_batch, tiny_model

VOCAB = 128


def model(seed: int = 0, hidden: int = 32, layers: int = 2):
    return tiny_model("llama", seed=seed, vocab_size=VOCAB, hidden=hidden, layers=layers, heads=4)


def split_params(m: torch.nn.Module):
    """2-D weights of the decoder's Linear layers (low-rank) and everything else (plain AdamW)."""
    low, rest = [], []
    for name, p in m.named_parameters():
        (low if p.dim() == 2 and ".layers." in name else rest).append(p)
    return low, rest


def groups(m: torch.nn.Module, **lowrank):
    low, rest = split_params(m)
    return [{"params": rest}, {"params": low, **lowrank}]


def batch(step: int, size: int = 2, seq: int = 12):
    return tiny_batch(vocab_size=VOCAB, batch=size, seq=seq, seed=1000 + step)


def train(m: torch.nn.Module, opt, steps: int, start: int = 0, size: int = 2):
    losses = []
    for s in range(start, start + steps):
        loss = m(**batch(s, size)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
