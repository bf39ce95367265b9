"""WTA-CRS: unbiasedness (statistical), variance vs uniform column-row sampling, saved bytes, wiring.

The statistical bound: with T independent estimates G_t of the exact G, the mean's error per
element has variance var_e / T, so Z = sum_e (mean_e - G_e)^2 / sum_e (var_e / T) is about 1 for
an unbiased estimator (its expectation is 1; with 512 elements it concentrates) and grows like T
for a biased one. The test requires Z < 3 and every element within 6 standard errors, and checks
that the same statistic flags an estimator that leaves out the reweighting (so the test can fail).
"""
import copy

import pytest
import torch
from torch import nn

from efft.sparsity.sampled_linear import apply_sampled_linear, sample_rows, sampled_modules, uniform_rows
from efft.memory.tracker import SavedTensorCounter
from tests.tiny import tiny_batch, tiny_model

R, IN, OUT, T = 256, 32, 16, 1500


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed row norms, as activations and per-token gradients are in practice
    x = torch.randn(R, IN, generator=g) * torch.exp(torch.randn(R, 1, generator=g))
    dy = torch.randn(R, OUT, generator=g) * torch.exp(torch.randn(R, 1, generator=g))
    return x, dy


def _estimates(x, dy, sampler, trials=T):
    out = torch.empty(trials, OUT, IN, dtype=torch.float64)
    for t in range(trials):
        idx, scale = sampler()
        out[t] = ((dy[idx] * scale[:, None]).t() @ x[idx]).double()
    return out


def _z(est, exact):
    mean, var = est.mean(0), est.var(0)
    se2 = var / est.shape[0]
    z = float(((mean - exact) ** 2).sum() / se2.sum())
    worst = float(((mean - exact).abs() / se2.clamp_min(1e-30).sqrt()).max())
    return z, worst


