"""Activation offload on CPU: bitwise-equal training with and without it, what was offloaded (and
what never is), prefetch ahead of backward, and its switches."""
from collections import Counter

import pytest
import torch

from efft.offload.activations import enable_activation_offload, find_decoder_layers
from tests.offload.helpers import batches, cfg, model, same_params, train

LAYERS = 3


def run(c=None, gc=None, steps=2, seq=16):
    m = model(layers=LAYERS)
    if gc is not None:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": gc})
    h = enable_activation_offload(m, c, trace=True) if c is not None else None
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, steps, seq=seq)
    return m, h


@pytest.fixture(scope="module")
def plain():
    return run()[0]


@pytest.fixture(scope="module")
def plain_gc():
    return run(gc=False)[0]


def test_all_mode_bitwise_and_trace(plain):
    m, h = run(cfg(activation_mode="all"))
    assert same_params(plain, m)
    t = h.trace
    offloaded = Counter(e[1] for e in t if e[0] == "offload")
    assert set(offloaded) == set(range(LAYERS - 1))  # every layer but the last
    assert ("keep", LAYERS - 1, "last layer") in t
    assert ("keep", 0, "parameter") in t  # weights are saved by reference, never copied
    assert all(e[1] is None for e in t if e[0] == "keep" and e[2] == "outside layers")
    # Each offloaded tensor came back exactly once, all ahead of need (prefetch_layers=1).
    assert h.stats["offloaded"] == h.stats["prefetched"] > 0 and h.stats["fetched"] == 0
    assert h.pool.in_use_bytes == 0  # every host buffer went back to the pool


def test_prefetch_order_is_ahead_of_backward():
    m = model(layers=LAYERS)
    h = enable_activation_offload(m, cfg(prefetch_layers=1), trace=True)
    m(**batches(0)[0]).loss.backward()
    events = [e for e in h.trace if e[0] in ("offload", "prefetch", "fetch")]
    back = [e for e in events if e[0] != "offload"]
    # The top offloaded layer is fetched first; every fetch is a prefetch started by the layer above
    # (or by its own first tensor), never a blocking fetch.
    assert back[0][1] == LAYERS - 2 and all(e[0] == "prefetch" for e in back)
    assert [e[1] for e in back] == sorted((e[1] for e in back), reverse=True)


@pytest.mark.parametrize("ahead", [1, 2])
def test_prefetch_runs_the_configured_number_of_layers_ahead(ahead):
    """With prefetch_layers = p, layer L's copy back starts when backward first unpacks a tensor of
    layer L + p: before any tensor of layer L + p - 1 is unpacked, and not earlier than that."""
    layers = 4
    m = model(layers=layers)
    h = enable_activation_offload(m, cfg(prefetch_layers=ahead), trace=True)
    unpack = h._unpack

    def noting(obj):  # record which layer backward is in, in the same trace
        h.trace.append(("unpack", obj.layer))
        return unpack(obj)

    h._unpack = noting
    m(**batches(0)[0]).loss.backward()
    t = h.trace
    first_unpack = {L: min(i for i, e in enumerate(t) if e == ("unpack", L)) for L in range(layers)}
    prefetch = [(i, e[1]) for i, e in enumerate(t) if e[0] == "prefetch"]  # one per host copy
    assert {L for _, L in prefetch} == set(range(layers - 1)) and not [e for e in t if e[0] == "fetch"]
    for L in range(layers - 1):
        at = [i for i, layer in prefetch if layer == L]
        trigger = min(L + ahead, layers - 1)
        assert first_unpack[trigger] < min(at), (L, t)  # started by layer L + p ...
        if L + ahead <= layers - 1:
            assert max(at) < first_unpack[trigger - 1], (L, t)  # ... all ahead of layer L + p - 1


def test_no_prefetch_fetches_on_demand(plain):
    m, h = run(cfg(prefetch_layers=0))
    assert same_params(plain, m)
    assert h.stats["prefetched"] == 0 and h.stats["fetched"] == h.stats["offloaded"] > 0


