"""sparsity.recompute: exact (loss and every gradient equal the unpatched model's), composes with the
other efft features, and drops the normalized tensors and act(gate) from what a layer saves."""
import copy

import pytest
import torch
from torch import nn

from efft.config import RecipeError, SparsityConfig, validate
from efft.sparsity import (
    apply_loss_tokens, apply_sampled_linear, apply_sparsity, apply_token_elimination, sparsity_problems,
)
from efft.sparsity.recompute import apply_recompute, recompute_state, remove_recompute
from tests.sparsity.saved import layer_saved
from tests.tiny import tiny_batch, tiny_model

# loss and gradients, relative to the reference tensor's largest magnitude
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GATED = ["llama", "qwen2", "mistral", "gemma", "gemma2", "qwen3"]


def _step(model, batch, seed=0):
    """Loss and gradients of one training forward/backward (the global RNG reseeded: dropout, sampling)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, got, dtype=torch.float32):
    (l0, g0), (l1, g1) = ref, got
    tol = TOL[dtype]
    assert torch.isfinite(l0) and abs(float(l1) - float(l0)) <= tol * max(1.0, abs(float(l0))), (l0, l1)
    assert g0.keys() == g1.keys() and g0
    for n, a in g0.items():
        scale = a.float().abs().max().clamp_min(1e-12)
        err = (g1[n].float() - a.float()).abs().max() / scale
        assert err <= tol, f"{n}: relative error {float(err):.3g} > {tol}"


def _layers(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.transformer.h if hasattr(lm, "transformer") else lm.model.layers


def _layer_saved_bytes(model, batch, index=1):
    """Bytes autograd saves inside decoder layer ``index``'s forward (storages once, parameters excluded)."""
    with layer_saved(model, _layers(model)[index]) as seen:
        _step(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize("family", GATED + ["gpt2"])
def test_exact_full_finetuning(family):
    dense = tiny_model(family, layers=2)
    model = apply_recompute(copy.deepcopy(dense))
    st = recompute_state(model)
    n_norms = {"gemma2": 4, "qwen3": 4}.get(family, 2)  # gemma2: 4 per layer; qwen3: q_norm, k_norm too
    assert len(st.norms) == 2 * n_norms + 1  # + the final norm
    if family == "gpt2":  # ungated MLP: left alone, recorded
        assert not st.mlps and all("not gated" in st.skipped[f"transformer.h.{i}.mlp"] for i in range(2))
    else:
        assert len(st.mlps) == 2 and not st.skipped
    batch = tiny_batch(seq=24)
    _assert_same(_step(dense, batch), _step(model, batch))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_exact_bf16(family):
    dense = tiny_model(family, dtype=torch.bfloat16)
    model = apply_recompute(copy.deepcopy(dense))
    assert recompute_state(model).mlps
    batch = tiny_batch(seq=24)
    _assert_same(_step(dense, batch), _step(model, batch), torch.bfloat16)


def test_exact_under_bf16_autocast():
    """fp32 weights, bf16 autocast: backward recomputes under the forward's autocast state."""
    dense = tiny_model("llama")
    model = apply_recompute(copy.deepcopy(dense))
    batch = tiny_batch(seq=24)
    res = []
    for m in (dense, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res.append(_step(m, batch))
    _assert_same(*res, torch.bfloat16)
    _assert_same(*res, torch.float32)  # same ops in the same precision: equal, not merely close


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_exact_peft_lora(family):
    peft = pytest.importorskip("peft")
    dense = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model = apply_recompute(copy.deepcopy(dense))
    assert recompute_state(model).mlps and recompute_state(model).norms
    batch = tiny_batch(seq=24)
    ref, got = _step(dense, batch), _step(model, batch)
    assert all("lora_" in n for n in ref[1])
    _assert_same(ref, got)


@pytest.mark.parametrize("ckpt", [False, True])
def test_exact_with_gradient_checkpointing(ckpt):
    """Non-reentrant (transformers' default) and reentrant checkpointing of the decoder layers."""
    dense = tiny_model("qwen2")
    model = apply_recompute(copy.deepcopy(dense))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt})
    batch = tiny_batch(seq=24)
    _assert_same(_step(dense, batch), _step(model, batch))


