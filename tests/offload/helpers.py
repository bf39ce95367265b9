"""Shared pieces of the offload tests: a config like the recipe's, tiny training loops, equality."""
from types import SimpleNamespace

import torch

from tests.tiny import tiny_batch, tiny_model


def cfg(**kw):
    base = dict(optimizer=True, activations=True, activation_mode="all", min_offload_bytes=0, prefetch_layers=1,
                min_seq_length=0, pin_memory=True, max_pinned_bytes=1 << 30, keep_small_params_on_device_bytes=4096)
    base.update(kw)
    return SimpleNamespace(**base)


def model(layers=2, seed=0):
    m = tiny_model("llama", seed=seed, layers=layers)
    m.train()
    return m


def batches(step, accum=1, seq=16):
    return [tiny_batch(seed=1000 * step + k, seq=seq) for k in range(accum)]


def train(m, opt, steps, accum=1, clip=None, sched=None, start=0, seq=16):
    """Plain loop: ``accum`` backwards, optional clip_grad_norm_ (reference runs), step, scheduler."""
    losses = []
    for step in range(start, start + steps):
        for b in batches(step, accum, seq):
            loss = m(**b).loss / accum
            loss.backward()
            losses.append(loss.detach())
        if clip:  # over the optimizer's parameters in group order, as the offload optimizer does
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    return losses


def same_params(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
