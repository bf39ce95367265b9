"""The last decoder block on label rows only (attention queries, output projection, norms, MLP) vs
the model's own dense forward: same weights, same batch, the tolerance table of test_loss_tokens
(float32: 1e-5 relative, over the loss and every parameter gradient).

Batches have uneven label counts per row, right- and left-padded rows, and (mistral, gemma2)
sliding windows shorter than the sequence, so the gathered mask rows and the padded query layout
are exercised; gemma2 adds attention-logit softcapping.
"""
import copy

import pytest
import torch
import transformers

from efft.memory.tracker import SavedTensorCounter
from efft.sparsity.label_rows import with_label_rows
from efft.sparsity.loss_tokens import apply_loss_tokens, decoder_layers, remove_loss_tokens
from tests.sparsity.test_loss_tokens import NO_DROPOUT, _assert_grads_equal, _rel
from tests.tiny import tiny_batch, tiny_model

TOL = 1e-5
OUT_PROJ = {"gpt2": "attn.c_proj"}


def _model(family, impl):
    if family == "gemma2":
        cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=5,
                                        layer_types=["full_attention", "sliding_attention"], final_logit_softcapping=3.0,
                                        attn_logit_softcapping=20.0)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    kw = {**NO_DROPOUT, "mistral": dict(sliding_window=5)}.get(family, {})
    model = tiny_model(family, **kw)
    model.config._attn_implementation = impl
    return model


def _padded_batch(seed=2):
    batch = tiny_batch(seq=16, batch=3, label_fraction=0.4, seed=seed)
    batch["attention_mask"][0, 12:] = 0  # right padding
    batch["labels"][0, 12:] = -100
    batch["attention_mask"][1, :3] = 0  # left padding
    batch["labels"][1, :3] = -100
    return batch


CASES = [(f, i) for f in ("llama", "qwen2", "mistral", "gemma", "gpt2") for i in ("eager", "sdpa")] + [("gemma2", "eager")]


@pytest.mark.parametrize("family,impl", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_last_block_on_label_rows_equals_dense(family, impl):
    dense = _model(family, impl).train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse, chunk_size=7)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    assert block.restricts_attention and block.reason is None
    assert {"mlp", OUT_PROJ.get(family, "self_attn.o_proj")} <= set(block.modules), block.modules
    batch = _padded_batch()
    indexed = with_label_rows(batch)
    q_out = _record_q(sparse, family)
    ref, out = dense(**batch), sparse(**indexed)
    assert block.query_rows == 3 * indexed["efft_label_rows"].positions.shape[1] < 3 * 16
    if family != "gpt2":  # GPT-2's fused c_attn is not split: its queries stay on every row
        _assert_q_on_label_rows(q_out, indexed["efft_label_rows"])
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL)


def _record_q(model, family):
    """The last block's query projection outputs, recorded per call."""
    outs = []
    if family != "gpt2":
        decoder_layers(model)[-1].self_attn.q_proj.register_forward_hook(lambda m, a, y: outs.append(y.detach()))
    return outs


def _assert_q_on_label_rows(outs, rows):
    """Each call computed the label rows only: the other rows are exactly zero, the label rows not."""
    assert outs
    for y in outs:
        flat = y.reshape(-1, y.shape[-1])
        off = torch.ones(flat.shape[0], dtype=torch.bool)
        off[rows.rows] = False
        assert (flat[off] == 0).all() and (flat[rows.rows] != 0).any(dim=-1).all()


def test_sdpa_without_a_mask_keeps_its_causal_kernel():
    """No padding: transformers gives sdpa no mask (is_causal). On CPU (by default) the span's
    lower-right causal mask would be materialized, so that call stays whole; the norms and the MLP
    after it still run on label rows."""
    dense = _model("qwen2", "sdpa").train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    batch = tiny_batch(seq=16, batch=2, label_fraction=0.4, seed=6)
    ref, out = dense(**batch), sparse(**with_label_rows(batch))
    assert block.query_rows == 2 * 16
    assert {"mlp", "post_attention_layernorm"} <= block.ran
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL)