@pytest.mark.parametrize("recompute_first", [True, False])
def test_with_loss_tokens_in_either_order(recompute_first):
    """Both wrappers stack: the last block's norm and MLP still run on label rows only, through the
    recompute forward, whichever was applied first."""
    dense = tiny_model("llama", layers=3)
    lt_only = apply_loss_tokens(copy.deepcopy(dense))
    model = copy.deepcopy(dense)
    if recompute_first:
        apply_loss_tokens(apply_recompute(model))
    else:
        apply_recompute(apply_loss_tokens(model))
    block = model._efft_loss_tokens.last_block
    assert {"post_attention_layernorm", "mlp"} <= set(block.modules)
    last = model.model.layers[-1]
    assert "forward" in last.mlp.__dict__ and type(last.mlp)._efft_recompute_kind == "mlp"
    assert type(last.post_attention_layernorm)._efft_recompute_kind == "norm"
    batch = tiny_batch(seq=24, label_fraction=0.3, seed=3)
    ref = _step(dense, batch)
    _assert_same(ref, _step(model, batch))
    _assert_same(ref, _step(lt_only, batch))
    assert {"post_attention_layernorm", "mlp"} <= block.ran  # ran on the label rows in that step
    # the last block drops the input norm's normalized tensor and rstd on every row, and on the
    # label rows only (R of them) those of the post-attention norm and silu(gate)
    saved, saved_lt = _layer_saved_bytes(model, batch, 2), _layer_saved_bytes(lt_only, batch, 2)
    T, h, I = 2 * 24, 64, 128
    R = block.rows.count
    assert 0 < R < T
    assert saved == saved_lt - (T * h * 4 + T * 4) - (R * h * 4 + R * 4) - R * I * 4


def test_with_token_elimination():
    cfg = dict(keep_ratio=0.5, start_layer=1)
    a = apply_token_elimination(tiny_model("mistral", layers=3), **cfg)
    b = apply_token_elimination(apply_recompute(tiny_model("mistral", layers=3)), **cfg)
    batch = tiny_batch(seq=32, label_fraction=0.3, seed=1)
    _assert_same(_step(a, batch), _step(b, batch))
    assert torch.equal(a._efft_token_elimination.last_kept[1], b._efft_token_elimination.last_kept[1])


@pytest.mark.parametrize("recompute_first", [True, False])
def test_with_sampled_linear_identical_samples(recompute_first):
    """Same seed: the same rows are sampled (down_proj's sampled input still comes from the product),
    so the WTA-CRS gradients equal those without recompute."""
    a = apply_sampled_linear(tiny_model("llama"), keep=0.3)
    b = tiny_model("llama")
    b = apply_sampled_linear(apply_recompute(b), keep=0.3) if recompute_first else apply_recompute(apply_sampled_linear(b, keep=0.3))
    batch = tiny_batch(seq=24)
    for step in range(2):  # the second step uses each layer's gradient-norm proxy from the first
        _assert_same(_step(a, batch, seed=step), _step(b, batch, seed=step))


def test_with_activation_offload():
    from efft.offload.activations import enable_activation_offload
    from tests.offload.helpers import cfg

    dense = tiny_model("llama", layers=3)
    model = apply_recompute(copy.deepcopy(dense))
    h = enable_activation_offload(model, cfg(), trace=True)
    batch = tiny_batch(seq=24)
    _assert_same(_step(dense, batch), _step(model, batch))
    assert h.stats["offloaded"] > 0 and h.stats["offloaded"] == h.stats["prefetched"] + h.stats["fetched"]


@pytest.mark.parametrize("sections", [
    {"quant": {"type": "nf4", "compute_dtype": "float32"}, "adapter": {"type": "lora", "r": 8}},
    {"quant": {"type": "nf4", "compute_dtype": "float32"}, "adapter": {"type": "peqa"}},
    {"quant": {"type": "int8", "trainable": True, "compute_dtype": "float32"}},
], ids=["qlora", "peqa", "int8-trainable"])
def test_exact_on_quantized_bases(sections):
    """Built by efft.compose.prepare_model from a recipe, with and without sparsity.recompute."""
    from tests.memory.harness import batch_for, build, recipe, tiny_block

    res = []
    for rc in (False, True):
        s = copy.deepcopy(sections)
        if rc:
            s["sparsity"] = {"recompute": {"enabled": True}}
        r, cfg, model = build(recipe(tiny_block("llama"), 2, 16, "sdpa", False, **s))
        if rc:
            assert recompute_state(model).mlps and recompute_state(model).norms
        res.append(_step(model, batch_for(r, cfg)))
    _assert_same(*res)


