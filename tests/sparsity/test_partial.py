"""PaCA: gradients vs a dense torch reference, saved bytes, save/load/merge, fine-tuning quality."""
import copy
import os

import pytest
import torch
from torch import nn

from efft.sparsity.partial import (PartialLinearFn, apply_partial, column_indices, load_partial, merge_partial,
                                   partial_modules, save_partial)
from efft.memory.tracker import SavedTensorCounter
from tests.sparsity.task import pretrained_base, train_losses
from tests.tiny import tiny_batch, tiny_model


def test_linear_gradients_equal_dense_columns():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    x = torch.randn(3, 5, 24, requires_grad=True)
    idx = column_indices(24, 0.25, seed=0, name="x")
    assert idx.numel() == 6 and torch.equal(idx, idx.sort().values)
    # dense reference: plain torch, full weight trainable
    w = lin.weight.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x, w, lin.bias.detach())
    (y_ref.square().sum()).backward()
    gx_ref, gw_ref = x.grad.clone(), w.grad.clone()
    x.grad = None
    cols = nn.Parameter(lin.weight.detach()[:, idx].clone())
    y = PartialLinearFn.apply(x, lin.weight.detach(), cols, idx, lin.bias.detach())
    (y.square().sum()).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, gx_ref)
    torch.testing.assert_close(cols.grad, gw_ref[:, idx])


def test_model_gradients_and_trainable_set():
    dense = tiny_model("llama")
    model = apply_partial(copy.deepcopy(dense), fraction=0.25, seed=3)
    mods = partial_modules(model)
    assert len(mods) == 2 * 7  # q,k,v,o,gate,up,down per layer; lm_head excluded
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.paca_weight" for n in mods}
    batch = tiny_batch(seq=12)
    dense(**batch).loss.backward()
    model(**batch).loss.backward()
    dense_mods = dict(dense.named_modules())
    for name, m in mods.items():
        assert m.paca_weight.shape == (m.out_features, round(0.25 * m.in_features))
        torch.testing.assert_close(m.paca_weight.grad, dense_mods[name].weight.grad[:, m.paca_index], rtol=1e-5, atol=1e-6)


def test_saved_input_bytes_shrink_to_the_fraction():
    torch.manual_seed(0)
    lin = apply_partial(nn.Sequential(nn.Linear(256, 256)), fraction=0.1)[0]
    ref = nn.Linear(256, 256)
    x = torch.randn(4, 512, 256, requires_grad=True)
    with SavedTensorCounter(exclude=ref.parameters()) as d:
        ref(x)
    with SavedTensorCounter(exclude=[lin.weight, lin.paca_weight]) as s:
        lin(x)
    # dense keeps the whole input; PaCA keeps 26 of 256 columns (+ the index)
    assert s.total_bytes <= 0.12 * d.total_bytes, (s.total_bytes, d.total_bytes)