def test_gradient_checkpointing_recomputes_the_same_rows():
    """The block's forward runs twice (the recomputation in backward): each run starts before the
    attention again, so the modules before it see every row both times."""
    dense = _model("llama", "sdpa").train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    for m in (dense, sparse):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    batch = _padded_batch(seed=4)
    q_out = _record_q(sparse, "llama")
    indexed = with_label_rows(batch)
    ref, out = dense(**batch), sparse(**indexed)
    ref.loss.backward()
    out.loss.backward()
    assert len(q_out) == 2  # forward and recompute, both on label rows
    _assert_q_on_label_rows(q_out, indexed["efft_label_rows"])
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    _assert_grads_equal(dense, sparse, TOL)


def _attention_saved_bytes(model, batch) -> int:
    """Bytes saved for backward inside the last block's attention module (parameters excluded)."""
    attn = decoder_layers(model)[-1].self_attn
    counter = SavedTensorCounter(exclude_module=model)

    def enter(*_):
        counter.__enter__()

    def leave(*_):
        counter.__exit__(None, None, None)

    hooks = [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave)]
    try:
        model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return counter.total_bytes


def test_attention_work_and_saved_bytes_fall_with_the_label_fraction():
    """seq 128, one row, the first (1 - f) of it an unlabeled prompt: the attention function gets
    one query row per label row, and the bytes its module keeps for backward (eager: the
    heads x queries x seq probabilities dominate) fall with f; the dense model keeps the same at
    every f."""
    seq = 128
    dense = tiny_model("llama", hidden=32, heads=4).train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))
    measured = {}
    for f in (1.0, 0.5, 0.25):
        labels = ids.clone()
        labels[:, : int(seq * (1 - f))] = -100
        batch = {"input_ids": ids, "labels": labels}
        indexed = with_label_rows(batch)
        measured[f] = (_attention_saved_bytes(dense, batch), _attention_saved_bytes(sparse, indexed))
        assert block.query_rows == indexed["efft_label_rows"].count == int(seq * f) - (f == 1.0)
    print({f: f"{s / d:.2f} of dense" for f, (d, s) in measured.items()})
    dense_bytes = measured[1.0][0]
    assert all(d == dense_bytes for d, _ in measured.values())
    assert measured[1.0][1] <= 1.01 * dense_bytes
    assert measured[0.5][1] <= 0.65 * dense_bytes
    assert measured[0.25][1] <= 0.45 * dense_bytes


def test_refused_attention_keeps_the_modules_after_it_on_label_rows():
    """GPT-2 with reorder_and_upcast_attn computes eager attention outside the attention function:
    the queries are not restricted (reason recorded), the MLP after the attention still is."""
    dense = tiny_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, reorder_and_upcast_attn=True).train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    assert not block.restricts_attention and "reorder_and_upcast_attn" in block.reason
    assert "mlp" in block.modules and not any(n.startswith("attn.") for n in block.modules)
    batch = _padded_batch(seed=5)
    ref, out = dense(**batch), sparse(**with_label_rows(batch))
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL)


def test_remove_restores_the_attention_config_and_forwards():
    model = tiny_model("qwen2")
    layer = decoder_layers(model)[-1]
    config = layer.self_attn.config
    apply_loss_tokens(model)
    assert layer.self_attn.config is not config and layer.self_attn.config._attn_implementation == "efft_label_rows"
    assert model.config._attn_implementation == "eager"  # the model's own config is untouched
    remove_loss_tokens(model)
    assert layer.self_attn.config is config
    assert not [n for n, m in layer.named_modules() if "forward" in m.__dict__]