def test_saved_bytes_per_layer_drop_by_normalized_tensors_and_activation():
    """Full FT, fp32, llama: a layer saves exactly dense - 2 * (T*h*4 + T*4) - T*I*4 (two norms no
    longer keep the normalized tensor and rstd; the MLP no longer keeps silu(gate))."""
    dense = tiny_model("llama", layers=3, hidden=64)
    model = apply_recompute(copy.deepcopy(dense))
    batch = tiny_batch(seq=32)
    T, h, I = 2 * 32, 64, 128
    d, r = _layer_saved_bytes(dense, batch), _layer_saved_bytes(model, batch)
    print(f"llama layer 1 saved bytes: dense {d} recompute {r}")
    assert r == d - 2 * (T * h * 4 + T * 4) - T * I * 4


def test_saved_bytes_per_layer_gemma2_bf16_bound():
    """Gemma2 (four norms per layer), bf16: at least the four normalized tensors (kept in fp32 by
    Gemma's norm) and gelu(gate) are gone."""
    dense = tiny_model("gemma2", layers=3, hidden=64, dtype=torch.bfloat16)
    model = apply_recompute(copy.deepcopy(dense))
    batch = tiny_batch(seq=32)
    T, h, I = 2 * 32, 64, 128
    d, r = _layer_saved_bytes(dense, batch), _layer_saved_bytes(model, batch)
    assert r <= d - 4 * T * h * 4 - T * I * 2


def test_saved_bytes_per_layer_with_lora():
    """LoRA (norms frozen): the norms already keep no normalized tensor (only rstd goes); the MLP
    still drops silu(gate)."""
    peft = pytest.importorskip("peft")
    dense = peft.get_peft_model(tiny_model("llama", layers=3), peft.LoraConfig(r=4, target_modules="all-linear"))
    model = apply_recompute(copy.deepcopy(dense))
    batch = tiny_batch(seq=32)
    T, I = 2 * 32, 128
    d, r = _layer_saved_bytes(dense, batch), _layer_saved_bytes(model, batch)
    print(f"llama LoRA layer 1 saved bytes: dense {d} recompute {r}")
    assert r == d - 2 * T * 4 - T * I * 4


def test_norms_only_and_mlp_only():
    dense = tiny_model("llama", layers=3)
    batch = tiny_batch(seq=32)
    T, h, I = 2 * 32, 64, 128
    d = _layer_saved_bytes(dense, batch)
    only_norms = apply_recompute(copy.deepcopy(dense), gated_mlp=False)
    only_mlp = apply_recompute(copy.deepcopy(dense), norms=False)
    assert not recompute_state(only_norms).mlps and not recompute_state(only_mlp).norms
    assert _layer_saved_bytes(only_norms, batch) == d - 2 * (T * h * 4 + T * 4)
    assert _layer_saved_bytes(only_mlp, batch) == d - T * I * 4


def test_mlp_with_dropout_in_its_forward_is_left_alone():
    """An MLP that applies dropout in its own forward (transformers' SeedOss does, p=0.1) equals the
    recompute forward in eval but not in training: the train-mode probe catches it, the module keeps
    its forward (and its dropout), and the global RNG stream is untouched by the probe."""
    model = tiny_model("llama", layers=2)
    mlp = model.model.layers[1].mlp

    class Dropped(type(mlp)):
        def forward(self, x):
            y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return torch.nn.functional.dropout(y, p=0.1, training=self.training)

    mlp.__class__ = Dropped
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    apply_recompute(model)
    assert torch.equal(torch.rand(3), before)
    st = recompute_state(model)
    assert st.mlps == ["model.layers.0.mlp"] and "training mode" in st.skipped["model.layers.1.mlp"]
    assert type(model.model.layers[1].mlp) is Dropped


