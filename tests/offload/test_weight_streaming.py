"""Weight streaming (offload.weights): the int8 decoder layers' master copy is in host memory and a
layer is on the device only around its forward and its backward. On CPU the device copies are real
copies, so schedule, byte counts and results are checked here; the references are the same training
without streaming (bitwise) and hand-written schedules."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from efft.config import OptimConfig
from efft.offload.weights import enable_weight_streaming
from efft.optim.factory import build_optimizer
from efft.quant.trainable import (Int8LayerwiseOptimizer, Int8TrainableLinear, load_int8_checkpoint,
                                  save_int8_checkpoint)
from tests.quantized_ft.helpers import assert_same_state, batches, int8_model, int8_state, train_steps
from tests.threads import one_thread  # noqa: F401  (autouse)


def _model(layers=3, ckpt=None, seed=0):
    m = int8_model(seed=seed, layers=layers)
    if ckpt is not None:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"})
    m.train()
    return m


def _layerwise(model, accumulate=1):
    """The recipe path: efft's factory, APOLLO-Mini updated layer-wise inside backward."""
    return build_optimizer(model, OptimConfig(name="apollo_mini", layerwise=True), lr=2e-3,
                           gradient_accumulation_steps=accumulate, max_grad_norm=0.0)


def _write_backs(model):
    return [int(m.sr_state[1]) for m in model.modules() if isinstance(m, Int8TrainableLinear)]


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("ckpt", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_streamed_training_is_bitwise_the_same(prefetch, ckpt, accumulate):
    # 4 micro-batches: with accumulation 3 the second step is a short cycle, applied in step()
    data = batches(4)
    ref = _model(ckpt=ckpt)
    ref_losses = train_steps(ref, _layerwise(ref, accumulate), data, accumulate)
    m = _model(ckpt=ckpt)
    s = enable_weight_streaming(m, prefetch_layers=prefetch)
    losses = train_steps(m, _layerwise(m, accumulate), data, accumulate)
    assert losses == ref_losses
    assert_same_state(ref, m)
    steps = -(-len(data) // accumulate)
    assert set(_write_backs(m)) == {steps}  # every layer was updated at every step
    assert s.stats["write_backs"] == 3 * steps
    assert s.stats["step_updates"] == (21 if accumulate == 3 else 0)  # the short cycle: 7 linears x 3 layers
    assert s.resident_layers() == [] and s.resident_bytes == 0


def test_int8_layerwise_optimizer_with_accumulation_is_bitwise_the_same():
    data = batches(5)
    ref = _model(ckpt="non-reentrant")
    opt = Int8LayerwiseOptimizer(torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2),
                                 gradient_accumulation_steps=2)
    ref_losses = train_steps(ref, opt, data, 2)
    m = _model(ckpt="non-reentrant")
    s = enable_weight_streaming(m, prefetch_layers=2)
    opt = Int8LayerwiseOptimizer(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2),
                                 gradient_accumulation_steps=2)
    assert train_steps(m, opt, data, 2) == ref_losses
    assert_same_state(ref, m)
    assert set(_write_backs(m)) == {3} and s.stats["step_updates"] == 21


def test_with_activation_offload_too():
    from efft.config import OffloadConfig
    from efft.offload.activations import enable_activation_offload

    data = batches(3)
    ref = _model()
    ref_losses = train_steps(ref, _layerwise(ref), data)
    m = _model()
    cfg = OffloadConfig(activations=True, weights=True, min_offload_bytes=0)
    acts = enable_activation_offload(m, cfg)
    enable_weight_streaming(m, cfg)
    assert train_steps(m, _layerwise(m), data) == ref_losses
    assert_same_state(ref, m)
    assert acts.stats["offloaded"] > 0


