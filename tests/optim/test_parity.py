"""efft's optimizers against the authors' packages (galore-torch, apollo-torch): same model, same
batches, same groups, 20 steps with projector refreshes, fp32; parameters must agree tightly."""
import pytest
import torch

from efft.optim import APOLLOAdamW, GaLoreAdamW, base
from efft.optim import apollo as apollo_module

from .helpers import groups, max_diff, model, train

galore_torch = pytest.importorskip("galore_torch")
apollo_torch = pytest.importorskip("apollo_torch")

KW = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_matches_galore_torch(proj_type):
    # rank 8: with a rank whose singular value nearly ties the next one, GaLore itself (either
    # implementation) turns 1e-9 rounding differences into a different basis at a refresh.
    lowrank = dict(rank=8, update_proj_gap=7, scale=0.25, proj_type=proj_type)
    ref, ours = model(), model()
    ref_opt = galore_torch.GaLoreAdamW(groups(ref, **lowrank), **KW)
    our_opt = GaLoreAdamW(groups(ours, **lowrank), **KW)
    train(ref, ref_opt, 20)
    train(ours, our_opt, 20)
    assert max_diff(ref, ours) < 1e-5
    assert max_diff(ref, model()) > 1e-2  # the runs moved the weights


@pytest.mark.parametrize("variant", ["apollo", "apollo_svd", "apollo_mini"])
def test_apollo_matches_apollo_torch(variant):
    if variant == "apollo":
        lowrank = dict(rank=4, update_proj_gap=7, scale=1.0, proj_type="std", proj="random", scale_type="channel")
    elif variant == "apollo_svd":
        lowrank = dict(rank=8, update_proj_gap=7, scale=1.0, proj_type="std", proj="svd", scale_type="channel")
    else:
        lowrank = dict(rank=1, update_proj_gap=7, scale=128.0, proj_type="std", proj="random", scale_type="tensor")
    ref, ours = model(), model()
    ref_opt = apollo_torch.APOLLOAdamW(groups(ref, **lowrank), **KW)
    our_opt = APOLLOAdamW(groups(ours, **lowrank), **KW)
    train(ref, ref_opt, 20)
    train(ours, our_opt, 20)
    assert max_diff(ref, ours) < 1e-5
    assert max_diff(ref, model()) > 1e-2


def test_plain_adamw_part_matches_the_authors_adamw_bitwise():
    # Parameters outside the rank groups get efft's AdamW, which on CPU runs in cache-sized slices
    # (base.CPU_CHUNK); galore-torch's AdamW (the authors' transformers-style one) runs whole tensors.
    shapes = [(701, 513), (33,), (5, 7)]
    assert shapes[0][0] * shapes[0][1] > 1.3 * base.CPU_CHUNK  # a full slice, a partial one, a ragged tail
    gen = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    start = ref[0].detach().clone()
    ref_opt = galore_torch.GaLoreAdamW([{"params": ref}], **KW)
    our_opt = GaLoreAdamW([{"params": ours}], **KW)
    for _ in range(5):
        for a, b in zip(ref, ours):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ref_opt.step()
        our_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
    assert (ours[0] - start).abs().min() > 0  # every element moved


@pytest.mark.parametrize("shape", [(600, 512), (512, 600)], ids=["per-row-scale", "per-column-scale"])
def test_apollo_sliced_update_with_decay_matches_apollo_torch(shape, monkeypatch):
    # Weights over base.CPU_CHUNK elements take the update + decay in row slices on CPU.
    assert shape[0] * shape[1] > base.CPU_CHUNK
    lowrank = dict(rank=4, update_proj_gap=3, scale=1.0, proj_type="std", proj="random", scale_type="channel")
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(shape, generator=gen) * 0.02
    grads = [torch.randn(shape, generator=gen) * 1e-3 for _ in range(6)]

    def run(opt_cls):
        w, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(torch.zeros(shape[0]))
        opt = opt_cls([{"params": [b]}, {"params": [w], **lowrank}], **KW)
        for g in grads:
            w.grad, b.grad = g.clone(), g[:, 0].clone()
            opt.step()
        return w.detach()

    ours, ref = run(APOLLOAdamW), run(apollo_torch.APOLLOAdamW)
    assert (ours - ref).abs().max() < 1e-6
    assert (ours - init).abs().max() > 1e-3
    monkeypatch.setattr(apollo_module, "CPU_CHUNK", 1 << 40)  # one slice: the unsliced ops
    assert torch.equal(run(APOLLOAdamW), ours)
