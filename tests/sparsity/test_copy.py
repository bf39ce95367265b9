"""A deepcopy (DPO's reference model, an EMA or evaluation copy) or a pickle of a model with
efft.sparsity installed must compute with its own weights and modules, not the original's.

Reference: a fresh model given the copy's weights and the same sparsity, computed independently;
float32, equal losses to 1e-6 relative. Gradients must land on the copy's parameters only.
"""
import copy
import io

import pytest
import torch

from efft.sparsity import apply_sparsity
from efft.sparsity.label_rows import with_label_rows
from tests.sparsity.test_loss_tokens import NO_DROPOUT, _rel
from tests.tiny import tiny_batch, tiny_model

SECTIONS = {
    "loss_tokens": {"loss_tokens": {}},
    "loss_tokens+recompute": {"loss_tokens": {}, "recompute": {}},
    "token_elimination+loss_tokens": {"loss_tokens": {}, "token_elimination": {"keep_ratio": 0.5}},
    "sampled_linear": {"sampled_linear": {"keep": 1.0}},
    "partial": {"partial": {"r": 4}},
    "partial+loss_tokens+recompute": {"partial": {"r": 4}, "loss_tokens": {}, "recompute": {}},
}


def _model(impl):
    m = tiny_model("llama", layers=3, **NO_DROPOUT)
    m.config._attn_implementation = impl
    return m.train()


def _patched(sections, impl, scale=None):
    m = _model(impl)
    if scale is not None:
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
    return apply_sparsity(m, {k: dict(enabled=True, **v) for k, v in sections.items()}).train()


def _loss(m, batch):
    return m(**with_label_rows(batch)).loss


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(SECTIONS))
def test_deepcopy_computes_with_the_copys_weights(name, impl):
    sections = SECTIONS[name]
    batch = tiny_batch(seq=24, batch=2, label_fraction=0.4, seed=5)
    model = _patched(sections, impl)
    before = float(_loss(model, batch))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.9)
    ref = float(_loss(_patched(sections, impl, scale=0.9), batch))
    model.zero_grad(set_to_none=True)
    loss = _loss(clone, batch)
    assert _rel(torch.tensor(float(loss)), torch.tensor(ref)) <= 1e-6
    assert abs(ref - before) > 1e-4  # the reference differs from the original: a copy running the original would fail
    loss.backward()
    assert all(p.grad is None for p in model.parameters()), "gradients reached the original model"
    assert any(p.grad is not None for p in clone.parameters() if p.requires_grad)
    assert float(_loss(model, batch)) == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("name", ["loss_tokens+recompute", "token_elimination+loss_tokens", "sampled_linear", "partial"])
def test_pickled_model_computes_the_same_loss(name):
    sections = SECTIONS[name]
    batch = tiny_batch(seq=24, batch=2, label_fraction=0.4, seed=5)
    model = _patched(sections, "sdpa")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).train()
    assert float(_loss(loaded, batch)) == pytest.approx(float(_loss(model, batch)), rel=1e-6)