class _Checkpointed(torch.nn.Module):
    """Runs a layer's whole call (its module hooks included) under non-reentrant checkpointing, as
    hand-written training code does: the streamer's hooks then fire again in backward's recompute."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def test_hooks_inside_a_checkpoint_recompute_in_backward():
    data = batches(3)
    models = []
    for stream in (False, True):
        m = _model()
        m.config.use_cache = False  # a recompute must not append to a KV cache a second time
        inner = torch.nn.ModuleList(list(m.model.layers))
        m.model.layers = torch.nn.ModuleList(_Checkpointed(layer) for layer in inner)
        s = enable_weight_streaming(m, layers=inner, trace=True) if stream else None
        models.append((m, train_steps(m, _layerwise(m), data), s))
    (ref, ref_losses, _), (m, losses, s) = models
    assert losses == ref_losses
    assert_same_state(ref, m)
    assert [i for e, i in s.trace if e == "resident"] == [0, 1, 2, 2, 1, 0] * 3
    assert s.peak_resident_bytes == 2 * s.layer_bytes[0]


# ----------------------------------------------------------------------------------- schedule
FORWARD = {
    1: [("fetch", 0), ("resident", 0), ("prefetch", 1), ("release", 0),
        ("resident", 1), ("prefetch", 2), ("release", 1),
        ("resident", 2), ("release", 2)],
    2: [("fetch", 0), ("resident", 0), ("prefetch", 1), ("prefetch", 2), ("release", 0),
        ("resident", 1), ("release", 1),
        ("resident", 2), ("release", 2)],
}
BACKWARD = {  # with updates (the last micro-batch of a step); an accumulating one has no write_back
    1: [("fetch", 2), ("resident", 2), ("prefetch", 1),
        ("write_back", 2), ("release", 2), ("resident", 1), ("prefetch", 0),
        ("write_back", 1), ("release", 1), ("resident", 0),
        ("write_back", 0), ("release", 0)],
    2: [("fetch", 2), ("resident", 2), ("prefetch", 1), ("prefetch", 0),
        ("write_back", 2), ("release", 2), ("resident", 1),
        ("write_back", 1), ("release", 1), ("resident", 0),
        ("write_back", 0), ("release", 0)],
}


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("ckpt", [None, "non-reentrant"])
def test_schedule_forward_in_order_then_backward_in_reverse(prefetch, ckpt, monkeypatch):
    """The streamer's trace equals the hand-written schedule, and every read of a layer's int8 weight
    (forward, recomputation, backward, the update) happens while that layer is resident, on its device
    copy, in the order forward 0, 1, 2 then backward 2, 1, 0."""
    m = _model(ckpt=ckpt)
    s = enable_weight_streaming(m, prefetch_layers=prefetch, trace=True)
    layer_of = {id(mod): i for i, layer in enumerate(m.model.layers) for mod in layer.modules()}
    masters = {id(d["weight_codes"]) for per_layer in s.masters for d in per_layer}
    reads = []
    original = Int8TrainableLinear.dequantize

    def dequantize(self, *a, **kw):
        i = layer_of[id(self)]
        assert id(self.weight_codes) not in masters, f"layer {i} read from its host master"
        assert i in s._installed, f"layer {i} read while not resident"
        if not reads or reads[-1] != i:
            reads.append(i)
        return original(self, *a, **kw)

    monkeypatch.setattr(Int8TrainableLinear, "dequantize", dequantize)
    opt = _layerwise(m, accumulate=2)
    data = batches(2)
    m(**data[0]).loss.div(2).backward()  # accumulates: nothing written back
    first = list(s.trace)
    m(**data[1]).loss.div(2).backward()  # the update, inside backward
    second = s.trace[len(first):]
    opt.step()
    assert len(s.trace) == len(first) + len(second)  # nothing left for step()
    no_updates = [e for e in BACKWARD[prefetch] if e[0] != "write_back"]
    assert first == FORWARD[prefetch] + no_updates
    assert second == FORWARD[prefetch] + BACKWARD[prefetch]
    assert reads == [0, 1, 2, 1, 0, 1, 2, 1, 0]  # consecutive reads of one layer counted once


def test_short_accumulation_cycle_is_applied_one_resident_layer_at_a_time():
    m = _model()
    s = enable_weight_streaming(m, trace=True)
    opt = _layerwise(m, accumulate=2)
    m(**batches(1)[0]).loss.div(2).backward()
    n = len(s.trace)
    opt.step()  # the cycle ends after one micro-batch: step() applies it
    assert s.trace[n:] == [("fetch", 2), ("resident", 2), ("write_back", 2), ("release", 2),
                           ("fetch", 1), ("resident", 1), ("write_back", 1), ("release", 1),
                           ("fetch", 0), ("resident", 0), ("write_back", 0), ("release", 0)]
    assert set(_write_backs(m)) == {1}


def test_whole_model_step_is_refused_and_changes_nothing():
    m = _model(layers=2)
    enable_weight_streaming(m)
    before = int8_state(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(**batches(1)[0]).loss.backward()
    with pytest.raises(RuntimeError, match=r"AdamW.step\(\) would update 14 int8 weights .*optim.layerwise: true"):
        opt.step()
    after = int8_state(m)
    assert all(torch.equal(x, y) for k in before for x, y in zip(before[k], after[k]))


# ------------------------------------------------------------------------------------ memory
class _LiveInt8(TorchDispatchMode):
    """Every int8 tensor created while active (host masters excluded), held weakly: live bytes by storage."""

    def __init__(self, exclude: set):
        super().__init__()
        self.exclude, self.refs = exclude, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.int8 and t.untyped_storage().data_ptr() not in self.exclude:
                self.refs.append(weakref.ref(t))
        return out

    def live_bytes(self) -> int:
        alive = {}
        for r in self.refs:
            t = r()
            if t is not None:
                alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(alive.values())


@pytest.mark.parametrize("prefetch", [1, 2])
def test_device_never_holds_more_than_one_plus_prefetch_layers(prefetch, monkeypatch):
    m = _model(layers=4, ckpt="non-reentrant")
    s = enable_weight_streaming(m, prefetch_layers=prefetch)
    codes_per_layer = sum(mod.weight_codes.numel() for mod in m.model.layers[0].modules()
                          if isinstance(mod, Int8TrainableLinear))
    masters = {d[n].untyped_storage().data_ptr() for per_layer in s.masters for d in per_layer for n in d}
    live = _LiveInt8(masters)
    samples = []
    original = Int8TrainableLinear.dequantize

    def dequantize(self, *a, **kw):  # sampled at every read of a weight: forward, recompute, backward, update
        samples.append(live.live_bytes())
        return original(self, *a, **kw)

    monkeypatch.setattr(Int8TrainableLinear, "dequantize", dequantize)
    opt = _layerwise(m)
    with live:
        train_steps(m, opt, batches(2))
    # the int8 codes really alive (independent of the streamer's bookkeeping), and the streamer's count
    # of codes + scales + rounding state
    assert max(samples) == (1 + prefetch) * codes_per_layer
    assert s.peak_resident_bytes == (1 + prefetch) * s.layer_bytes[0]
    assert live.live_bytes() == 0 and s.resident_bytes == 0
    host = sum(t.numel() * t.element_size() for per_layer in s.masters for d in per_layer for t in d.values())
    assert s.host_bytes() == host == 4 * s.layer_bytes[0]


def test_masters_stay_in_host_memory_when_the_model_moves():
    m = _model(layers=2)
    s = enable_weight_streaming(m)
    q, norm = m.model.layers[0].self_attn.q_proj, m.model.layers[0].input_layernorm
    before = {n: getattr(q, n) for n in ("weight_codes", "weight_scale", "sr_state")}
    norm_ptr, bias_ptr = norm.weight.data_ptr(), m.model.rotary_emb.inv_freq.data_ptr()
    m._apply(lambda t: t.clone())  # what .to("cuda") does, on a CPU-only machine: every tensor gets new memory
    assert all(getattr(q, n) is t for n, t in before.items())  # but the host masters stay
    assert s.masters[0][0]["weight_codes"] is before["weight_codes"]
    assert norm.weight.data_ptr() != norm_ptr and m.model.rotary_emb.inv_freq.data_ptr() != bias_ptr


def test_eval_and_generation_stream_too():
    ref, m = _model(), _model()
    s = enable_weight_streaming(m, trace=True)
    ref.eval()
    m.eval()
    ids = batches(1)[0]["input_ids"][:1, :6]
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
    out = m.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=4, do_sample=False))
    # the logits pass, then generate: the prompt (first new token) and one pass for each of the 3 others
    assert [i for e, i in s.trace if e == "resident"] == [0, 1, 2] * 5
    assert s.resident_bytes == 0 and "write_back" not in {e for e, _ in s.trace}


# ------------------------------------------------------------------------------------ resume
def test_save_and_resume_continue_exactly(tmp_path):
    data = batches(4)
    ref = _model()
    train_steps(ref, _layerwise(ref), data)

    m = _model()
    enable_weight_streaming(m)
    opt = _layerwise(m)
    train_steps(m, opt, data[:2])
    save_int8_checkpoint(m, tmp_path / "int8.safetensors")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    resumed = _model(seed=1)  # other initial weights: everything comes from the files
    enable_weight_streaming(resumed)
    load_int8_checkpoint(resumed, tmp_path / "int8.safetensors")
    opt = _layerwise(resumed)
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train_steps(resumed, opt, data[2:])
    assert_same_state(ref, resumed)


def test_remove_puts_the_weights_back_and_training_goes_on():
    from efft.memory.tracker import weight_bytes

    data = batches(4)
    ref = _model()
    train_steps(ref, _layerwise(ref), data)
    m = _model()
    s = enable_weight_streaming(m)
    opt = _layerwise(m)
    train_steps(m, opt, data[:2])
    s.remove()
    assert weight_bytes(m)["host"] == 0 and s.host_bytes() == 0 and not hasattr(m, "_efft_weight_stream")
    assert all(not mod._host_buffers for mod in m.modules() if isinstance(mod, Int8TrainableLinear))
    train_steps(m, opt, data[2:])
    assert_same_state(ref, m)
    assert s.stats["fetched"] == 4  # nothing streamed after remove(): 2 steps x (forward + backward)


# ------------------------------------------------------------------------------------ planner
@pytest.mark.parametrize("prefetch", [1, 2])
def test_planner_predicts_the_streamed_weights_exactly(prefetch):
    from efft.memory import estimate as est
    from efft.memory.tracker import weight_bytes
    from tests.memory.harness import batch_for, build, recipe, tiny_block

    rd = recipe(tiny_block("llama", hidden=64, inter=160, layers=3), batch=1, seq=8,
                optim={"name": "apollo_mini", "layerwise": True},
                quant={"type": "int8", "trainable": True, "compute_dtype": "float32"},
                offload={"weights": True, "weights_prefetch_layers": prefetch})
    r, cfg, model = build(rd)  # compose.prepare_model: int8 layers, then streaming
    s = model._efft_weight_stream
    opt = build_optimizer(model, r.optim, lr=1e-3)
    model(**batch_for(r, cfg)).loss.backward()
    opt.step()
    e = est.estimate(rd)
    w = weight_bytes(model)  # the host masters are not device weights
    assert e.weights == w["total"] + s.peak_resident_bytes
    assert e.host == w["host"] == s.host_bytes() > 0
    assert e.details["streamed_layer_bytes"] == s.layer_bytes[0]


def test_planner_offers_streaming_to_a_layerwise_int8_recipe():
    from efft.memory import estimate as est
    from tests.memory.harness import recipe, tiny_block

    q = {"type": "int8", "trainable": True, "compute_dtype": "float32"}
    layerwise = est._recipe_from(recipe(tiny_block(), quant=q, optim={"name": "apollo_mini", "layerwise": True}))
    whole = est._recipe_from(recipe(tiny_block(), quant=q, optim={"name": "apollo_mini"}))
    offered = lambda r: [ch for _, _, ch in est._candidates(r) if ("offload.weights", True) in ch]  # noqa: E731
    assert offered(layerwise) == [[("offload.weights", True)]]
    assert offered(whole) == []  # refused without layer-wise updates: not offered


# ------------------------------------------------------------------------------------ recipes
TINY = {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


def _recipe_dict(data_path, out, **sections):
    d = {"model": {"config": TINY}, "data": {"path": str(data_path), "max_seq_length": 48},
         "train": {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                   "logging_steps": 1, "save_steps": 2, "seed": 3, "lr_scheduler_type": "constant",
                   "gradient_accumulation_steps": 2, "gradient_checkpointing": True},
         "quant": {"type": "int8", "trainable": True, "compute_dtype": "float32"},
         "optim": {"name": "apollo_mini", "layerwise": True}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return d


@pytest.mark.parametrize("sections,words", [
    ({"quant": {"type": "none", "trainable": False}, "optim": {"name": "adamw", "layerwise": True}},
     "set quant.type: int8 and quant.trainable: true"),
    ({"optim": {"name": "apollo_mini", "layerwise": False}}, "needs optim.layerwise: true"),
])
def test_bad_combinations_are_refused_before_training(sections, words, tmp_path, capsys):
    import yaml

    from efft import cli, config
    from efft.compose import recipe_problems

    d = _recipe_dict(tmp_path / "missing.jsonl", tmp_path / "out", offload={"weights": True}, **sections)
    r = config.validate(d, source="(test)", files=False)
    problems = recipe_problems(r)
    assert [p for p, _ in problems] == ["offload.weights"] and words in problems[0][1]
    fine = config.validate(_recipe_dict(tmp_path / "x.jsonl", tmp_path / "out", **sections), source="(test)", files=False)
    assert recipe_problems(fine) == []  # the same recipe without streaming is fine
    path = tmp_path / "bad.yaml"
    d["data"]["path"] = str(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path.write_text(yaml.safe_dump(d))
    assert cli.main(["train", str(path)]) == cli.EXIT_BAD_RECIPE
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_prefetch_layers_is_one_or_two(tmp_path):
    from efft import config

    with pytest.raises(config.RecipeError, match="weights_prefetch_layers"):
        config.validate(_recipe_dict(tmp_path, tmp_path, offload={"weights": True, "weights_prefetch_layers": 3}),
                        source="(test)", files=False)


def test_efft_train_streams_and_resumes_to_the_unstreamed_result(data_path, tmp_path):
    """`efft train` with offload.weights: interrupted after 2 of 6 steps and resumed from its checkpoint,
    it ends bitwise where the same recipe without streaming ends (gradient accumulation 2, checkpointing;
    36 examples in batches of 4 make step 5 a one-micro-batch cycle, applied in step())."""
    import json

    import yaml
    from safetensors.torch import load_file

    from efft import cli, config
    from efft.train import train

    ref = train(config.validate(_recipe_dict(data_path, tmp_path / "ref"), source="(test)"))
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(data_path, tmp_path / "stream", offload={"weights": True})))
    assert cli.main(["train", str(path), "max_steps=2"]) == 0
    assert cli.main(["train", str(path), "train.resume_from_checkpoint=true"]) == 0
    card = json.loads((tmp_path / "stream" / "card.json").read_text())
    assert card["global_step"] == 6 and card["steps_this_run"] == 4
    assert [l for _, l in card["loss_curve"]] == [l for _, l in ref["loss_curve"]]
    assert card["memory"]["weights_host_bytes"] > 0 and card["memory"]["host_offload_bytes"] >= card["memory"]["weights_host_bytes"]
    a = load_file(tmp_path / "ref" / "final" / "int8" / "model.safetensors")
    b = load_file(tmp_path / "stream" / "final" / "int8" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("weight_codes") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