def test_min_offload_bytes_keeps_small_tensors(plain):
    m, h = run(cfg(min_offload_bytes=8 * 1024))
    assert same_params(plain, m)
    sizes = [e[2] for e in h.trace if e[0] == "offload"]
    assert sizes and min(sizes) >= 8 * 1024
    assert any(e[2] == "small" for e in h.trace if e[0] == "keep")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", ["all", "checkpoint_inputs"])
def test_with_gradient_checkpointing(mode, reentrant, plain_gc):
    m, h = run(cfg(activation_mode=mode), gc=reentrant)
    assert same_params(plain_gc, m)
    # Checkpointing keeps only each layer's input; that is what went to host, one per layer and step.
    per_layer = Counter(e[1] for e in h.trace if e[0] == "offload")
    assert per_layer == {i: 2 for i in range(LAYERS - 1)}
    sizes = {e[2] for e in h.trace if e[0] == "offload"}
    assert sizes == {2 * 16 * 64 * 4}  # batch x seq x hidden fp32


def test_checkpoint_inputs_mode_without_checkpointing_raises():
    m = model(layers=LAYERS)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        enable_activation_offload(m, cfg(activation_mode="checkpoint_inputs"))
        m(**batches(0)[0])


def test_switches_off_below_min_seq_length(plain):
    m, h = run(cfg(min_seq_length=17))  # batches have 16 tokens
    assert same_params(plain, m)
    assert h.stats["offloaded"] == 0 and h.stats["forwards_skipped"] == 2 and h.trace == []
    m2 = model(layers=LAYERS)
    h2 = enable_activation_offload(m2, cfg(min_seq_length=16), trace=True)
    m2(**batches(0)[0]).loss.backward()
    assert h2.stats["offloaded"] > 0


def test_eval_and_no_grad_do_nothing():
    m = model(layers=LAYERS)
    h = enable_activation_offload(m, cfg(), trace=True)
    with torch.no_grad():
        m(**batches(0)[0])
    m.eval()
    m(**batches(0)[0])
    assert h.trace == []


def test_remove_restores_plain_behaviour(plain):
    m = model(layers=LAYERS)
    h = enable_activation_offload(m, cfg(), trace=True)
    h.remove()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 2)
    assert h.trace == [] and same_params(plain, m)


def test_forward_error_leaves_no_hooks_behind():
    m = model(layers=LAYERS)
    h = enable_activation_offload(m, cfg(), trace=True)
    with pytest.raises(Exception):
        m(input_ids=torch.full((1, 4), 10_000))  # out of vocabulary: the embedding raises
    assert h._ctx is None
    m(**batches(0)[0]).loss.backward()  # a later step works
    assert h.stats["offloaded"] > 0


def test_bad_input():
    with pytest.raises(ValueError, match="activation_mode"):
        enable_activation_offload(model(), cfg(activation_mode="some"))
    with pytest.raises(ValueError, match="no list of decoder layers"):
        enable_activation_offload(torch.nn.Linear(2, 2), cfg())
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        enable_activation_offload(model(layers=1), cfg())
    stack, layers = find_decoder_layers(model())
    assert type(stack).__name__ == "LlamaModel" and len(layers) == 2


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


class _Stack(torch.nn.Module):
    """Checkpointing that wraps each layer's whole call (hooks inside the checkpoint), as older
    transformers and hand-written loops do."""

    def __init__(self, d=32, n=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, h):
        for layer in self.layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
        return h


def test_checkpoint_around_the_module_call():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    grads = []
    for offload in (False, True):
        torch.manual_seed(1)
        net = _Stack()
        h = enable_activation_offload(net, cfg(), trace=True) if offload else None
        net(x.clone()).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # Inputs of layers 1 and 2 are recognised between layers as the previous output; layer 0's
    # input (saved before any layer ran) and the last layer's stay.
    assert [e[1] for e in h.trace if e[0] == "offload"] == [1, 2]
    assert h.stats["prefetched"] == 2


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma"])
def test_other_families_bitwise(family):
    from tests.tiny import tiny_batch, tiny_model

    ms = []
    for offload in (False, True):
        m = tiny_model(family, layers=3)
        m.train()
        h = enable_activation_offload(m, cfg()) if offload else None
        m(**tiny_batch(seed=0)).loss.backward()
        ms.append(m)
    assert h.stats["offloaded"] == h.stats["prefetched"] > 0
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ms[0].parameters(), ms[1].parameters()) if a.grad is not None)


