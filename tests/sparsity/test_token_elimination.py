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


# ------------------------------------------------------------------------------------ attention score
def _eager_reference(model, layer, batch, monkeypatch):
    """Run ``model`` (eager) once and return the layer's input and call kwargs, and LeMo's
    informativeness computed from the query/key states transformers' own eager attention received:
    I_j = sum_{i != j, unmasked} mean_h relu(scaling * q_i . k_j) (softcapped where the model does),
    per query row (B, S_query, S_key). The captured logits are checked to give eager's probabilities."""
    import sys

    from transformers.models.llama.modeling_llama import repeat_kv

    attn = layer.self_attn
    mod = sys.modules[type(attn).__module__]
    seen = {}
    orig = mod.eager_attention_forward

    def capture(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        out, weights = orig(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
        if module is attn:
            seen.update(q=query, k=key, mask=attention_mask, scaling=scaling, softcap=kw.get("softcap"), weights=weights)
        return out, weights

    def pre(mod_, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = dict(kwargs)

    monkeypatch.setattr(mod, "eager_attention_forward", capture)
    hook = layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    k = repeat_kv(seen["k"], seen["q"].shape[1] // seen["k"].shape[1])
    logits = torch.matmul(seen["q"], k.transpose(2, 3)) * seen["scaling"]
    if seen["softcap"] is not None:
        logits = torch.tanh(logits / seen["softcap"]) * seen["softcap"]
    mask = seen["mask"]
    probs = torch.softmax(logits + mask, dim=-1)
    torch.testing.assert_close(probs, seen["weights"])  # the logits are eager's own
    s = logits.shape[-1]
    allowed = (mask > torch.finfo(mask.dtype).min / 2) & ~torch.eye(s, dtype=torch.bool)
    per_query = (logits.clamp_min(0) * allowed).mean(dim=1)  # (B, S_query, S_key): mean over heads
    return seen["h"], seen["kwargs"], per_query


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "llama+lora"])
def test_attention_score_equals_eager_reference(family, monkeypatch):
    """With every row as a query, the attention score equals LeMo's Eq. 1-2 (token granularity)
    computed from the query/key states of transformers' own eager attention, on a batch with a
    left-padded row; llama+lora: peft LoRA on q_proj/k_proj (B non-zero, dropout 0.1, model in train
    mode: the score calls the LoRA modules without dropout). qwen3: per-head q/k norms; gemma2:
    softcapping (0.05, below the logits' spread) and a sliding window (3) on layer 0."""
    from efft.sparsity.token_elimination import attention_informativeness, attention_parts

    fam = family.split("+")[0]
    extra = dict(sliding_window=3, attn_logit_softcapping=0.05) if fam == "gemma2" else {}
    model = tiny_model(fam, layers=2, heads=4, **extra)
    if family.endswith("lora"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    lm = model.base_model.model if family.endswith("lora") else model
    batch = tiny_batch(batch=2, seq=20, seed=3)
    batch["attention_mask"][1, :3] = 0  # row 1 left-padded
    for layer_i in (0, 1):
        layer = lm.model.layers[layer_i]
        model.eval()
        h, kw, per_query = _eager_reference(model, layer, batch, monkeypatch)
        ref = per_query.sum(dim=1)
        parts = attention_parts(layer)
        assert not isinstance(parts, str), parts
        model.train()
        queries = torch.arange(20).expand(2, 20)
        with torch.no_grad():
            got = attention_informativeness(parts, h, queries, kw.get("attention_mask"), kw.get("position_embeddings"))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert float(ref.std()) > 0.01 * float(ref.mean())  # not a constant: the test can tell tokens apart
        # a sample of query rows: exactly the reference's sum over those rows
        sample = torch.tensor([[2, 5, 11, 19], [0, 7, 8, 15]])
        with torch.no_grad():
            got = attention_informativeness(parts, h, sample, kw.get("attention_mask"), kw.get("position_embeddings"))
        torch.testing.assert_close(got, per_query.gather(1, sample[..., None].expand(2, 4, 20)).sum(1), rtol=1e-5, atol=1e-6)
    if family.endswith("lora"):  # the adapters count: the base model's keys and queries score differently
        with model.disable_adapter(), torch.no_grad():
            base = attention_informativeness(parts, h, queries, kw.get("attention_mask"), kw.get("position_embeddings"))
        assert not torch.allclose(base, ref, rtol=1e-3)


def test_attention_score_sdpa_without_mask_is_causal(monkeypatch):
    """sdpa without padding passes no mask (is_causal): the score uses the causal pairs itself."""
    from efft.sparsity.token_elimination import attention_informativeness, attention_parts

    model = tiny_model("llama", layers=2)
    batch = tiny_batch(batch=2, seq=16, seed=4)
    layer = model.model.layers[1]
    model.eval()
    _, _, per_query = _eager_reference(model, layer, batch, monkeypatch)
    model.config._attn_implementation = "sdpa"
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"], kw=dict(k)),
                                           with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "attention_mask"})
    hook.remove()
    assert seen["kw"].get("attention_mask") is None
    with torch.no_grad():
        got = attention_informativeness(attention_parts(layer), seen["h"], torch.arange(16).expand(2, 16), None,
                                        seen["kw"]["position_embeddings"])
    torch.testing.assert_close(got, per_query.sum(1), rtol=1e-5, atol=1e-6)


def test_attention_score_queries_and_wiring():
    """score_queries: every loss row (random ones when more than n), topped up with other rows; the
    wrapped layer keeps the top-k of the attention score over those queries."""
    from efft.sparsity.token_elimination import attention_informativeness, attention_parts, score_queries

    rows = torch.zeros(2, 30, dtype=torch.bool)
    rows[0, 20:] = True  # 10 loss rows
    rows[1, 5:25] = True  # 20 loss rows
    torch.manual_seed(0)
    q = score_queries(rows, 12)
    assert q.shape == (2, 12) and bool((q.diff(dim=1) > 0).all())
    assert set(range(20, 30)) <= set(q[0].tolist())  # all 10 loss rows, plus 2 others
    assert bool(rows[1].gather(0, q[1]).all())  # 12 of the 20 loss rows, nothing else
    assert torch.equal(score_queries(rows, 30), torch.arange(30).expand(2, 30))

    model = apply_token_elimination(tiny_model("qwen2", layers=3), keep_ratio=0.5, start_layer=1, score="attention",
                                    score_queries=8)
    state = model._efft_token_elimination
    assert state.score == "attention" and set(state.attention_parts) == {1, 2}
    batch = _prompt_batch(seq=30, seed=2)  # 10 loss rows per sequence (the last third), 8 sampled
    seen = {}
    layer = model.model.layers[1]
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"], kw=dict(k)),
                                           with_kwargs=True)
    model.train()
    torch.manual_seed(5)
    model(**batch).loss.backward()
    hook.remove()
    loss_rows = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:] != -100
    torch.manual_seed(5)  # layer 1 is the first to draw: the same query rows
    with torch.no_grad():
        score = attention_informativeness(attention_parts(layer), seen["h"], score_queries(loss_rows, 8),
                                          seen["kw"].get("attention_mask"), seen["kw"]["position_embeddings"])
    forced = loss_rows.clone()
    forced[:, 0] = True
    idx, _ = choose_tokens(score, forced, 0.5, unbiased=False)
    assert torch.equal(state.last_kept[1], idx)
    mean_idx, _ = choose_tokens(__import__("efft.sparsity.token_elimination", fromlist=["x"]).informativeness(seen["h"]),
                                forced, 0.5, unbiased=False)
    assert not torch.equal(mean_idx, idx)  # a different choice than the mean-distance score on the same input


def test_attention_score_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="decoder layer 1: GPT2Block has no input_layernorm"):
        apply_token_elimination(tiny_model("gpt2", layers=2), score="attention")
    m = tiny_model("llama", layers=2)
    m.model.layers[1].self_attn.qk_scale = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"decoder layer 1: LlamaAttention has submodules \['qk_scale'\]"):
        apply_token_elimination(m, score="attention")
    apply_token_elimination(m, score="attention", keep_ratio=[0.5, 1.0], start_layer=0)  # layer 1 eliminates nothing
    m = tiny_model("llama", layers=2)
    m.config.partial_rotary_factor = 0.5
    with pytest.raises(ValueError, match="partial rotary"):
        apply_token_elimination(m, score="attention")
    with pytest.raises(ValueError, match="uniformly at random and reads no score"):
        apply_token_elimination(tiny_model("llama"), score="attention", unbiased=True)
    with pytest.raises(ValueError, match="score must be one of mean_distance, attention"):
        apply_token_elimination(tiny_model("llama"), score="attn")
    with pytest.raises(ValueError, match="score_queries must be an integer >= 1"):
        apply_token_elimination(tiny_model("llama"), score="attention", score_queries=0)
