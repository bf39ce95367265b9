"""Predicted weights / adapters / gradients / optimizer state equal the bytes of the real tensors."""
import math

import pytest
import torch

from efft.memory import estimate as est
from efft.memory.tracker import gradient_bytes, optimizer_state_bytes, weight_bytes
from tests.memory.harness import batch_for, build, recipe, tiny_block


def _step(model, r, cfg, opt):
    model(**batch_for(r, cfg)).loss.backward()
    grads = gradient_bytes(model)
    opt.step()
    return grads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_full_finetune_adamw_exact(family, dtype):
    rd = recipe(tiny_block(family), batch=1, seq=8, dtype=dtype)
    r, cfg, model = build(rd)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads = _step(model, r, cfg, opt)
    e = est.estimate(rd)
    w = weight_bytes(model)
    assert e.weights == w["total"]
    assert e.adapters == 0
    assert e.gradients == grads == w["trainable"]
    assert e.optimizer_state == optimizer_state_bytes(opt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_exact(targets, dtype):
    rd = recipe(tiny_block("qwen2"), batch=1, seq=8, dtype=dtype, adapter={"type": "lora", "r": 4, "target_modules": targets})
    r, cfg, model = build(rd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    grads = _step(model, r, cfg, opt)
    e = est.estimate(rd)
    w = weight_bytes(model)
    assert e.weights == w["frozen"] + w["buffers"]
    assert e.adapters == w["trainable"]  # peft keeps adapters in float32 on a bf16 base too
    assert e.gradients == grads
    assert e.optimizer_state == optimizer_state_bytes(opt)


def _lowrank_groups(model, extra):
    """2-D weights of the decoder Linear layers low-rank (never embeddings / LM head), the rest plain."""
    head = model.get_output_embeddings()
    low = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    ids = {id(p) for p in low}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": plain}, {"params": low, **extra}]


@pytest.mark.parametrize("name,projector", [("galore", "svd"), ("galore", "rsvd"), ("apollo", "random"),
                                            ("apollo", "svd"), ("apollo_mini", None), ("frugal", None),
                                            ("frugal", "random"), ("frugal", "svd")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projected_optimizers_exact(name, projector, dtype):
    """Through efft.optim's factory, as the training loop builds them (default projector when unset)."""
    from efft.optim.factory import build_optimizer

    optim = {"name": name, "rank": 8}
    if projector:
        optim["projector"] = projector
    rd = recipe(tiny_block("llama", inter=96), batch=1, seq=8, dtype=dtype, optim=optim)
    r, cfg, model = build(rd)
    opt = build_optimizer(model, r.optim, lr=1e-3)
    grads = _step(model, r, cfg, opt)
    e = est.estimate(rd)
    assert e.gradients == grads
    assert e.optimizer_state == optimizer_state_bytes(opt)
    assert e.weights == weight_bytes(model)["total"]


@pytest.mark.parametrize("optim", [{"name": "adamw8bit"}, {"name": "adamw", "state_bits": 8}, {"name": "adamw", "layerwise": True},
                                   {"name": "apollo_mini", "layerwise": True}])
def test_factory_adamw_variants_exact(optim):
    pytest.importorskip("bitsandbytes")
    from efft.optim.factory import build_optimizer

    rd = recipe(tiny_block("llama", hidden=64, inter=128), batch=1, seq=8, optim=optim)
    r, cfg, model = build(rd)
    opt = build_optimizer(model, r.optim, lr=1e-3)
    model(**batch_for(r, cfg)).loss.backward()
    opt.step()
    assert est.estimate(rd).optimizer_state == optimizer_state_bytes(opt)


def test_layerwise_peak_gradient_measured():
    """Layer-wise updates: the most gradient bytes alive at once during backward (sampled in a
    hook that runs before the optimizer's) is the largest parameter's, as predicted."""
    from efft.optim.factory import build_optimizer

    rd = recipe(tiny_block("llama"), batch=1, seq=8, optim={"name": "apollo_mini", "layerwise": True})
    r, cfg, model = build(rd)
    peak = [0]

    def sample(p):
        peak[0] = max(peak[0], gradient_bytes(model))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(sample)
    opt = build_optimizer(model, r.optim, lr=1e-3)
    model(**batch_for(r, cfg)).loss.backward()
    opt.step()
    assert gradient_bytes(model) == 0
    assert peak[0] == est.estimate(rd).gradients


def test_projected_state_is_smaller_than_adamw_by_the_formula():
    """GaLore m x n rank r: 2 r n moments + m x r basis (left side when m < n)."""
    o = est._recipe_from(recipe(tiny_block(), optim={"name": "galore", "rank": 4})).optim
    st, _ = est._lowrank_state((32, 96), 4, o, 4, "svd")
    assert st == 2 * 4 * (4 * 96) + 4 * 32 * 4
    st, _ = est._lowrank_state((96, 32), 4, o, 4, "svd")  # right side: m x r moments, r x n basis
    assert st == 2 * 4 * (96 * 4) + 4 * 4 * 32


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_quantized_base_weights_exact(qtype, double_quant):
    from efft.quant.convert import quantize_model

    rd = recipe(tiny_block("llama", hidden=80, inter=200), batch=1, seq=8,
                quant={"type": qtype, "double_quant": double_quant, "compute_dtype": "float32"},
                adapter={"type": "lora", "r": 4} if qtype == "nf4" else {"type": "none"})
    if qtype == "int8":
        rd["adapter"] = {"type": "lora", "r": 4}
    r = est._recipe_from(rd)
    from transformers import AutoModelForCausalLM

    cfg = est.resolve_config(r.model)
    model = AutoModelForCausalLM.from_config(cfg)
    quantize_model(model, r.quant)
    e = est.estimate(rd)
    # bitsandbytes' layout, tensor by tensor. (efft's nested absmax is a view of a buffer padded to
    # 256 entries, so its storage can be up to 255 bytes a layer larger: reported, not hidden.)
    logical = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert e.weights == logical
    n_quant = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear")
    assert 0 <= weight_bytes(model)["total"] - logical < 256 * n_quant


@pytest.mark.parametrize("optim", [{"name": "adamw"}, {"name": "apollo_mini", "layerwise": True}])
def test_int8_trainable_exact(optim):
    from efft.optim.factory import build_optimizer
    from efft.quant.trainable import prepare_int8_training

    rd = recipe(tiny_block("llama", hidden=64, inter=160), batch=1, seq=8, optim=optim,
                quant={"type": "int8", "trainable": True, "compute_dtype": "float32"})
    r = est._recipe_from(rd)
    from transformers import AutoModelForCausalLM

    cfg = est.resolve_config(r.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    prepare_int8_training(model, r.quant)
    model.train()
    opt = build_optimizer(model, r.optim, lr=1e-3)
    model(**batch_for(r, cfg)).loss.backward()
    grads = gradient_bytes(model)
    opt.step()
    e = est.estimate(rd)
    assert e.weights == weight_bytes(model)["total"]
    if not r.optim.layerwise:
        assert e.gradients == grads
    assert e.optimizer_state == optimizer_state_bytes(opt)


@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((33, 17), 64), ((128, 96), 128), ((300, 520), 64)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quant4_bytes_equal_bitsandbytes_storage(shape, blocksize, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(*shape)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    assert est.quant4_bytes(math.prod(shape), blocksize, double_quant) == measured


def test_int8_rowwise_bytes_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(48, 40, dtype=torch.float16)
    lin = bnb.nn.Linear8bitLt(40, 48, bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    cb, scb = lin.weight.data, lin.weight.SCB
    assert cb.dtype == torch.int8
    assert est.int8_rowwise_bytes(48, 40) == cb.numel() * cb.element_size() + scb.numel() * scb.element_size()


def test_optimizer_offload_moves_state_to_host():
    base = recipe(tiny_block("llama"), batch=1, seq=8)
    off = recipe(tiny_block("llama"), batch=1, seq=8, offload={"optimizer": True, "keep_small_params_on_device_bytes": 0})
    a, b = est.estimate(base), est.estimate(off)
    # every state on the host, plus a host copy and a gradient buffer of each parameter
    assert b.optimizer_state == 0 and b.host == a.optimizer_state + 2 * a.gradients > 0



def _assert_adapter_plan_exact(e, model, grads, opt):
    """A frozen base with trained extras (PaCA columns, PEQA scales): planned bytes == measured."""
    w = weight_bytes(model)
    assert e.adapters == w["trainable"]
    assert e.weights == w["frozen"] + w["buffers"]
    assert e.gradients == grads
    assert e.optimizer_state == optimizer_state_bytes(opt)

@pytest.mark.parametrize("cols", [{"fraction": 0.25}, {"r": 5}])
def test_partial_connections_exact(cols):
    from efft.sparsity import partial_modules

    rd = recipe(tiny_block("llama"), batch=1, seq=8, sparsity={"partial": {"enabled": True, **cols}})
    r, cfg, model = build(rd)  # installs PaCA from the recipe's sparsity section
    assert len(partial_modules(model)) == 14
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    grads = _step(model, r, cfg, opt)
    _assert_adapter_plan_exact(est.estimate(rd), model, grads, opt)


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_peqa_exact(qtype):
    from transformers import AutoModelForCausalLM

    from efft.quant.convert import quantize_model
    from efft.quant.peqa import prepare_peqa

    rd = recipe(tiny_block("llama", hidden=64, inter=192), batch=1, seq=8, quant={"type": qtype, "compute_dtype": "float32"},
                adapter={"type": "peqa"})
    r = est._recipe_from(rd)
    cfg = est.resolve_config(r.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    quantize_model(model, r.quant)
    prepare_peqa(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch_for(r, cfg)).loss.backward()
    grads = gradient_bytes(model)
    opt.step()
    _assert_adapter_plan_exact(est.estimate(rd), model, grads, opt)


@pytest.mark.parametrize("name", ["adamw", "apollo_mini"])
def test_optimizer_offload_host_bytes_exact(name):
    """efft.offload's optimizer: large parameters' states and buffers on the host (host == device on
    CPU, so its own host_bytes() report is the measurement), small ones on the device."""
    from efft.offload.optimizer import offload_optimizer
    from efft.optim.factory import build_optimizer

    rd = recipe(tiny_block("llama"), batch=1, seq=8, optim={"name": name},
                offload={"optimizer": True, "keep_small_params_on_device_bytes": 20000, "pin_memory": False})
    r, cfg, model = build(rd)
    opt = offload_optimizer(build_optimizer(model, r.optim, lr=1e-3), r.offload)
    model(**batch_for(r, cfg)).loss.backward()
    opt.step()
    e = est.estimate(rd)
    assert e.host == opt.host_bytes() > 0
    assert e.optimizer_state + (e.details["optimizer_state_total"] - e.optimizer_state) == optimizer_state_bytes(opt)
    assert 0 < e.optimizer_state < e.details["optimizer_state_total"]