def test_mean_of_sampled_gradients_converges_to_exact():
    torch.manual_seed(0)
    x, dy = _problem()
    exact = (dy.t() @ x).double()
    w = x.norm(dim=1) * dy.norm(dim=1)
    k = int(0.3 * R)
    est = _estimates(x, dy, lambda: sample_rows(w, k, k // 2))
    z, worst = _z(est, exact)
    print(f"WTA-CRS: Z={z:.2f} worst element {worst:.1f} standard errors")
    assert z < 3 and worst < 6

    # negative control: drop the 1/(s q) reweighting of the drawn rows -> biased, and the test sees it
    def biased():
        idx, scale = sample_rows(w, k, k // 2)
        return idx, torch.where(scale == 1, scale, torch.full_like(scale, (R - k // 2) / (k - k // 2)))

    zb, _ = _z(_estimates(x, dy, biased, trials=400), exact)
    assert zb > 20


@pytest.mark.parametrize("keep,det", [(0.3, 1.0), (2 / R, 0.8)])
def test_unbiased_when_the_deterministic_share_rounds_to_the_whole_budget(keep, det):
    """deterministic_fraction 1.0, or a small k where round(fraction * k) == k: the rows outside the
    top k must still be represented by at least one reweighted draw, else dW misses them (biased)."""
    torch.manual_seed(0)
    x, dy = _problem(seed=4)
    exact = (dy.t() @ x).double()
    w = x.norm(dim=1) * dy.norm(dim=1)
    k = max(1, int(round(keep * R)))
    n_det = int(round(det * k))
    assert n_det == k < R  # the case under test
    est = _estimates(x, dy, lambda: sample_rows(w, k, n_det), trials=400)
    z, worst = _z(est, exact)
    assert z < 3 and worst < 6


def test_variance_below_uniform_column_row_sampling():
    torch.manual_seed(1)
    x, dy = _problem(seed=1)
    exact = (dy.t() @ x).double()
    k = int(0.3 * R)
    mse = lambda est: float(((est - exact) ** 2).sum(dim=(1, 2)).mean())  # noqa: E731
    uni = mse(_estimates(x, dy, lambda: uniform_rows(R, k), trials=400))
    wta = mse(_estimates(x, dy, lambda: sample_rows(x.norm(dim=1) * dy.norm(dim=1), k, k // 2), trials=400))
    # the proxy a layer really has: gradient norms of the previous micro-batch (correlated, not equal)
    _, dy_prev = _problem(seed=2)
    dy_prev = 0.5 * dy_prev.norm(dim=1, keepdim=True) + 0.5 * dy.norm(dim=1, keepdim=True)
    prev = mse(_estimates(x, dy, lambda: sample_rows(x.norm(dim=1) * dy_prev[:, 0], k, k // 2), trials=400))
    print(f"E||G_hat - G||^2: uniform {uni:.3g}, WTA-CRS exact norms {wta:.3g}, previous-batch proxy {prev:.3g}")
    assert wta < 0.5 * uni
    assert prev < uni


def test_module_gradients_unbiased_and_input_grad_exact():
    torch.manual_seed(0)
    ref = nn.Linear(IN, OUT)
    lin = apply_sampled_linear(nn.Sequential(copy.deepcopy(ref)), keep=0.3)[0]
    x, dy = _problem(seed=3)
    x = x.view(4, R // 4, IN).requires_grad_(True)
    dy = dy.view(4, R // 4, OUT)
    y = ref(x)
    y.backward(dy)
    gx, gw, gb = x.grad.clone(), ref.weight.grad.clone(), ref.bias.grad.clone()
    grads = []
    for _ in range(400):
        x.grad = None
        lin.weight.grad = None
        lin.bias.grad = None
        out = lin(x)
        torch.testing.assert_close(out, y)
        out.backward(dy)
        torch.testing.assert_close(x.grad, gx)
        torch.testing.assert_close(lin.bias.grad, gb)
        grads.append(lin.weight.grad.clone())
    z, worst = _z(torch.stack(grads).double(), gw.double())
    assert z < 3 and worst < 6
    assert lin._efft_sampled.proxy is not None and lin._efft_sampled.proxy.shape == (R // 4,)


class _LinearBytes:
    """Bytes saved for backward inside the decoder's nn.Linear forwards (storage-deduplicated); the
    LM head is left out (sampling does not apply to it; loss-token skipping handles it)."""

    def __init__(self, model):
        self.counter = SavedTensorCounter(exclude=model.parameters())
        self.handles = []
        head = model.get_output_embeddings()
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not head:
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._exit))

    def _enter(self, *args):
        self.counter.__enter__()

    def _exit(self, *args):
        self.counter.__exit__(None, None, None)

    def close(self):
        for h in self.handles:
            h.remove()


def test_saved_activation_bytes_of_linears_at_keep_03():
    dense = tiny_model("llama", hidden=64)
    sparse = apply_sampled_linear(copy.deepcopy(dense), keep=0.3)
    batch = tiny_batch(batch=2, seq=128)
    sizes = []
    for model in (dense, sparse):
        meter = _LinearBytes(model)
        model(**batch).loss.backward()
        meter.close()
        sizes.append(meter.counter.total_bytes)
    print(f"linear saved bytes: dense {sizes[0]} sampled {sizes[1]} ratio {sizes[0] / sizes[1]:.2f}x")
    assert sizes[1] * 2.5 <= sizes[0]


def test_peft_lora_layers_sampled_base_left_alone():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    apply_sampled_linear(model, keep=0.5, target_modules=["q_proj", "v_proj"])
    names = sampled_modules(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    model.train()
    model(**tiny_batch(seq=16)).loss.backward()
    assert all(m.weight.grad is not None for m in names.values())


def test_bad_config_raises():
    with pytest.raises(ValueError, match="keep"):
        apply_sampled_linear(tiny_model("llama"), keep=0.0)
    with pytest.raises(ValueError, match="keep"):
        apply_sampled_linear(tiny_model("llama"), keep=1.2)
    with pytest.raises(ValueError, match="deterministic_fraction"):
        apply_sampled_linear(tiny_model("llama"), deterministic_fraction=-0.1)
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable linear layer"):
        apply_sampled_linear(frozen)


def test_sample_cache_does_not_outlive_its_input():
    """Layers called directly (no model-level hook clears the cache): entries die with their input."""
    import gc

    seq = apply_sampled_linear(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), keep=0.5)
    shared = seq._efft_sampled_shared
    for _ in range(5):
        x = torch.randn(4, 8, requires_grad=True)
        seq[0](x).sum().backward()
        del x
    gc.collect()
    assert len(shared._cache) == 0


def test_finetune_quality_close_to_exact_gradients():
    """From the base trained on strides 1..3, 40 full fine-tuning steps on strides 4..5. Stated margin:
    WTA-CRS at keep 0.3 ends within 0.1 nats (held-out loss) of exact gradients."""
    from tests.sparsity.task import pretrained_base, train_losses

    kw = dict(seq=16, vocab=32, strides=(4, 5))
    _, exact = train_losses(pretrained_base(), 40, 3e-3, **kw)
    torch.manual_seed(0)
    _, sampled = train_losses(apply_sampled_linear(pretrained_base(), keep=0.3), 40, 3e-3, **kw)
    print(f"held-out loss: exact {exact:.3f} WTA-CRS keep 0.3 {sampled:.3f}")
    assert sampled <= exact + 0.1


def test_trainable_int8_layer_unbiased():
    """efft's Int8TrainableLinear (int8 codes, float32 gradient carrier): sampled carrier gradient is
    unbiased against the layer's own exact backward; input and bias gradients equal it."""
    trainable = pytest.importorskip("efft.quant.trainable")
    torch.manual_seed(0)
    layer = trainable.Int8TrainableLinear.from_linear(nn.Linear(IN, OUT))
    x, dy = _problem(seed=4)
    x = x.view(4, R // 4, IN).requires_grad_(True)
    dy = dy.view(4, R // 4, OUT)
    y = layer(x)
    y.backward(dy)
    gx, gw, gb = x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()
    apply_sampled_linear(nn.Sequential(layer), keep=0.3)
    assert sampled_modules(nn.Sequential(layer))
    grads = []
    for _ in range(300):
        x.grad = layer.weight.grad = layer.bias.grad = None
        out = layer(x)
        torch.testing.assert_close(out, y)
        out.backward(dy)
        torch.testing.assert_close(x.grad, gx)
        torch.testing.assert_close(layer.bias.grad, gb)
        grads.append(layer.weight.grad.clone())
    z, worst = _z(torch.stack(grads).double(), gw.double())
    assert z < 3 and worst < 6


def test_trainable_int8_weight_changed_before_backward_is_refused():
    """As the int8 layer's own backward: codes written between forward and backward (an update
    inside the graph) would make dx use the new weight; the sampled path refuses too."""
    trainable = pytest.importorskip("efft.quant.trainable")
    layer = trainable.Int8TrainableLinear.from_linear(nn.Linear(IN, OUT))
    apply_sampled_linear(nn.Sequential(layer), keep=0.3)
    x = torch.randn(2, 5, IN, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        layer.weight_codes.add_(1)
    with pytest.raises(RuntimeError, match="updated between forward and backward"):
        out.sum().backward()


@pytest.mark.parametrize("qt,granularity", [("nf4", "block"), ("nf4", "channel"), ("int8", "block")])
def test_peqa_scale_gradients_unbiased(qt, granularity):
    """PEQA (trainable quantization scales): the sampled scale gradient is unbiased against plain
    autograd through an independent dequantization (tests/quant/test_peqa.py's reference); input and
    bias gradients are exact; only the sampled rows are kept for backward."""
    from efft.quant import QuantLinear
    from efft.quant.peqa import PEQALinear
    from tests.quant.test_peqa import _reference_weight

    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(IN * 2, OUT), quant_type=qt, blocksize=32, compute_dtype=torch.float32)
    layer = PEQALinear(q, granularity, train_bias=True)
    trained = layer.channel_scales if granularity == "channel" else layer.block_scales
    x, dy = _problem(seed=5)
    x = torch.cat([x, x.flip(0)], 1).view(4, R // 4, 2 * IN).requires_grad_(True)
    dy = dy.view(4, R // 4, OUT)
    s = trained.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    y = torch.nn.functional.linear(x, _reference_weight(q, s, granularity), b)
    y.backward(dy)
    gx, gs, gb = x.grad.clone(), s.grad.clone(), b.grad.clone()

    apply_sampled_linear(nn.Sequential(layer), keep=0.3)
    assert sampled_modules(nn.Sequential(layer))
    grads = []
    for _ in range(300):
        x.grad = trained.grad = layer.bias.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t.numel()), t)[1], lambda t: t):
            kept = []
            out = layer(x)
        torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-5)
        assert max(kept) <= int(round(0.3 * R)) * 2 * IN  # the input itself (R x 2*IN) is not kept
        out.backward(dy)
        torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-5)
        grads.append(trained.grad.clone())
    z, worst = _z(torch.stack(grads).double(), gs.double())
    assert z < 3 and worst < 6, (z, worst)


def test_peqa_model_saved_input_bytes_at_keep_03():
    """A PEQA-prepared NF4 llama: the bytes its quantized layers keep for the scale gradients drop
    >= 2.5x at keep 0.3, and every trainable scale still gets a gradient."""
    from efft.quant import quantize_model
    from efft.quant.peqa import PEQALinear, prepare_peqa

    base = prepare_peqa(quantize_model(tiny_model("llama", hidden=64), type="nf4", compute_dtype="float32"))
    sparse = apply_sampled_linear(copy.deepcopy(base), keep=0.3)
    assert len(sampled_modules(sparse)) == sum(isinstance(m, PEQALinear) for m in sparse.modules())
    batch = tiny_batch(batch=2, seq=128)
    sizes = []
    for model in (base, sparse):
        model.train()
        counter = SavedTensorCounter(exclude=model.parameters())
        handles = [h for m in model.modules() if isinstance(m, PEQALinear)
                   for h in (m.register_forward_pre_hook(lambda *a: [counter.__enter__()] and None),
                             m.register_forward_hook(lambda *a: counter.__exit__(None, None, None)))]
        model(**batch).loss.backward()
        for h in handles:
            h.remove()
        sizes.append(counter.total_bytes)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    print(f"PEQA layers saved bytes: exact {sizes[0]} sampled {sizes[1]} ratio {sizes[0] / sizes[1]:.2f}x")
    assert sizes[1] * 2.5 <= sizes[0]


def test_peqa_layers_share_samples_when_computing_in_another_dtype():
    """PEQA casts its input to its compute dtype; layers reading the same input (q/k/v, gate/up) must
    still share one sample (one kept copy), as they do when no cast happens."""
    from efft.quant import quantize_model
    from efft.quant.peqa import prepare_peqa

    drawn = {}
    for cd in ("float32", "bfloat16"):
        model = prepare_peqa(quantize_model(tiny_model("llama", hidden=64, layers=1), type="nf4", compute_dtype=cd))
        apply_sampled_linear(model, keep=0.3)
        shared = model._efft_sampled_shared
        calls = []
        orig = shared.get

        def counting(x, state, dtype=None, orig=orig, calls=calls):
            before = len(shared._cache)
            out = orig(x, state, dtype)
            calls.append(len(shared._cache) > before)
            return out

        shared.get = counting
        model.train()
        model(**tiny_batch(batch=2, seq=16)).loss.backward()
        drawn[cd] = sum(calls)
    assert drawn["float32"] == drawn["bfloat16"] == 4  # q/k/v, o, gate/up, down


def test_output_embedding_trained_through_peft_modules_to_save_is_not_sampled():
    """peft's modules_to_save=["lm_head"] trains a copy of the head inside a wrapper: it is still the
    output embedding, which "all-linear" leaves exact."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    ref = copy.deepcopy(model)
    apply_sampled_linear(model, keep=0.3)
    batch = tiny_batch(seq=16)
    grads = []
    for m in (ref, model):
        m.train()
        m(**batch).loss.backward()
        grads.append(m.base_model.model.lm_head.modules_to_save["default"].weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_an_overflowing_backward_does_not_poison_later_steps():
    """fp16 with a GradScaler: some backwards overflow (inf/nan gradients) and the scaler skips that
    step. The gradient-norm proxy must not keep the non-finite values (every later sample would
    fail), and a non-finite input row must not make the forward raise (its loss is inf; the step is
    skipped)."""
    torch.manual_seed(0)
    net = apply_sampled_linear(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), keep=0.5)
    x = torch.randn(2, 8, 16)
    net(x).sum().mul(float("inf")).backward()
    net.zero_grad()
    for _ in range(3):
        net(x).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        net.zero_grad()
    assert all(torch.isfinite(m._efft_sampled.proxy).all() for m in sampled_modules(net).values())
    bad = x.clone()
    bad[0, 3] = float("inf")
    assert not torch.isfinite(net(bad)).all()


def test_reentrant_checkpointing_recomputes_the_forwards_dropout():
    """Reentrant checkpointing runs the block without grad, then again in backward from the restored
    RNG state. The no-grad pass must draw the same samples as the recompute, or the recompute's
    dropout masks come from a shifted stream: gradients of another forward than the one that ran
    (without checkpointing, and with the non-reentrant one, they are equal)."""
    base = tiny_model("llama", attention_dropout=0.5)
    batch = tiny_batch(seq=16)

    def grads(reentrant):
        model = apply_sampled_linear(copy.deepcopy(base), keep=0.5)
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(5)
        model(**batch).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    want = grads(None)
    for reentrant in (False, True):
        for g, w in zip(grads(reentrant), want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("det", [0.0, 0.5, 1.0])
def test_a_budget_of_every_row_is_exact(det):
    """keep 1.0 keeps every row once with scale 1, whatever the deterministic fraction: dW exact."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(37, generator=g)
    idx, scale = sample_rows(w, 37, int(round(det * 37)), generator=g)
    assert sorted(idx.tolist()) == list(range(37)) and bool((scale == 1).all())
    lin = nn.Linear(8, 5)
    ref = copy.deepcopy(lin)
    apply_sampled_linear(lin, keep=1.0, deterministic_fraction=det)
    x = torch.randn(4, 9, 8)
    lin(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)


def test_target_names_match_whole_components():
    """'up_proj' names up_proj, not a fused gate_up_proj (peft's rule: the name or a dotted suffix)."""
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(4, 8)
            self.up_proj = nn.Linear(4, 4)

    m = apply_sampled_linear(MLP(), keep=0.5, target_modules=["up_proj"])
    assert set(sampled_modules(m)) == {"up_proj"}