def test_save_load_merge_round_trip(tmp_path):
    model = apply_partial(tiny_model("qwen2"), fraction=0.1, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**tiny_batch(seq=12, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    batch = tiny_batch(seq=12, seed=99)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    path = save_partial(model, tmp_path / "adapter")
    assert os.path.getsize(path) < 0.2 * sum(m.weight.numel() * 4 for m in partial_modules(model).values())

    fresh = load_partial(tiny_model("qwen2"), tmp_path / "adapter")  # same base, PaCA installed from the file
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, want)
    merged = merge_partial(fresh)
    assert not partial_modules(merged) and not any("paca" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want)

    applied = apply_partial(tiny_model("qwen2"), fraction=0.1, seed=1)  # same columns: loads in place
    load_partial(applied, path)
    other = apply_partial(tiny_model("qwen2"), fraction=0.1, seed=2)
    with pytest.raises(ValueError, match="other columns"):
        load_partial(other, path)
    with pytest.raises(ValueError, match="not an nn.Linear|do not fit"):
        load_partial(tiny_model("llama", hidden=32), path)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="fraction"):
        apply_partial(tiny_model("llama"), fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        apply_partial(tiny_model("llama"), fraction=1.5)
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_partial(tiny_model("llama"), target_modules=["not_a_module"])


def test_finetune_quality_close_to_full_finetuning():
    """From a base trained on strides 1..3, fine-tune on strides 4..5 for 40 steps.

    Stated margin: PaCA (25% of columns, 22% of the linear weights' size) ends within 0.15 nats
    (held-out loss) of full fine-tuning, and well below the starting loss.
    """
    dense = pretrained_base()
    _, start = train_losses(copy.deepcopy(dense), 0, 1e-3, seq=16, vocab=32, strides=(4, 5))
    _, full = train_losses(dense, 40, 3e-3, seq=16, vocab=32, strides=(4, 5))
    paca = apply_partial(pretrained_base(), fraction=0.25)
    _, part = train_losses(paca, 40, 2e-2, seq=16, vocab=32, strides=(4, 5))
    print(f"held-out loss: start {start:.3f} full FT {full:.3f} PaCA {part:.3f}")
    assert part <= full + 0.15
    assert part <= 0.2 * start


def test_r_trains_that_many_columns_per_weight():
    """``r`` (PaCA's rank, peft's name) fixes the trained columns per weight, capped at in_features;
    fraction and r together, or a bad r, are refused (also by the recipe check, every problem listed)."""
    from efft.sparsity import sparsity_problems

    model = apply_partial(tiny_model("llama"), r=5, seed=1)
    mods = partial_modules(model)
    assert mods and all(m.paca_weight.shape == (m.out_features, min(5, m.in_features)) for m in mods.values())
    assert model._efft_partial["r"] == 5
    tiny = apply_partial(nn.Sequential(nn.Linear(3, 4)), r=8)
    assert tiny[0].paca_weight.shape == (4, 3)
    with pytest.raises(ValueError, match="not both"):
        apply_partial(tiny_model("llama"), fraction=0.1, r=4)
    with pytest.raises(ValueError, match="r must be an integer"):
        apply_partial(tiny_model("llama"), r=0)
    probs = dict(sparsity_problems({"partial": {"enabled": True, "fraction": 2.0, "r": 0}}))
    assert set(probs) == {"sparsity.partial.fraction", "sparsity.partial.r", "sparsity.partial"}


def test_recipe_r_must_be_an_integer():
    """YAML's `r: true` is not 1 column: the schema refuses booleans for r."""
    import pydantic

    from efft.config import SparsityConfig

    assert SparsityConfig(partial={"enabled": True, "r": 8}).partial.r == 8
    with pytest.raises(pydantic.ValidationError, match="partial.r"):
        SparsityConfig(partial={"enabled": True, "r": True})


@pytest.mark.parametrize("paca_first", [True, False], ids=["paca-under-last-block", "paca-over-last-block"])
def test_merge_puts_back_the_forward_it_wrapped(paca_first):
    """PaCA under loss_tokens' last-block wrapper of o_proj (apply_sparsity's order) or over it
    (applied by hand after loss_tokens): merging removes PaCA's forward only; the last block's
    output projection runs on the label rows again."""
    from efft.sparsity import apply_loss_tokens
    from efft.sparsity.instance_forward import InstanceForward
    from efft.sparsity.partial import _PartialForward

    model = tiny_model("llama")
    if paca_first:
        apply_partial(model, fraction=0.25)
        apply_loss_tokens(model)
    else:
        apply_loss_tokens(model)
        apply_partial(model, fraction=0.25)
    attn = model.model.layers[-1].self_attn
    merge_partial(model)
    for n in ("q_proj", "o_proj"):  # no PaCA forward left anywhere in the chain
        cur = getattr(attn, n).__dict__.get("forward")
        while isinstance(cur, InstanceForward):
            assert not isinstance(cur, _PartialForward), n
            cur = cur.own
    assert attn.o_proj.__dict__.get("forward") is not None  # the last block's wrapper stays
    block = model._efft_loss_tokens.last_block
    block.ran.clear()
    model.train()
    model(**tiny_batch(seq=12, label_fraction=0.5))  # merged weights are frozen: forward only
    assert "self_attn.o_proj" in block.ran