def test_mlp_whose_forward_differs_is_left_alone():
    """The apply-time probe compares with the module's own forward: an MLP computing something else
    with the same submodules keeps its forward, and the reason is recorded."""
    model = tiny_model("llama", layers=2)
    mlp = model.model.layers[0].mlp

    class Swapped(type(mlp)):  # act on up instead of gate: same modules, another function
        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    mlp.__class__ = Swapped
    dense = copy.deepcopy(model)
    apply_recompute(model)
    st = recompute_state(model)
    assert st.mlps == ["model.layers.1.mlp"] and "differs" in st.skipped["model.layers.0.mlp"]
    assert type(model.model.layers[0].mlp) is Swapped
    batch = tiny_batch(seq=16)
    _assert_same(_step(dense, batch), _step(model, batch))


def test_remove_restores_classes():
    dense = tiny_model("llama")
    model = apply_recompute(copy.deepcopy(dense))
    before = copy.deepcopy(recompute_state(model))
    assert recompute_state(apply_recompute(model)) == before  # applied twice: nothing patched twice
    swapped = [m for m in model.modules() if hasattr(type(m), "_efft_base_class")]
    assert len(swapped) == 7 and all(type(m).__base__ is type(m)._efft_base_class for m in swapped)  # one level deep
    remove_recompute(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in dense.modules()]
    assert recompute_state(model) is None


def test_nothing_to_patch_and_nothing_asked_raise():
    with pytest.raises(ValueError, match=r"nothing to recompute in GPT2LMHeadModel.*not gated"):
        apply_recompute(tiny_model("gpt2"), norms=False)
    with pytest.raises(ValueError, match="norms and/or gated_mlp"):
        apply_recompute(tiny_model("llama"), norms=False, gated_mlp=False)
    with pytest.raises(ValueError, match="sparsity.recompute: nothing to recompute"):
        apply_sparsity(tiny_model("gpt2"), SparsityConfig(recompute={"enabled": True, "norms": False}))


def test_bad_config_lists_every_problem_with_its_path():
    p = sparsity_problems({"recompute": {"enabled": True, "norms": "yes", "gated_mlp": 3}})
    assert [k for k, _ in p] == ["sparsity.recompute.norms", "sparsity.recompute.gated_mlp"]
    p = sparsity_problems(SparsityConfig(recompute={"enabled": True, "norms": False, "gated_mlp": False}))
    assert [k for k, _ in p] == ["sparsity.recompute"] and "nothing to recompute" in p[0][1]
    with pytest.raises(ValueError, match=r"1 problem in the sparsity section:\n  - sparsity.recompute: enabled"):
        apply_sparsity(tiny_model("llama"), SparsityConfig(recompute={"enabled": True, "norms": False, "gated_mlp": False}))
    with pytest.raises(RecipeError) as e:
        validate({"model": {"builtin": "tiny-llama"}, "data": {"path": "-"},
                  "sparsity": {"recompute": {"enabled": True, "norms": "maybe", "gated_mlp": [1], "extra": 1}}})
    msg = str(e.value)
    assert all(k in msg for k in ("sparsity.recompute.norms", "sparsity.recompute.gated_mlp", "sparsity.recompute.extra")), msg


def test_apply_sparsity_composes_everything_in_a_fixed_order():
    """recompute + loss_tokens + token_elimination + sampled_linear from one section; the same
    sampled rows as without recompute, so identical gradients."""
    on = SparsityConfig(loss_tokens={"enabled": True}, token_elimination={"enabled": True, "keep_ratio": 0.5},
                        sampled_linear={"enabled": True, "keep": 0.5}, recompute={"enabled": True})
    off = on.model_copy(update={"recompute": SparsityConfig().recompute})
    a = apply_sparsity(tiny_model("llama", layers=3), off)
    b = apply_sparsity(tiny_model("llama", layers=3), on)
    assert recompute_state(b).mlps and recompute_state(a) is None
    batch = tiny_batch(seq=32, label_fraction=0.4, seed=5)
    _assert_same(_step(a, batch), _step(b, batch))