def _span_batch(spans, seq=16, seed=7):
    """One row per (first, end) span of shifted-label positions: labels[p + 1] set for p in [first, end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (len(spans), seq), generator=g)
    labels = torch.full_like(ids, -100)
    for i, (a, e) in enumerate(spans):
        labels[i, a + 1:e + 1] = ids[i, a + 1:e + 1]
    return {"input_ids": ids, "labels": labels}


SPAN_CASES = {
    "suffix": [(8, 15), (10, 15)],
    "middle": [(3, 9), (5, 12)],
    "prefix": [(0, 6), (2, 4)],
    "one-row": [(6, 11)],
}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("where", list(SPAN_CASES))
def test_unmasked_sdpa_computes_the_label_span_only(monkeypatch, where, kv_heads):
    """sdpa without a mask: the queries of the batch's label span [a, e) against keys [0, e) with the
    lower-right causal mask equal the dense model (loss and every gradient), for spans at the end,
    in the middle and at the start of the rows, MHA and GQA; the attention computes batch x span
    query rows, and its module keeps fewer bytes for backward than the whole call."""
    import efft.sparsity.last_block as lb

    monkeypatch.setattr(lb, "UNMASKED_SDPA_ON_CPU", True)
    dense = tiny_model("llama", hidden=32, heads=4, num_key_value_heads=kv_heads)
    dense.config._attn_implementation = "sdpa"
    dense.train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse, chunk_size=5)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    batch = _span_batch(SPAN_CASES[where])
    indexed = with_label_rows(batch)
    rows = indexed["efft_label_rows"]
    a, e = rows.span
    assert (a, e) == (min(x for x, _ in SPAN_CASES[where]), max(y for _, y in SPAN_CASES[where]))
    ref, out = dense(**batch), sparse(**indexed)
    assert block.query_rows == len(SPAN_CASES[where]) * (e - a) < len(SPAN_CASES[where]) * 16
    assert {"mlp", "self_attn.o_proj"} <= block.ran
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL)
    monkeypatch.setattr(lb, "UNMASKED_SDPA_ON_CPU", False)  # the CPU default: the call stays whole
    whole = _attention_saved_bytes(sparse, with_label_rows(batch))
    assert block.query_rows == len(SPAN_CASES[where]) * 16
    monkeypatch.setattr(lb, "UNMASKED_SDPA_ON_CPU", True)
    assert _attention_saved_bytes(sparse, with_label_rows(batch)) < whole


def test_label_span_from_host_labels():
    """Host label rows carry the span of their positions over the batch (Python ints; rows built on a
    device carry none, since finding it there would be a host read); it survives .to()."""
    from efft.sparsity.label_rows import LabelRows

    shifted = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100]])
    assert LabelRows.from_shifted(shifted).span == (1, 3)
    assert LabelRows.from_shifted(shifted).to("cpu").span == (1, 3)
    assert LabelRows.from_shifted(torch.full((1, 4), -100)).span is None


def test_unmasked_sdpa_span_under_checkpointing_and_recompute(monkeypatch):
    """The span path with gradient checkpointing (the block's forward runs again in backward) and
    sparsity.recompute stacked on the same modules: still the dense loss and gradients."""
    import efft.sparsity.last_block as lb
    from efft.sparsity import apply_sparsity

    monkeypatch.setattr(lb, "UNMASKED_SDPA_ON_CPU", True)
    dense = tiny_model("qwen2", hidden=32, heads=4)
    dense.config._attn_implementation = "sdpa"
    sparse = copy.deepcopy(dense)
    apply_sparsity(sparse, {"loss_tokens": {"enabled": True}, "recompute": {"enabled": True}})
    for m in (dense, sparse):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    batch = _span_batch(SPAN_CASES["middle"], seed=9)
    ref, out = dense(**batch), sparse(**with_label_rows(batch))
    assert sparse._efft_loss_tokens.last_block.query_rows == 2 * (12 - 3)
    ref.loss.backward()
    out.loss.backward()
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    _assert_grads_equal(dense, sparse, TOL)


def test_unmasked_sdpa_span_under_autocast(monkeypatch):
    """An fp32 model under bf16 autocast (efft's train.bf16): q and k leave the rotary embedding in
    fp32 while v is bf16; the span path casts them as sdpa's autocast does (CausalBias takes the call
    before autocast), so the result matches the dense autocast run within bf16 tolerance."""
    import efft.sparsity.last_block as lb

    monkeypatch.setattr(lb, "UNMASKED_SDPA_ON_CPU", True)
    dense = tiny_model("llama", hidden=32, heads=4)
    dense.config._attn_implementation = "sdpa"
    dense.train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    sparse.train()
    batch = dict(_span_batch(SPAN_CASES["middle"], seed=11), use_cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = dense(**batch), sparse(**with_label_rows(batch))
    assert sparse._efft_loss_tokens.last_block.query_rows == 2 * (12 - 3)
    assert _rel(out.loss.detach().float(), ref.loss.detach().float()) <= 2e-2
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, 5e-2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_query_projection_on_label_rows_keeps_no_extra_bytes(impl):
    """Full fine-tuning: the query projection on label rows keeps the input the key/value projections
    keep anyway (plus the index), so the attention module saves no more than with q_proj on every
    row; the loss and gradients are the same either way."""
    dense = _model("llama", impl).train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    assert block.query_projection == "q_proj"
    indexed = with_label_rows(_padded_batch())
    restricted = _attention_saved_bytes(sparse, indexed)
    grads = {n: p.grad.clone() for n, p in sparse.named_parameters()}
    sparse.zero_grad(set_to_none=True)
    block.query_projection = None  # q_proj on every row (the wrapper passes through)
    whole = _attention_saved_bytes(sparse, indexed)
    print({"restricted": restricted, "whole": whole})
    assert restricted <= whole
    for n, p in sparse.named_parameters():
        assert _rel(p.grad, grads[n]) <= TOL, n


def test_query_projection_lora_and_unmasked_sdpa_stay_on_every_row():
    """peft LoRA on q_proj (not a plain Linear) and the whole unmasked sdpa call keep the queries of
    every row (real values, not zeros), and stay exact."""
    peft = pytest.importorskip("peft")
    dense = _model("llama", "eager").train()
    dense = peft.get_peft_model(dense, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                       init_lora_weights=False))
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse)
    sparse.train()
    block = sparse._efft_loss_tokens.last_block
    assert block.query_projection is None
    batch = _padded_batch()
    ref, out = dense(**batch), sparse(**with_label_rows(batch))
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL)

    plain = _model("llama", "sdpa").train()
    apply_loss_tokens(plain)
    q_out = _record_q(plain, "llama")
    batch = tiny_batch(seq=16, batch=2, label_fraction=0.5, seed=3)
    plain(**with_label_rows(batch))  # no padding: sdpa gets no mask and (CPU default) runs whole
    assert (q_out[0].reshape(-1, q_out[0].shape[-1]) != 0).any(dim=-1).all()
    q_out.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dense call would keep a cast copy: no restriction
        plain(**with_label_rows(_padded_batch()))
    assert (q_out[0].reshape(-1, q_out[0].shape[-1]) != 0).any(dim=-1).all()


@pytest.mark.parametrize("first", ["partial", "sampled_linear"])
def test_query_projection_with_its_own_forward_is_left_whole(first):
    """PaCA or WTA-CRS installed before loss-token skipping (by hand, in that order): the last
    block must not replace q_proj's own forward with its label-row matmul (PaCA's trained columns
    would get no gradient); every trained parameter's gradient equals the model without loss tokens."""
    from efft.sparsity.partial import apply_partial
    from efft.sparsity.sampled_linear import apply_sampled_linear

    base = _model("llama", "sdpa").train()
    install = (lambda m: apply_partial(m, r=4)) if first == "partial" else (lambda m: apply_sampled_linear(m, keep=1.0, deterministic_fraction=1.0))  # k = R, all kept: exact
    ref, sparse = copy.deepcopy(base), copy.deepcopy(base)
    install(ref)
    install(sparse)
    apply_loss_tokens(sparse)
    block = sparse._efft_loss_tokens.last_block
    assert block.query_projection is None
    batch = tiny_batch(seq=16, batch=2, label_fraction=0.4, seed=6)
    ref(**batch).loss.backward()
    sparse(**with_label_rows(batch)).loss.backward()
    _assert_grads_equal(ref, sparse, TOL)
    assert all(p.grad is not None for p in sparse.parameters() if p.requires_grad)
