"""build_optimizer: param groups from a model (plain, partly frozen, peft), every recipe name,
the pydantic OptimConfig; and a short run per optimizer whose loss must fall well below its start."""
import pytest
import torch

from efft.config import OptimConfig
from efft.optim import APOLLOAdamW, FRUGAL, GaLoreAdamW, LayerwiseOptimizer, build_optimizer
from efft.optim.factory import lowrank_parameter_names

from .helpers import batch, model
from .test_layerwise import cfg

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _build(m, name, **kw):
    return build_optimizer(m, cfg(name, **kw), lr=1e-3, weight_decay=0.1)


def test_groups_lowrank_linears_plain_rest():
    m = model()
    opt = _build(m, "galore")
    names = {id(p): n for n, p in m.named_parameters()}
    low = [g for g in opt.param_groups if "rank" in g]
    assert len(low) == 1
    low_names = {names[id(p)] for p in low[0]["params"]}
    assert {n.split(".")[-2] for n in low_names} == LINEARS and len(low_names) == 14
    plain = {names[id(p)]: g["weight_decay"] for g in opt.param_groups if "rank" not in g for p in g["params"]}
    assert plain["model.embed_tokens.weight"] == 0.1 and plain["lm_head.weight"] == 0.1
    assert plain["model.norm.weight"] == 0.0  # norms and biases do not decay (Trainer's rule)
    assert low[0]["weight_decay"] == 0.1 and low[0]["rank"] == 4 and low[0]["scale"] == 0.25
    assert len(low_names) + len(plain) == len(list(m.parameters()))


def test_target_exclude_and_frozen():
    m = model()
    m.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    names = lowrank_parameter_names(m, ["q_proj", "v_proj"], ["layers.1"])
    assert names == {"model.layers.0.self_attn.v_proj.weight"}
    opt = _build(m, "apollo", target_modules=["attn"])
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert m.model.layers[0].self_attn.q_proj.weight not in set(all_params)
    assert len(all_params) == len([p for p in m.parameters() if p.requires_grad])


def test_peft_model_adapters_are_plain():
    peft = pytest.importorskip("peft")
    m = peft.get_peft_model(model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt = _build(m, "galore")
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable) == 8
    assert not any("rank" in g for g in opt.param_groups)  # LoRA matrices are low-rank already


@pytest.mark.parametrize("name,cls", [("galore", GaLoreAdamW), ("apollo", APOLLOAdamW), ("apollo_mini", APOLLOAdamW), ("frugal", FRUGAL)])
def test_names_from_pydantic_config(name, cls):
    m = model()
    opt = build_optimizer(m, OptimConfig(name=name, rank=4), lr=1e-3, weight_decay=0.0)
    assert type(opt) is cls
    low = next(g for g in opt.param_groups if "rank" in g)
    if name == "apollo_mini":
        assert (low["rank"], low["scale_type"], low["scale"], low["proj"]) == (1, "tensor", 128.0, "random")
    if name == "apollo":
        assert (low["scale_type"], low["proj"], low["scale"]) == ("channel", "random", 1.0)
    if name == "frugal":
        assert (low["projector"], low["density"], low["state_free_lr_scale"]) == ("block", 0.25, 0.1)
    assert opt.stagger_refresh
    lw = build_optimizer(m, OptimConfig(name=name, rank=4, layerwise=True), lr=1e-3, gradient_accumulation_steps=2)
    assert isinstance(lw, LayerwiseOptimizer) and lw.gradient_accumulation_steps == 2
    lw.remove_hooks()


def test_adamw_names():
    m = model()
    assert type(build_optimizer(m, OptimConfig(name="adamw"), lr=1e-3)) is torch.optim.AdamW
    bnb = pytest.importorskip("bitsandbytes")
    assert isinstance(build_optimizer(m, OptimConfig(name="adamw8bit"), lr=1e-3), bnb.optim.AdamW8bit)


def test_bad_config_values_name_the_field():
    m = model()
    with pytest.raises(ValueError, match="name"):
        _build(m, "sgd")
    with pytest.raises(ValueError, match="projector"):
        _build(m, "galore", projector="block")
    with pytest.raises(ValueError, match="rank"):
        _build(m, "galore", rank=0)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "galore", "apollo", "apollo_mini", "frugal"])
def test_loss_falls_well_below_start(name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    m = model(hidden=64)
    opt = build_optimizer(m, cfg(name, rank=8, update_proj_gap=10), lr=1e-2 if name != "apollo_mini" else 5e-3)
    fixed = batch(0, size=4, seq=16)
    losses = []
    for _ in range(40):
        loss = m(**fixed).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize("name", ["galore", "apollo", "apollo_mini", "frugal"])
def test_selectable_through_trainer_plugin(name):
    """A recipe's optim section reaches Trainer: optimizer and its callbacks (lead's plugin)."""
    integ = pytest.importorskip("efft.integrations.transformers")
    m = model()
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", gradient_accumulation_steps=2,
                             max_grad_norm=0.5)
    plain = integ.EfftPlugin({"optim": {"name": name, "rank": 4}}).trainer_kwargs(m, args)["optimizers"][0]
    assert isinstance(plain, (GaLoreAdamW, APOLLOAdamW, FRUGAL))
    kw = integ.EfftPlugin({"optim": {"name": name, "rank": 4, "layerwise": True}}).trainer_kwargs(m, args)
    opt = kw["optimizers"][0]
    assert isinstance(opt, LayerwiseOptimizer) and (opt.gradient_accumulation_steps, opt.max_grad_norm) == (2, 0.5)
    assert any(type(c).__name__ == "LayerwiseCallback" for c in kw["callbacks"])
    opt.remove_hooks()