def _distinct_storages(h):
    """Wrap the pack hook to record the storage of every tensor it offloads (held, so no address
    is reused while counting): {(device, address): storage}, and how many tensors were offloaded."""
    from efft.offload.activations import _Kept

    seen, n = {}, [0]
    pack = h._pack

    def counting(t):
        obj = pack(t)
        if not isinstance(obj, _Kept):
            st = t.untyped_storage()
            seen[(t.device.type, t.device.index, st.data_ptr())] = st
            n[0] += 1
        return obj

    h._pack = counting
    return seen, n


def test_one_host_copy_per_storage():
    """Views saved from one storage (q/k/v's inputs from one norm output, o_proj's from the attention
    output) share one host copy: bytes offloaded == bytes of the distinct storages, still bitwise."""
    ref = model(layers=LAYERS)
    ref(**batches(0)[0]).loss.backward()
    m = model(layers=LAYERS)
    h = enable_activation_offload(m, cfg(), trace=True)
    seen, n = _distinct_storages(h)
    m(**batches(0)[0]).loss.backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ref.parameters(), m.parameters()))
    distinct = sum(st.nbytes() for st in seen.values())
    assert h.stats["offloaded_bytes"] == distinct > 0
    assert h.stats["offloaded"] == len(seen) == h.stats["prefetched"] and h.stats["fetched"] == 0
    assert h.stats["shared"] == n[0] - len(seen) > 0  # views that used to be copied once more each
    assert h.mover.bytes_to_host == h.mover.bytes_to_device == distinct
    assert h.pool.in_use_bytes == 0


class _Views(torch.nn.Module):
    """A layer that saves views of one storage in awkward ways: a part before the whole (two
    copies, neither larger than needed), parts of a whole already copied (shared), the same storage
    written in place between two saves (a new copy), and a new storage at a dead one's address."""

    def __init__(self, d, shape):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.shape = shape
        self.mem = bytearray(4 * d * shape[0] * shape[1])  # outside torch: one address, many storages
        self.reuse = True

    def forward(self, h):
        y = self.lin(h)  # (B, T, d)
        out = y[1].sin().sum() + y.cos().sum()  # part first (own copy), then the whole (new copy)
        out = out + y[0].sin().sum() + y[:, 2:].transpose(0, 1)[:, 1].sin().sum()  # parts of the whole: shared
        out = out + self.lin(h).sum()  # the layer input saved again (a new view of its storage): shared
        z = self.lin(h) * 1.5
        unused = z.sin()  # saves z at version 0; never needed in backward
        z.mul_(2)
        out = out + z.cos().sum() + unused.detach().sum()  # z at version 1: must not reuse the version-0 copy
        for i in range(2):  # a storage dies and a new one (other data, same address) is saved
            if self.reuse:
                torch.frombuffer(self.mem, dtype=torch.float32).fill_(i + 0.5)
                a = torch.frombuffer(self.mem, dtype=torch.float32).view(self.shape)
            else:  # the reference: fresh memory (saved by reference, the first values would be overwritten)
                a = torch.full(self.shape, i + 0.5)
            out = out + (h * a).sum()
            del a
        return h + out / 100


class _ViewStack(torch.nn.Module):
    def __init__(self, shape, n=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Views(shape[-1], shape) for _ in range(n))

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return h


