"""Loss-token skipping vs the model's own dense forward (same weights, same batch).

Tolerance table (max |a - b| over the loss and every parameter gradient, relative to max |b|):
  float32: 1e-5      (only float summation order differs)
  bfloat16: 2e-2     (bf16 weights, or fp32 weights under bf16 autocast: bf16 matmuls, the chunked head
                     rounds the same products in another order)
"""
import copy

import pytest
import torch
import transformers
from torch import nn

from efft.integrations.transformers import LabelRowsCallback
from efft.sparsity.label_rows import with_label_rows
from efft.sparsity.loss_tokens import apply_loss_tokens, head_cross_entropy, remove_loss_tokens
from efft.memory.tracker import SavedTensorCounter
from tests.tiny import tiny_batch, tiny_model

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def _pair(family, dtype=torch.float32, **kw):
    dense = tiny_model(family, dtype=dtype, **NO_DROPOUT.get(family, {}), **kw)
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse, chunk_size=7)
    dense.train()
    sparse.train()
    return dense, sparse


def _rel(a, b):
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-12)


def _assert_grads_equal(dense, sparse, tol):
    named = dict(sparse.named_parameters())
    checked = 0
    for name, p in dense.named_parameters():
        q = named[name]
        if p.grad is None:
            assert q.grad is None or float(q.grad.abs().max()) == 0.0, name
            continue
        assert q.grad is not None, f"{name}: no gradient on the sparse path"
        assert _rel(q.grad, p.grad) <= tol, f"{name}: rel diff {_rel(q.grad, p.grad):.2e}"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("indexed", [False, True], ids=["rows-read-on-device", "rows-from-collator"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
def test_loss_and_all_gradients_equal_dense(family, indexed):
    dense, sparse = _pair(family)
    state = sparse._efft_loss_tokens
    assert state.last_block_skip, "the last block's MLP should run on label rows only"
    batch = tiny_batch(seq=24, batch=2, label_fraction=0.5, seed=1)
    ref = dense(**batch)
    out = sparse(**(with_label_rows(batch) if indexed else batch))
    assert state.host_reads == (0 if indexed else 1)
    assert out.logits is None  # no logits at all in training
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL[torch.float32]
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL[torch.float32])


def test_bfloat16_llama_within_table():
    dense, sparse = _pair("llama", dtype=torch.bfloat16)
    batch = tiny_batch(seq=16, label_fraction=0.5, seed=2)
    ref, out = dense(**batch), sparse(**batch)
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL[torch.bfloat16]
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, TOL[torch.bfloat16])


def test_softcapping_family_gemma2():
    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").train()
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse, chunk_size=5)
    assert sparse._efft_loss_tokens.softcap == 3.0
    batch = tiny_batch(seq=16, label_fraction=0.6, seed=3)
    ref, out = dense(**batch), sparse(**batch)
    assert _rel(out.loss.detach(), ref.loss.detach()) <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, 1e-5)


def test_num_items_in_batch_normalises_over_the_optimizer_step():
    """Two micro-batches, each divided by the step's label count, sum to the full-batch mean."""
    dense, sparse = _pair("llama")
    full = tiny_batch(batch=4, seq=16, label_fraction=0.4, seed=4)
    ref = dense(**full)
    ref.loss.backward()
    shifted = full["labels"][:, 1:]
    n_items = (shifted != -100).sum()  # a tensor, as Trainer passes it
    total = 0.0
    for half in (slice(0, 2), slice(2, 4)):
        mb = with_label_rows({k: v[half] for k, v in full.items()})
        out = sparse(**mb, num_items_in_batch=n_items)
        out.loss.backward()
        total = total + out.loss.detach()
    assert _rel(total, ref.loss.detach()) <= 1e-5
    _assert_grads_equal(dense, sparse, 1e-5)


def test_eval_and_generation_unchanged():
    dense, sparse = _pair("qwen2")
    batch = tiny_batch(seq=12, label_fraction=0.5)
    dense.eval()
    sparse.eval()
    with torch.no_grad():
        a, b = dense(**batch), sparse(**batch)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        ids = batch["input_ids"][:1, :4]
        g1 = dense.generate(ids, max_new_tokens=4, do_sample=False)
        g2 = sparse.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(g1, g2)
    sparse.train()
    assert sparse(input_ids=batch["input_ids"]).logits is not None  # no labels: dense path, logits returned


def test_peft_lora_model_gradients_equal():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    dense = peft.get_peft_model(base, cfg)
    sparse = copy.deepcopy(dense)
    assert apply_loss_tokens(sparse) is sparse
    dense.train()
    sparse.train()
    batch = tiny_batch(seq=16, label_fraction=0.5, seed=5)
    ref, out = dense(**batch), sparse(**with_label_rows(batch))  # peft passes the label rows on
    assert sparse.get_base_model()._efft_loss_tokens.host_reads == 0
    assert out.logits is None
    assert _rel(out.loss.detach(), ref.loss.detach()) <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, 1e-5)


