"""Token elimination: an independent masked-dense reference, loss rows kept, saved bytes, the
unbiased option's expectation, fine-tuning quality, bad config."""
import copy

import pytest
import torch
from torch import nn

from efft.sparsity.token_elimination import apply_token_elimination, choose_tokens
from efft.memory.tracker import SavedTensorCounter
from tests.sparsity.task import pretrained_base, train_losses
from tests.sparsity.saved import layer_saved
from tests.tiny import tiny_batch, tiny_model

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def _prompt_batch(seq=24, seed=0):
    b = tiny_batch(batch=2, seq=seq, seed=seed)
    b["labels"][:, : seq * 2 // 3] = -100  # the loss covers the last third only
    return b


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_masked_dense_reference(family):
    """Eliminating tokens at layer L equals, for the kept tokens, the dense layer with the eliminated
    keys masked out, and the input itself for the eliminated ones (so loss and every gradient match)."""
    dense = tiny_model(family, layers=3, **NO_DROPOUT.get(family, {}))
    model = apply_token_elimination(copy.deepcopy(dense), keep_ratio=0.5, start_layer=1)
    state = model._efft_token_elimination
    batch = _prompt_batch()
    dense.train()
    model.train()
    out = model(**batch)
    out.loss.backward()
    kept = {i: idx.clone() for i, idx in state.last_kept.items()}
    assert set(kept) == {1, 2} and all(k.shape == (2, 12) for k in kept.values())

    layers = dense.model.layers if family != "gpt2" else dense.transformer.h
    hooks = []
    for i, idx in kept.items():
        mask = torch.zeros(2, 24, dtype=torch.bool)
        mask.scatter_(1, idx, True)

        def pre(mod, args, kwargs, mask=mask):
            am = kwargs.get("attention_mask") if "attention_mask" in kwargs else args[2]
            blocked = ~mask[:, None, None, :]
            am = am.masked_fill(blocked, torch.finfo(am.dtype).min) if am.dtype != torch.bool else am & ~blocked
            if "attention_mask" in kwargs:
                kwargs["attention_mask"] = am
            else:
                args = (*args[:2], am, *args[3:])
            mod._efft_in = args[0] if args else kwargs["hidden_states"]
            return args, kwargs

        def post(mod, args, kwargs, output, mask=mask):
            return torch.where(mask[..., None], output, mod._efft_in)

        hooks.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layers[i].register_forward_hook(post, with_kwargs=True))
    ref = dense(**batch)
    ref.loss.backward()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    named = dict(model.named_parameters())
    for name, p in dense.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(named[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_positions_and_first_token_never_eliminated():
    model = apply_token_elimination(tiny_model("qwen2", layers=2), keep_ratio=0.2, start_layer=0)
    batch = _prompt_batch(seq=30, seed=1)
    model.train()
    model(**batch).loss.backward()
    loss_rows = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:] != -100
    for idx in model._efft_token_elimination.last_kept.values():
        kept = torch.zeros_like(loss_rows).scatter_(1, idx, True)
        assert bool(kept[loss_rows].all()) and bool(kept[:, 0].all())


def test_eval_runs_dense_layers():
    dense = tiny_model("llama")
    model = apply_token_elimination(copy.deepcopy(dense), keep_ratio=0.3, start_layer=0)
    batch = _prompt_batch()
    dense.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense(**batch).logits)


def test_saved_bytes_of_decoder_layers_shrink():
    """4 layers, layers 1..3 keep 30% of a 256-token sequence whose loss covers the last 10%."""
    dense = tiny_model("llama", layers=4)
    model = apply_token_elimination(copy.deepcopy(dense), keep_ratio=0.3, start_layer=1)
    batch = tiny_batch(batch=2, seq=256)
    batch["labels"][:, :230] = -100
    sizes = []
    for m in (dense, model):
        m.train()
        with SavedTensorCounter(exclude=m.parameters()) as meter:
            loss = m(**batch).loss
        loss.backward()
        sizes.append(meter.total_bytes)
    print(f"saved bytes, whole forward: dense {sizes[0]} eliminated {sizes[1]} ratio {sizes[0] / sizes[1]:.2f}x")
    assert sizes[1] < 0.65 * sizes[0]


