"""quant.embeddings: host: embedding and LM head in host memory, the head streamed in vocabulary
chunks, their update on CPU workers. On CPU host == device, so the same code runs with synchronous
copies; the references are the embeddings="trainable" run (same optimizer settings) and plain
autograd through nn.Embedding / F.linear."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efft import config
from efft.config import QuantConfig, RecipeError
from efft.memory.estimate import estimate
from efft.offload.host_embeddings import (HostEmbedding, HostLMHead, HostResidency, host_resident_parameters,
                                          make_host_resident)
from efft.offload.host_optimizer import HostParamsOptimizer, host_params_optimizer
from efft.optim.factory import build_optimizer
from efft.quant.trainable import (Int8LayerwiseOptimizer, export_full_precision, load_int8_pretrained,
                                  prepare_int8_training)
from tests.quantized_ft.helpers import int8_state
from tests.tiny import tiny_batch, tiny_model

VOCAB = 256
LR, EPS, CLIP = 1e-2, 1e-6, 0.05  # CLIP below the gradient norm, so every step is clipped


def _model(mode, tied, chunk=VOCAB):
    m = tiny_model("llama", seed=0, tie_word_embeddings=tied)
    q = QuantConfig(type="int8", trainable=True, compute_dtype="float32", head_chunk_rows=chunk)
    return prepare_int8_training(m, q, embeddings=mode)


def _optimizer(model, kind, acc, bits=32):
    """``kind``: torch AdamW whole-step (clipped by the global norm, here or by the loop), efft AdamW
    layer-wise (clipped by the last step's norm) or Int8LayerwiseOptimizer (per-parameter clip)."""
    host = host_resident_parameters(model)
    ids = {id(p) for p in host}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    if kind == "global":
        main = torch.optim.AdamW(rest, lr=LR, eps=EPS, weight_decay=0.0)
    elif kind == "lagged":
        main = build_optimizer(model, type("C", (), {"name": "adamw", "layerwise": True, "state_bits": bits})(), lr=LR, eps=EPS,
                               max_grad_norm=CLIP, gradient_accumulation_steps=acc, exclude=host)
    else:
        main = Int8LayerwiseOptimizer(torch.optim.AdamW(rest, lr=LR, eps=EPS, weight_decay=0.0),
                                      gradient_accumulation_steps=acc, max_grad_norm=CLIP)
    if not host:
        return main
    return host_params_optimizer(main, host, lr=LR, eps=EPS, weight_decay=0.0, gradient_accumulation_steps=acc,
                                 max_grad_norm=CLIP if kind == "global" else None, order=list(model.parameters()),
                                 state_bits=bits)


def _train(model, opt, kind, data, acc, host, sched=None):
    for i in range(0, len(data), acc):
        for b in data[i:i + acc]:
            (model(**b).loss / acc).backward()
        if kind == "global" and not host:  # what Trainer does; the host optimizer clips itself
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _run(mode, tied, kind="global", chunk=VOCAB, steps=3, acc=2, bits=32):
    """As under Trainer: accelerate reloads the optimizer's own state when it wraps it, then a
    scheduler changes lr every step."""
    m = _model(mode, tied, chunk)
    data = [tiny_batch(VOCAB, seed=i) for i in range(steps * acc)]
    opt = _optimizer(m, kind, acc, bits)
    opt.load_state_dict(opt.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(m, opt, kind, data, acc, mode == "host", sched)
    return m, opt


# ------------------------------------------------------------------------------- (a) same training
@pytest.mark.parametrize("tied,kind", [(True, "global"), (False, "global"), (False, "lagged"), (True, "per_parameter")])
def test_host_training_equals_trainable_bitwise(tied, kind):
    """One chunk covers the vocabulary: the same float operations in the same order, so every tensor
    (int8 codes, scales, rounding counters, embedding/head/norm weights) is bitwise equal after 3
    steps of 2 accumulated micro-batches with clipping."""
    a, _ = _run("trainable", tied, kind)
    b, opt = _run("host", tied, kind)
    assert isinstance(opt, HostParamsOptimizer) and opt.mode == kind
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert b.model.embed_tokens.weight.dtype == torch.float32
    assert (b.lm_head.weight is b.model.embed_tokens.weight) == tied


def test_8bit_state_for_the_embedding_and_head_on_device_or_host():
    """The "8-bit state" option: optim.state_bits: 8 gives the embedding/head 8-bit moments whether
    they train on the device (embeddings="trainable") or on the host, with the same result."""
    a, opt_a = _run("trainable", True, "lagged", bits=8)
    b, opt_b = _run("host", True, "lagged", bits=8)
    for m, opt in ((a, opt_a), (b, opt_b)):
        st = opt.state[m.model.embed_tokens.weight]
        assert st["exp_avg_q"].dtype == torch.uint8 and "exp_avg" not in st
    assert opt_b.state[b.model.embed_tokens.weight]["exp_avg_q"].device.type == "cpu"
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tied", [True, False])
def test_host_training_with_head_chunks_matches_trainable(tied):
    """Several chunks (100 rows: 100 + 100 + 56): dX is summed chunk by chunk, a different float
    order than one matmul (relative differences ~1e-7). AdamW divides each gradient element by its
    own magnitude (+ eps 1e-6), so elements whose gradient is near eps carry that relative
    difference into an lr-sized (1e-2) step: float weights agree to 1e-4 (1% of lr) and a
    stochastic-rounding decision may flip by one code where a weight sits on a threshold (<= 0.5%)."""
    a, _ = _run("trainable", tied, chunk=VOCAB)
    b, _ = _run("host", tied, chunk=100)
    assert b.lm_head.residency.peak_head_rows_on_device == 200
    sa, sb = int8_state(a), int8_state(b)
    diff = total = 0
    for k in sa:
        d = (sa[k][0].int() - sb[k][0].int()).abs()
        assert d.max() <= 1 and sa[k][2][1] == sb[k][2][1] == 3, k
        diff, total = diff + int((d > 0).sum()), total + d.numel()
    assert diff <= 5e-3 * total, (diff, total)
    fa = {k: v for k, v in a.state_dict().items() if v.is_floating_point() and not k.endswith("weight_scale")}
    fb = b.state_dict()
    for k, v in fa.items():
        torch.testing.assert_close(fb[k], v, rtol=0, atol=1e-4, msg=k)


# -------------------------------------------------------------------------------- (b) the Functions
def _host_head(w, chunk):
    res = HostResidency()
    p = res.host_weight(w)
    return HostLMHead(p, res, chunk_rows=chunk, compute_dtype=w.dtype, device=w.device), p


@pytest.mark.parametrize("chunk", [300, 128, 7])
def test_head_gradients_equal_autograd_through_linear(chunk):
    torch.manual_seed(0)
    w = torch.randn(300, 48, requires_grad=True)
    x = torch.randn(3, 5, 48, requires_grad=True)
    gy = torch.randn(3, 5, 300)
    head, p = _host_head(w, chunk)
    y = head(x)
    y.backward(gy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_ref)
    y_ref.backward(gy)
    if chunk >= 300:  # one chunk: the very same matmuls
        for got, ref in ((y, y_ref), (p.grad, w_ref.grad), (x.grad, x_ref.grad)):
            assert torch.equal(got, ref)
    else:
        # chunks: BLAS picks its kernel (and so its summation order) by shape, and dX sums the
        # chunks' contributions: float32 rounding differences only
        for got, ref in ((y, y_ref), (p.grad, w_ref.grad), (x.grad, x_ref.grad)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_embedding_gradient_equals_nn_embedding_with_padding():
    torch.manual_seed(0)
    ref = nn.Embedding(300, 32, padding_idx=3)
    ids = torch.randint(0, 300, (4, 20))
    ids[0, :5] = 3
    ids[1, :3] = 17  # repeated ids accumulate
    res = HostResidency()
    emb = HostEmbedding(res.host_weight(ref.weight), res, padding_idx=3, compute_dtype=torch.float32, device="cpu")
    g = torch.randn(4, 20, 32)
    out = emb(ids)
    out.backward(g)
    ref(ids).backward(g)
    assert torch.equal(out, ref(ids))
    assert torch.equal(emb.weight.grad, ref.weight.grad)
    assert res.embedding_rows_to_device == res.embedding_rows_to_host == 80


def test_loss_tokens_with_a_host_head_equals_the_dense_loss():
    """sparsity.loss_tokens calls the head module per row chunk (checkpointed): the host head serves
    it; loss and gradients equal the dense model's."""
    from efft.sparsity.loss_tokens import apply_loss_tokens

    batch = tiny_batch(VOCAB, seed=1, label_fraction=0.5)
    dense = tiny_model("llama", seed=0, tie_word_embeddings=False)
    sparse = tiny_model("llama", seed=0, tie_word_embeddings=False)
    make_host_resident(sparse, chunk_rows=100)
    apply_loss_tokens(sparse, chunk_size=8)
    ld, ls = dense(**batch).loss, sparse(**batch).loss
    ld.backward()
    ls.backward()
    torch.testing.assert_close(ls, ld, rtol=1e-5, atol=1e-6)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(sparse.get_parameter(name).grad, dense.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- (c) what moved, when
def test_transfers_are_recorded_chunk_by_chunk_and_the_update_runs_in_backward():
    model = _model("host", tied=False, chunk=100)
    res = model.lm_head.residency
    res.reset_stats()
    host = host_resident_parameters(model)
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in host)]
    opt = host_params_optimizer(torch.optim.AdamW(rest, lr=LR), host, lr=LR)
    before = model.lm_head.weight.detach().clone()
    batch = tiny_batch(VOCAB, batch=2, seq=16)
    model(**batch).loss.backward()
    h = 64
    expect = [(phase, v0, n, n * h * 4) for phase in ("forward", "backward") for v0, n in ((0, 100), (100, 100), (200, 56))]
    assert res.chunk_transfers == expect
    assert res.peak_head_rows_on_device == 200  # this chunk and the prefetched next one, never more
    assert res.head_grad_bytes_to_host == VOCAB * h * 4
    assert res.embedding_rows_to_device == res.embedding_rows_to_host == 32
    # no clipping: the host step ran on a worker as soon as the gradient was complete, before step()
    opt.host._wait_idle()
    assert not torch.equal(model.lm_head.weight.detach(), before)
    opt.step()
    opt.close()
    # the memory report counts the host weights as host memory, not device weights
    from efft.memory.tracker import tensor_bytes, weight_bytes

    w = weight_bytes(model)
    assert w["host"] == 2 * VOCAB * h * 4
    assert w["trainable"] == tensor_bytes(rest, set())
    # model.to(dtype) changes what the modules compute in, never the float32 host weight
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.compute_dtype == torch.bfloat16
    assert model(input_ids=batch["input_ids"]).logits.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- (d) save + resume
def test_resume_continues_exactly_and_exports_full_precision(tmp_path):
    data = [tiny_batch(VOCAB, seed=i) for i in range(8)]
    full = _model("host", tied=True, chunk=100)
    _train(full, _optimizer(full, "global", 2), "global", data, 2, True)

    first = _model("host", tied=True, chunk=100)
    opt = _optimizer(first, "global", 2)
    _train(first, opt, "global", data[:4], 2, True)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    first.save_pretrained(tmp_path / "ck")
    opt.close()

    second = load_int8_pretrained(tmp_path / "ck", attn_implementation="eager")  # as tiny_model builds it
    assert isinstance(second.lm_head, HostLMHead) and second.lm_head.chunk_rows == 100
    opt2 = _optimizer(second, "global", 2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _train(second, opt2, "global", data[4:], 2, True)
    sa, sb = full.state_dict(), second.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k

    export_full_precision(second, tmp_path / "plain")
    plain = type(tiny_model("llama", tie_word_embeddings=True)).from_pretrained(tmp_path / "plain")
    assert type(plain.lm_head) is nn.Linear
    assert torch.equal(plain.model.embed_tokens.weight, second.model.embed_tokens.weight.detach().bfloat16())


# --------------------------------------------------------------------------------------- (e) planner
TINY = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


def _recipe(data_path, out, embeddings="host", **extra):
    train = {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
             "logging_steps": 1, "save_steps": 2, "seed": 3, "max_grad_norm": 1.0, "gradient_accumulation_steps": 2}
    train.update(extra.pop("train", {}))
    d = {"model": {"config": TINY, "dtype": "float32"}, "data": {"path": str(data_path), "max_seq_length": 64},
         "train": train,
         "quant": {"type": "int8", "trainable": True, "compute_dtype": "float32", "embeddings": embeddings,
                   "head_chunk_rows": 128},
         "optim": {"name": "adamw"}}
    d.update(extra)
    return config.validate(d)


def test_planner_moves_embedding_and_head_to_host(data_path, tmp_path):
    """Llama 320 x 64 untied: embedding and head 2 x 81,920 B of float32 weights. With host mode they
    leave the device; the device gets the chunk workspace instead: a ring of two float32 chunks of
    128 rows plus one chunk's float32 dW = 3 x 128 x 64 x 4 = 98,304 B; the host holds weight +
    gradient (accumulation 2: the gradient buffer and the accumulation-pass buffer) + torch AdamW's
    two moments and step for each."""
    frozen = estimate(_recipe(data_path, tmp_path, "frozen"))
    host = estimate(_recipe(data_path, tmp_path, "host"))
    trainable = estimate(_recipe(data_path, tmp_path, "trainable"))
    wb = 320 * 64 * 4
    assert frozen.weights - host.weights == 2 * wb
    assert host.details["head_chunk_workspace"] == 3 * 128 * 64 * 4
    assert host.host == 2 * (wb + 2 * wb + 2 * wb + 4)
    assert host.gradients == frozen.gradients and host.optimizer_state == frozen.optimizer_state
    # trainable keeps all of it on the device: weights, float32 gradients, AdamW's moments + step
    assert trainable.weights == frozen.weights
    assert trainable.gradients - frozen.gradients == 2 * wb
    assert trainable.optimizer_state - frozen.optimizer_state == 2 * (2 * wb + 4)
    assert host.total < trainable.total
    # the planned chunk ring is what the Function holds: measured on a model with this config
    model = _model("host", tied=False, chunk=128)
    model(**tiny_batch(VOCAB)).loss.backward()
    assert model.lm_head.residency.peak_head_rows_on_device * 64 * 4 == 2 * 128 * 64 * 4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("acc", [1, 3])
def test_planner_host_bytes_equal_a_measured_run(data_path, tmp_path, tied, acc):
    """The planner's host bytes are what a real run holds (efft train: Trainer, its zero_grad between
    steps, the host optimizer), read from the pool's and the host providers' own accounting at the
    end of every step: the weights (one if tied), their gradient buffers (one each; with accumulation
    a second, the accumulation-pass buffer, from the first step's second micro-batch on) and torch
    AdamW's moments + step. Besides those the pool holds only released embedding-row staging buffers
    (one per distinct micro-batch shape, sized by the data, not planned)."""
    import gc

    from transformers import TrainerCallback

    from efft.offload import host_bytes_in_use
    from efft.train import train

    r = _recipe(data_path, tmp_path, train={"gradient_accumulation_steps": acc, "max_steps": 2, "save_steps": 100},
                model={"config": {**TINY, "tie_word_embeddings": tied}, "dtype": "float32"})
    plan = estimate(r)
    seen = []

    class Measure(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            res = model._efft_host_residency
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrap
            tokens = [n // (64 * 4) for n, bufs in res.pool._free.items() for _ in bufs]
            seen.append({"pool_in_use": res.pool.in_use_bytes, "weights": res.host_bytes(),
                         "state": opt.host.host_bytes(), "staging": res.pool.cached_bytes, "tokens": tokens,
                         "global": host_bytes_in_use() - base})

    gc.collect()
    base = host_bytes_in_use()
    train(r, trainer_hook=lambda tr: tr.add_callback(Measure()))
    assert len(seen) == 2
    wb, n = 320 * 64 * 4, 1 if tied else 2
    for m in seen:
        assert m["pool_in_use"] == n * (2 if acc > 1 else 1) * wb  # the gradient buffers: nothing else in use
        assert m["weights"] == n * wb and m["state"] == n * (2 * wb + 4)
        assert m["pool_in_use"] + m["weights"] + m["state"] == plan.host == plan.details["host_embedding_bytes"]
        # the rest of host_bytes_in_use(): cached staging of micro-batches' embedding rows (batch 4)
        assert m["global"] == plan.host + m["staging"]
        assert m["tokens"] and all(t % 4 == 0 and t <= 4 * 64 for t in m["tokens"])


def test_planner_suggests_host_embeddings_for_the_8b_int8_recipe():
    """The shipped 8B int8 recipe with trainable embedding/head misses its 12 GiB; the cheapest change
    the planner finds is host mode, predicted as planning that variant directly."""
    path = config.find_recipe("llama3-8b-int8-apollo-mini")
    trainable = estimate(config.load_recipe(path, ["quant.embeddings=trainable"], weights=False), "12GiB")
    host = estimate(config.load_recipe(path, ["quant.embeddings=host"], weights=False), "12GiB")
    assert not trainable.fits and host.fits
    assert trainable.suggestion_changes == ["quant.embeddings=host"] and trainable.suggestion_total == host.total
    assert host.host >= 2 * 128256 * 4096 * 4 * 4  # embedding + head: weight, gradient, two moments


# -------------------------------------------------------------------------- (f) efft train + refusals
def test_recipe_trains_through_efft_train_and_resumes_exactly(data_path, tmp_path):
    """efft train (Trainer: accelerate's optimizer wrap, linear schedule, accumulation 2, clipping)
    with layer-wise APOLLO-Mini and loss-token skipping; stopped after step 2 and resumed from its
    checkpoint, the losses and the final int8 file equal the uninterrupted run's."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from efft.train import train

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 2:
                control.should_training_stop = True

    def recipe(out, **train_kw):
        return _recipe(data_path, out, optim={"name": "apollo_mini", "layerwise": True},
                       sparsity={"loss_tokens": {"enabled": True}},
                       train={"gradient_checkpointing": True, "lr_scheduler_type": "linear", **train_kw})

    full = train(recipe(tmp_path / "full"))
    assert full["global_step"] == 4 and full["last_loss"] < full["first_loss"]
    part = tmp_path / "part"
    assert train(recipe(part), trainer_hook=lambda tr: tr.add_callback(StopAt()))["global_step"] == 2
    second = train(recipe(part, resume_from_checkpoint=True))
    assert [l for _, l in second["loss_curve"]] == [l for _, l in full["loss_curve"]]
    a = load_file(tmp_path / "full" / "final" / "int8" / "model.safetensors")
    b = load_file(part / "final" / "int8" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" in a and a["lm_head.weight"].dtype == torch.float32
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final = tmp_path / "full" / "final"
    assert (final / "model.safetensors").is_file()
    assert "efft_int8_trainable" not in json.loads((final / "config.json").read_text())


def test_bad_combinations_are_refused_before_loading(data_path, tmp_path, monkeypatch):
    from efft.compose import check_recipe

    r = _recipe(data_path, tmp_path, quant={"type": "int8", "trainable": True, "embeddings": "host", "skip": [],
                                            "compute_dtype": "float16"},
                train={"fp16": True}, offload={"optimizer": True})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError) as e:
        check_recipe(r)
    msg = str(e.value)
    for needle in ("keep 'lm_head' in quant.skip", "single-process", "use train.bf16", "offload.optimizer"):
        assert needle in msg, needle
    with pytest.raises(RecipeError, match="built for trainable int8 weights"):
        _recipe(data_path, tmp_path, quant={"type": "nf4", "embeddings": "host"}, adapter={"type": "lora"})


# ------------------------------------------------------------------- (g) the host gradient buffers
def _host_and_dense(tied, loss_tokens=False):
    """A float32 model with host embedding/head (head in 3 chunks) and the same model left plain."""
    from efft.sparsity.loss_tokens import apply_loss_tokens

    dense = tiny_model("llama", seed=0, tie_word_embeddings=tied)
    host = tiny_model("llama", seed=0, tie_word_embeddings=tied)
    make_host_resident(host, chunk_rows=100)
    if loss_tokens:  # the head is then called once per row chunk: several contributions a pass
        apply_loss_tokens(host, chunk_size=8)
    return host, dense


@pytest.mark.parametrize("tied,loss_tokens", [(False, False), (True, False), (False, True)])
def test_accumulated_micro_batches_equal_one_big_batch(tied, loss_tokens):
    """Three micro-batches (loss / 3) accumulated in the host buffers give the gradient of one batch
    of all their rows, computed by plain autograd through nn.Embedding / nn.Linear; a second step
    after zero_grad (set_to_none=False, then True) starts from zero, in particular on the embedding
    rows only the first step touched."""
    host, dense = _host_and_dense(tied, loss_tokens)
    hp, dp = host_resident_parameters(host), [dense.model.embed_tokens.weight] + ([] if tied else [dense.lm_head.weight])
    rest = [p for p in host.parameters() if all(p is not q for q in hp)]
    opt = host_params_optimizer(torch.optim.SGD(rest, lr=0.0), hp, lr=0.0, gradient_accumulation_steps=3)  # weights stay
    for step, set_to_none in enumerate((False, True)):
        micro = [tiny_batch(VOCAB, seed=10 * step + i) for i in range(3)]
        for b in micro:
            (host(**b).loss / 3).backward()
        big = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
        dense.zero_grad()
        dense(**big).loss.backward()
        for p, q in zip(hp, dp):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        if not set_to_none:
            assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in hp)
    opt.close()


def test_gradient_buffers_come_from_the_pool_once_and_are_reused():
    """After the first step, no host memory is allocated for gradients any more: each host weight's
    .grad is the same pooled buffer (the pool's own allocation, not a fresh tensor) in every step and
    micro-batch, with zero_grad(set_to_none=True) between steps; the pool counts the buffers (weight
    gradient + accumulation-pass buffer, for embedding and head) and close() gives them back."""
    from efft.memory.tracker import report
    from efft.offload import host_bytes_in_use

    model = _model("host", tied=False, chunk=100)
    pool = model.lm_head.residency.pool
    handed_out = []
    new = pool._new
    pool._new = lambda nbytes, what: handed_out.append(new(nbytes, what)) or handed_out[-1]
    opt = _optimizer(model, "global", 2)
    hp = host_resident_parameters(model)
    data = [tiny_batch(VOCAB, seed=i) for i in range(8)]
    grads, allocations = None, None
    for step in range(4):
        for b in data[2 * step:2 * step + 2]:
            (model(**b).loss / 2).backward()
            if grads is None:
                grads = [p.grad for p in hp]
                pooled = {buf.data_ptr() for buf, _ in handed_out}
                assert all(g.untyped_storage().data_ptr() in pooled for g in grads)
            assert all(p.grad is g for p, g in zip(hp, grads))
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in hp)
        if step == 0:
            allocations = pool.allocations
            wb = VOCAB * 64 * 4
            assert pool.in_use_bytes == 2 * 2 * wb  # per weight: .grad and the accumulation-pass buffer
            assert host_bytes_in_use() >= 2 * wb + pool.in_use_bytes
            assert report(model, opt, host_bytes=host_bytes_in_use)["host_offload_bytes"] == host_bytes_in_use()
    assert pool.allocations == allocations
    before, pinned = host_bytes_in_use(), pool.pinned_bytes
    opt.close()
    assert all(p.grad is None for p in hp) and pool.in_use_bytes == 0
    assert host_bytes_in_use() == before - 4 * VOCAB * 64 * 4 and pool.pinned_bytes == pinned - 4 * VOCAB * 64 * 4


@pytest.mark.parametrize("tied", [True, False])
def test_zero_grad_set_to_none_or_not_trains_the_same(tied):
    """zero_grad(set_to_none=False) keeps .grad in its buffer and zeroes only the rows written since
    (the embedding's, when untied); the training result is bitwise the one with set_to_none=True and
    the one of embeddings="trainable" (nn.Embedding, dense zero_grad), 3 steps of 2 micro-batches."""
    results = []
    for mode, set_to_none in (("trainable", False), ("host", True), ("host", False)):
        m = _model(mode, tied)
        opt = _optimizer(m, "global", 2)
        data = [tiny_batch(VOCAB, seed=i) for i in range(6)]
        for i in range(0, 6, 2):
            for b in data[i:i + 2]:
                (m(**b).loss / 2).backward()
            if mode == "trainable":
                torch.nn.utils.clip_grad_norm_(list(m.parameters()), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        results.append(m.state_dict())
        if mode == "host" and not set_to_none:
            acc = m.model.embed_tokens.weight._efft_host_grad
            assert m.model.embed_tokens.weight.grad is acc.main.t and acc.clean
        getattr(opt, "close", lambda: None)()
    for other in results[1:]:
        for k in results[0]:
            assert torch.equal(results[0][k], other[k]), k


def test_gradient_buffers_within_a_small_pinned_budget_fall_back_and_train_the_same():
    """A pinned budget that holds the weights and no more: the gradient buffers are plain pageable
    memory outside the pool's bound (pinned_bytes stays within it), and training is unchanged."""
    a, _ = _run("host", False)
    m = tiny_model("llama", seed=0, tie_word_embeddings=False)
    wb = VOCAB * 64 * 4
    q = QuantConfig(type="int8", trainable=True, compute_dtype="float32", head_chunk_rows=VOCAB)
    budget = type("Off", (), {"pin_memory": True, "max_pinned_bytes": 2 * wb})()
    b = prepare_int8_training(m, q, embeddings="host", host_cfg=budget)
    pool = b.lm_head.residency.pool
    assert pool.max_pinned_bytes == 2 * wb
    data = [tiny_batch(VOCAB, seed=i) for i in range(6)]
    opt = _optimizer(b, "global", 2)
    opt.load_state_dict(opt.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(b, opt, "global", data, 2, True, sched)
    assert pool.pinned_bytes <= 2 * wb and pool.in_use_bytes >= 2 * wb
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tied", [True, False])
def test_a_failed_backward_leaves_the_gradient_as_autograd_does(tied):
    """A backward that fails after the LM head wrote its part (a hook on the embedding's output
    raises), then the same micro-batch again: .grad equals plain autograd's going through the same
    (untied: the head's gradient was accumulated before the failure, the embedding's was not)."""
    host, dense = _host_and_dense(tied)
    hp, dp = host_resident_parameters(host), [dense.model.embed_tokens.weight] + ([] if tied else [dense.lm_head.weight])
    fail = []

    def boom(grad):
        if fail:
            fail.pop()
            raise RuntimeError("boom")

    for m in (host, dense):
        m.model.embed_tokens.register_forward_hook(lambda mod, inp, out: out.register_hook(boom) and None)
    first, second = tiny_batch(VOCAB, seed=1), tiny_batch(VOCAB, seed=2)
    for b, fails in ((first, False), (second, True), (second, False)):
        for m in (host, dense):
            if fails:
                fail.append(1)
                with pytest.raises(RuntimeError, match="boom"):
                    m(**b).loss.backward()
            else:
                m(**b).loss.backward()
        for p, q in zip(hp, dp):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