def test_efft_train_recipe_smoke(data_path, tmp_path):
    """``efft train`` path: the recipe's sparsity.recompute reaches the model through efft.compose,
    the run trains and the card carries the memory report."""
    from efft.train import train
    from tests.test_train import recipe as train_recipe

    r = train_recipe(data_path, tmp_path / "rc", max_steps=3, save_steps=100)
    d = r.model_dump()
    d["sparsity"] = {"recompute": {"enabled": True}, "loss_tokens": {"enabled": True}}
    r = validate(d)
    seen = {}
    card = train(r, trainer_hook=lambda tr: seen.update(state=recompute_state(tr.model)))
    assert seen["state"] is not None and len(seen["state"].mlps) == 2 and len(seen["state"].norms) == 5
    assert card["global_step"] == 3 and all(torch.isfinite(torch.tensor(l)) for _, l in card["loss_curve"])
    assert card["memory"] and card["recipe"]["sparsity"]["recompute"]["enabled"] is True


def test_live_bytes_after_forward_drop_by_the_same_amount():
    """Not only what saved-tensor hooks see: every tensor still alive after the forward (graph and
    ctx attributes included, counted by a dispatch mode) drops by the normalized tensors, rstd and
    silu(gate) of every layer, and the final norm's."""
    from efft.memory.tracker import LiveTensorBytes

    dense = tiny_model("llama", layers=3, hidden=64)
    model = apply_recompute(copy.deepcopy(dense))
    batch = tiny_batch(seq=32)
    live = []
    for m in (dense, model):
        m.train()
        with LiveTensorBytes() as c:
            loss = m(**batch).loss
            c._sweep()
            live.append(c.current_bytes)
        del loss
    T, h, I = 2 * 32, 64, 128
    assert live[0] - live[1] == 3 * (2 * (T * h * 4 + T * 4) + T * I * 4) + (T * h * 4 + T * 4)


def test_recompute_fn_reenters_the_forwards_autocast_state():
    """A forward with an autocast op (a linear): backward recomputes it in bf16 as forward did; without
    the autocast state it would recompute in fp32 and the gradients would differ."""
    from efft.sparsity.recompute import RecomputeFn, _autocast_state

    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    x = torch.randn(4, 32, requires_grad=True)
    res = []
    for patched in (False, True):
        lin.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = RecomputeFn.apply(lin.forward, _autocast_state("cpu"), xi, lin.weight, lin.bias) if patched else lin(xi)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        res.append((xi.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_efft_validate_and_train_refuse_bad_recompute_sections(data_path, tmp_path, capsys):
    """``efft validate`` lists every bad recompute value with its path; ``efft train`` on a model with
    nothing to patch stops with the reason before any training step."""
    import yaml

    from efft.cli import main
    from efft.train import train
    from tests.test_train import recipe as train_recipe

    d = train_recipe(data_path, tmp_path / "bad", max_steps=1).model_dump(mode="json")
    d["sparsity"] = {"recompute": {"enabled": True, "norms": False, "gated_mlp": False}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 2
    assert "sparsity.recompute: enabled with norms and gated_mlp both false" in capsys.readouterr().err

    d["model"] = {"config": {"model_type": "gpt2", "vocab_size": 320, "n_embd": 32, "n_layer": 2, "n_head": 4}}
    d["sparsity"] = {"recompute": {"enabled": True, "norms": False}}
    steps = []
    with pytest.raises(ValueError, match=r"sparsity.recompute: nothing to recompute in GPT2LMHeadModel.*GPT2MLP is not gated"):
        train(validate(d), trainer_hook=lambda tr: steps.append(tr))
    assert not steps  # refused while preparing the model, before a Trainer exists


def test_patched_model_pickles(tmp_path):
    """torch.save(model) / torch.load of a whole recompute-patched model: the swapped classes come
    back swapped (they share their base's name, so they are rebuilt rather than found by name) and
    the loaded model computes the same loss and gradients."""
    model = apply_recompute(tiny_model("llama", layers=2))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert getattr(type(loaded.model.layers[0].mlp), "_efft_recompute_kind", None) == "mlp"
    assert getattr(type(loaded.model.norm), "_efft_recompute_kind", None) == "norm"
    batch = tiny_batch(seq=16)
    _assert_same(_step(model, batch), _step(loaded, batch))