def test_unbiased_option_expected_update_equals_full_update():
    """A context-free layer (h + MLP(h)): with the unbiased option the mean output over draws
    converges to the dense output (each kept token's update is scaled by 1/p)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))

        def forward(self, hidden_states, attention_mask=None):
            return hidden_states + self.mlp(hidden_states)

    from efft.sparsity.token_elimination import EliminationState, _wrap_layer

    torch.manual_seed(0)
    block = Block()
    state = EliminationState([0.4], unbiased=True, min_seq_length=0)
    _wrap_layer(block, 0, state)
    h = torch.randn(2, 20, 8)
    labels = torch.full((2, 20), -100)
    labels[:, -3:] = 1
    with torch.no_grad(), state.per_forward.forward(state.activate(labels, None, 20)):  # as the wrapped model forward does
        dense = block._efft_orig_forward(h)
        outs = torch.stack([block(h) for _ in range(3000)])
    mean, se = outs.mean(0), outs.std(0) / 3000 ** 0.5
    drawn = se > 1e-6  # the sampled tokens (forced ones have no variance; checked exactly below)
    err, se = (mean - dense)[drawn], se[drawn]
    assert float((err ** 2).sum() / (se ** 2).sum()) < 3 and float((err.abs() / se).max()) < 6
    # forced tokens (loss rows, position 0) are exact in every draw
    torch.testing.assert_close(outs[0][:, 16:19], dense[:, 16:19])  # rows whose next label is set
    torch.testing.assert_close(outs[0][:, 0], dense[:, 0])


def test_choose_tokens_counts_and_weights():
    score = torch.rand(3, 10)
    forced = torch.zeros(3, 10, dtype=torch.bool)
    forced[:, 0] = True
    forced[0, 5:] = True  # row 0 needs 6 tokens: K grows to 6 for every row
    idx, w = choose_tokens(score, forced, 0.3, unbiased=True)
    assert idx.shape == (3, 6) and bool((idx.diff(dim=1) > 0).all())
    assert torch.equal(w[0], torch.ones(6))
    torch.testing.assert_close(w[1][~forced[1].gather(0, idx[1])], torch.full((5,), 9 / 5))


def test_finetune_quality_close_to_dense():
    """From a base trained on strides 1..3, fine-tune on strides 4..5 with the first half of each
    sequence as an unlabeled prompt, 40 steps. Stated margin: keep 50% from layer 1 ends within
    0.2 nats (held-out loss, evaluated dense) of dense fine-tuning, and well below the start."""
    kw = dict(seq=32, vocab=32, strides=(4, 5), prompt=16)
    dense = pretrained_base()
    _, start = train_losses(copy.deepcopy(dense), 0, 1e-3, **kw)
    _, full = train_losses(dense, 40, 3e-3, **kw)
    elim = apply_token_elimination(pretrained_base(), keep_ratio=0.5, start_layer=1)
    _, sparse = train_losses(elim, 40, 3e-3, **kw)
    print(f"held-out loss: start {start:.3f} dense {full:.3f} token elimination {sparse:.3f}")
    assert sparse <= full + 0.2
    assert sparse <= 0.2 * start


def test_bad_config_raises():
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        apply_token_elimination(tiny_model("llama"), keep_ratio=0.0)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        apply_token_elimination(tiny_model("llama"), keep_ratio=[0.5, 1.5])
    with pytest.raises(ValueError, match="decoder layers"):
        apply_token_elimination(tiny_model("llama"), keep_ratio=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="start_layer"):
        apply_token_elimination(tiny_model("llama"), start_layer=2)
    m = tiny_model("llama")
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"):
        apply_token_elimination(m)
    with pytest.raises(ValueError, match="causal-LM"):
        apply_token_elimination(nn.Linear(2, 2))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_eliminated_layer_saves_only_kept_tokens(family, unbiased):
    """An eliminated layer saves at most kept/seq of what the dense layer saves, plus the (B*K,)
    int64 index of the kept rows (and, unbiased, their float32 update weights) and, for rotary
    models, the per-row cos/sin of the kept positions beyond the dense layer's batch-shared table.
    Nothing full-length: the old gather into the short sequence saved the whole layer input."""
    dense = tiny_model(family, layers=3, **NO_DROPOUT.get(family, {}))
    dense.config._attn_implementation = "sdpa"  # eager's (seq x seq) weights would shrink quadratically and hide overheads
    model = apply_token_elimination(copy.deepcopy(dense), keep_ratio=0.5, start_layer=1, unbiased=unbiased)
    batch = _prompt_batch(seq=64)
    b, s = batch["input_ids"].shape
    sizes = []
    for m in (dense, model):
        layers = m.model.layers if family != "gpt2" else m.transformer.h
        m.train()
        with layer_saved(m, layers[1]) as seen:
            m(**batch, use_cache=False).loss.backward()  # gpt2 would otherwise keep a KV cache copy of k, v
        sizes.append(sum(seen.values()))
    k = model._efft_token_elimination.last_kept[1].shape[1]
    assert k == s // 2
    allowance = b * k * (8 + (4 if unbiased else 0))
    if family != "gpt2":  # cos and sin, (1, S, head_dim) in the dense layer, (B, K, head_dim) here
        allowance += 2 * (b - 1) * k * (dense.config.hidden_size // dense.config.num_attention_heads) * 4
    bound = k / s * sizes[0] + allowance
    print(f"{family} layer 1 saved bytes: dense {sizes[0]} eliminated {sizes[1]} bound {bound:.0f}")
    assert sizes[1] <= bound
    assert sizes[1] >= 0.9 * k / s * sizes[0]  # the counter sees the layer's activations