def test_trainer_accumulation_matches_dense(tmp_path):
    """transformers.Trainer with gradient accumulation: same losses as the dense model, two steps; with
    LabelRowsCallback the batches carry their label rows (no forward reads them from the device)."""
    from datasets import Dataset

    rows = [tiny_batch(batch=1, seq=16, label_fraction=0.3 + 0.1 * i, seed=10 + i) for i in range(4)]
    ds = Dataset.from_list([{k: v[0].tolist() for k, v in r.items()} for r in rows])
    losses = []
    for sparse in (False, True):
        model = tiny_model("llama")
        if sparse:
            apply_loss_tokens(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(sparse)), per_device_train_batch_size=1, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=0, data_seed=0, lr_scheduler_type="constant",
        )
        tr = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[LabelRowsCallback()] if sparse else None)
        assert tr.model_accepts_loss_kwargs
        tr.train()
        if sparse:
            assert model._efft_loss_tokens.host_reads == 0
        losses.append([h["loss"] for h in tr.state.log_history if "loss" in h])
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_saved_bytes_head_and_loss_ten_times_smaller():
    """seq 2048, vocab 32000, 50% label tokens, hidden 16: bytes kept for backward by head + loss."""
    torch.manual_seed(0)
    seq, vocab, hidden = 2048, 32000, 16
    head = nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(1, seq, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))
    labels[torch.rand(1, seq) < 0.5] = -100
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]

    with SavedTensorCounter(exclude=head.parameters()) as dense_bytes:
        logits = head(h).float()
        ref = torch.nn.functional.cross_entropy(logits.view(-1, vocab), shift.view(-1), ignore_index=-100)
    ref.backward()
    g_ref = h.grad.clone()
    h.grad = None
    w_ref = head.weight.grad.clone()
    head.weight.grad = None
    del logits

    with SavedTensorCounter(exclude=head.parameters()) as sparse_bytes:
        rows = (shift.view(-1) != -100).nonzero().squeeze(1)
        hs = h.view(-1, hidden).index_select(0, rows)
        loss = head_cross_entropy(hs, shift.view(-1)[rows], head, torch.tensor(float(rows.numel())), chunk_size=1024)
    loss.backward()
    assert _rel(loss.detach(), ref.detach()) <= 1e-5
    assert _rel(h.grad, g_ref) <= 1e-5 and _rel(head.weight.grad, w_ref) <= 1e-5
    ratio = dense_bytes.total_bytes / sparse_bytes.total_bytes
    print(f"head+loss saved bytes: dense {dense_bytes.total_bytes} sparse {sparse_bytes.total_bytes} ratio {ratio:.1f}x")
    assert ratio >= 10


def test_unsupported_models_refused_with_clear_error():
    with pytest.raises(ValueError, match="causal-LM"):
        apply_loss_tokens(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        apply_loss_tokens(tiny_model("llama"), chunk_size=0)

    class ScaledLlama(transformers.LlamaForCausalLM):
        """A family whose forward rescales logits in a way the generic path does not know."""

        def forward(self, *args, labels=None, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            if labels is not None:
                out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
            return out

    torch.manual_seed(0)
    odd = ScaledLlama(tiny_model("llama").config)
    with pytest.raises(ValueError, match="does more than"):
        apply_loss_tokens(odd)
    assert "forward" not in odd.__dict__  # nothing left installed after the refusal

    moe_cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                         output_router_logits=True)
    moe = transformers.AutoModelForCausalLM.from_config(moe_cfg)
    with pytest.raises(ValueError, match="output_router_logits"):
        apply_loss_tokens(moe)


def test_remove_restores_dense_forward():
    dense, sparse = _pair("llama")
    remove_loss_tokens(sparse)
    batch = tiny_batch(seq=8)
    assert sparse(**batch).logits is not None


def test_wrapped_head_goes_through_checkpointed_chunks():
    """A head that is not a plain nn.Linear (peft's modules_to_save copy of lm_head) takes the
    generic path: per-chunk recomputation; loss and gradients still equal dense."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    dense = peft.get_peft_model(tiny_model("llama"), cfg)
    sparse = copy.deepcopy(dense)
    apply_loss_tokens(sparse, chunk_size=5)
    assert type(sparse.get_output_embeddings()) is not nn.Linear
    dense.train()
    sparse.train()
    batch = tiny_batch(seq=16, label_fraction=0.5, seed=6)
    ref, out = dense(**batch), sparse(**batch)
    assert _rel(out.loss.detach(), ref.loss.detach()) <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_equal(dense, sparse, 1e-5)


def test_bf16_autocast_within_table():
    """fp32 weights under CPU bf16 autocast (Trainer's bf16=True): same tolerance as bf16 weights."""
    dense, sparse = _pair("llama")
    batch = tiny_batch(seq=24, label_fraction=0.5, seed=8)
    outs = []
    for m in (dense, sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**batch)
        out.loss.backward()
        outs.append(out.loss.detach())
    assert _rel(outs[1], outs[0]) <= TOL[torch.bfloat16]
    _assert_grads_equal(dense, sparse, TOL[torch.bfloat16])