def test_views_parts_versions_and_reused_addresses():
    B, T, d, f = 2, 5, 8, 4
    x = torch.randn(B, T, d)
    grads, handle = [], None
    for offload in (False, True):
        torch.manual_seed(1)
        net = _ViewStack((B, T, d))
        if offload:
            handle = enable_activation_offload(net, cfg(), trace=True)
        for layer in net.layers if not offload else net.layers[-1:]:  # the last layer's are saved by reference
            layer.reuse = False
        xg = x.clone().requires_grad_()
        net(xg).square().sum().backward()
        grads.append([p.grad for p in net.parameters()] + [xg.grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    h = handle
    # Copied per layer: the input, y[1], y, z before and after mul_, the two storages at one address;
    # shared: y[0], the strided slice of y, the input saved by the second and third lin calls.
    sizes = [e[2] for e in h.trace if e[0] == "offload" and e[1] == 0]
    assert sizes == [B * T * d * f, T * d * f, B * T * d * f] + [B * T * d * f] * 4
    assert [e[2] for e in h.trace if e[0] == "share" and e[1] == 0] == [T * d * f, 3 * d * f] + [B * T * d * f] * 2
    assert Counter(e[0] for e in h.trace if e[1] == 1) == Counter(e[0] for e in h.trace if e[1] == 0)
    # Each copy came back once, except z's version-0 copy (its only user was dropped in forward),
    # whose host buffer went back to the pool with it.
    assert h.stats["offloaded"] == h.stats["prefetched"] + h.stats["fetched"] + 2
    assert h.pool.in_use_bytes == 0


def test_inplace_after_save_uses_the_saved_values():
    """A saved tensor written in place before backward: plain autograd refuses (version counter);
    under offload (as before storage dedupe) backward gets the values as they were when saved,
    i.e. the gradients of the same code written out of place."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.inplace = True

        def forward(self, h):
            y = self.lin(h)
            s = y.sin()
            y = y.mul_(2) if self.inplace else y * 2
            return h + s + y.cos()

    class S(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(3))

        def forward(self, h):
            for layer in self.layers:
                h = layer(h)
            return h

    x = torch.randn(3, 4)
    torch.manual_seed(0)
    plain = S()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        plain(x).sum().backward()
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        net = S()
        for layer in net.layers:
            layer.inplace = offload and layer is not net.layers[-1]  # the last layer is not offloaded
        h = enable_activation_offload(net, cfg()) if offload else None
        net(x).sum().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert h.stats["offloaded"] > 0


@pytest.mark.parametrize("adapter", ["lora", "peqa"])
def test_quantized_base_bitwise_and_packed_weights_never_copied(adapter):
    """QLoRA / PEQA on an NF4 base: the adapter gradients are bitwise those without offload, and the
    packed 4-bit weights the quantized matmul saves for backward stay where they are (buffers)."""
    from efft.offload.activations import _Kept
    from efft.quant import quantize_model
    from efft.quant.peft import apply_lora
    from efft.quant.peqa import prepare_peqa
    from tests.tiny import tiny_model

    grads, copied = [], []
    for offload in (False, True):
        base = quantize_model(tiny_model("llama", layers=LAYERS), type="nf4", compute_dtype="float32")
        m = apply_lora(base, {"type": "lora", "r": 4, "lora_alpha": 8}) if adapter == "lora" else prepare_peqa(base)
        m.train()
        if offload:
            h = enable_activation_offload(m, cfg())
            pack = h._pack

            def recording(t, pack=pack):  # the dtype of every tensor given a host copy
                obj = pack(t)
                if not isinstance(obj, _Kept):
                    copied.append(t.dtype)
                return obj

            h._pack = recording
        m(**batches(0)[0]).loss.backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert grads[0] and all(torch.equal(a, b) for a, b in zip(*grads))
    assert h.stats["offloaded"] == h.stats["prefetched"] > 0
    assert copied and torch.uint8 not in copied


def test_deepcopy_of_an_offloaded_model_says_what_to_do():
    import copy

    from tests.tiny import tiny_model

    model = tiny_model("llama")
    off = enable_activation_offload(model, {"min_offload_bytes": 0})
    with pytest.raises(TypeError, match="copy the model before enabling it"):
        copy.deepcopy(model)
    off.remove()
    copy.deepcopy(model)  # without the hooks the model copies as usual
