"""Two training forwards before one backward under gradient checkpointing (a DPO-style loss over
separately run halves): each checkpointed layer's recompute must see the label rows of the forward
that made it, not the later one's.

References: the dense model (loss_tokens' last block is exact) and, for the approximate token
elimination, the same eliminated model without checkpointing; float32, 1e-5 relative.
"""
import copy

import pytest
import torch

from efft.sparsity import apply_token_elimination
from efft.sparsity.label_rows import with_label_rows
from efft.sparsity.loss_tokens import apply_loss_tokens
from efft.sparsity.per_forward import PerForward
from tests.sparsity.test_loss_tokens import NO_DROPOUT, _assert_grads_equal, _rel
from tests.tiny import tiny_batch, tiny_model

TOL = 1e-5


def _two_batches(seq=16):
    """Same ids and shape, the same number of label rows at different positions: the second
    batch's rows fit the first batch's recompute shape-wise, so only wrong values could show it."""
    a = tiny_batch(seq=seq, batch=2, seed=3)
    b = {k: v.clone() for k, v in a.items()}
    a["labels"][:, : seq // 2] = -100  # label rows (shifted): seq/2 - 1 .. seq - 2
    b["labels"][:, 0] = -100
    b["labels"][:, seq // 2 + 1:] = -100  # label rows: 0 .. seq/2 - 1
    b["input_ids"] = b["input_ids"].roll(1, dims=1)
    return a, b


def _step(model, a, b):
    """Both forwards, then one backward of their sum: loss and gradients."""
    loss = model(**a).loss + model(**b).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _checkpointed(model, reentrant):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    return model.train()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_loss_tokens_last_block_recompute_uses_its_own_forwards_rows(reentrant):
    dense = tiny_model("llama", **NO_DROPOUT).train()
    dense.config._attn_implementation = "sdpa"
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    block = sparse._efft_loss_tokens.last_block
    assert block.modules  # the last block runs on label rows
    a, b = _two_batches()
    ra, rb = with_label_rows(a)["efft_label_rows"], with_label_rows(b)["efft_label_rows"]
    assert ra.count == rb.count and not torch.equal(ra.rows, rb.rows)
    ref_loss, ref = _step(_checkpointed(dense, reentrant), a, b)
    loss, got = _step(_checkpointed(sparse, reentrant), with_label_rows(a), with_label_rows(b))
    assert _rel(loss, ref_loss) <= TOL
    assert ref.keys() == got.keys()
    for n in ref:
        assert _rel(got[n], ref[n]) <= TOL, n
    assert "mlp" in block.ran


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_token_elimination_recompute_uses_its_own_forwards_rows(reentrant):
    base = tiny_model("llama", layers=3, **NO_DROPOUT).train()
    base.config._attn_implementation = "sdpa"
    plain = copy.deepcopy(base)
    ckpt = copy.deepcopy(base)
    for m in (plain, ckpt):
        apply_token_elimination(m, keep_ratio=0.5, start_layer=1)
    a, b = _two_batches(seq=24)
    ref_loss, ref = _step(plain.train(), a, b)
    loss, got = _step(_checkpointed(ckpt, reentrant), a, b)
    assert _rel(loss, ref_loss) <= TOL
    for n in ref:
        assert _rel(got[n], ref[n]) <= TOL, n


def test_per_forward_records_die_with_the_input():
    pf = PerForward()
    x = torch.randn(2, 3)
    with pf.forward("a"):
        assert pf.resolve(x) == "a"
    assert pf.resolve(x) == "a"  # outside: the value of the forward that saw x
    assert pf.resolve(x.detach()) == "a"  # a detached alias (reentrant checkpointing's recompute input)
    assert pf.resolve(torch.randn(2, 3)) is None  # a tensor no wrapped forward saw
    with pf.forward("b"):
        y = torch.randn(2, 3)
        assert pf.resolve(y) == "b"
        with pf.forward(None):  # a forward without a value records nothing
            assert pf.resolve(torch.randn(1)) is None
    assert (pf.resolve(x), pf.resolve(y)) == ("a", "b")
    del x, y
    assert len(pf) == 0


def test_interleaved_forwards_without_checkpointing_still_match_dense():
    """Without checkpointing nothing is recomputed; the per-forward rows must not change that."""
    dense = tiny_model("llama", **NO_DROPOUT).train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    a, b = _two_batches()
    ref_loss, _ = _step(dense, a, b)
    loss, _ = _step(sparse.train(), with_label_rows(a), with_label_rows(b))
    assert _rel(loss, ref_loss) <= TOL
    _assert_grads_equal(dense, sparse, TOL)


def test_swapped_last_layer_class_still_reads_as_a_decoder_layer():
    """The last layer's class becomes a same-name subclass: code that looks for a list of same-type
    blocks (activation offload) must still find the decoder layers, and removal restores the class."""
    from efft.offload.activations import find_decoder_layers
    from efft.sparsity.loss_tokens import decoder_layers, remove_loss_tokens

    model = tiny_model("llama", layers=3)
    cls = type(decoder_layers(model)[-1])
    apply_loss_tokens(model)
    layers = decoder_layers(model)
    assert type(layers[-1]) is not cls and isinstance(layers[-1], cls) and type(layers[-1]).__name__ == cls.__name__
    assert find_decoder_layers(model)[1] is layers
    remove_loss_tokens(model)
    assert type(layers[-1]) is cls and "_efft_last_block" not in layers[-1].__dict__
