"""Quantized bases compose with efft's optimizers: QLoRA and PEQA train under build_optimizer, the
frozen codes never change, and what each optimizer does to the adapter is checked against an
independent optimizer."""
import importlib
from types import SimpleNamespace

import pytest
import torch

optim = pytest.importorskip("efft.optim")

from efft.quant import quantize_model  # noqa: E402
from efft.quant.peft import apply_lora  # noqa: E402
from efft.quant.peqa import prepare_peqa  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402


def _train(model, opt, steps=6):
    codes = {n: b.clone() for n, b in model.named_buffers() if b.dtype in (torch.uint8, torch.int8)}
    assert codes
    batch = tiny_batch(seq=16)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for n, b in model.named_buffers():
        if n in codes:
            assert torch.equal(b, codes[n]), n
    return losses


def _qlora():
    model = apply_lora(quantize_model(tiny_model("llama"), type="nf4", compute_dtype="float32"),
                       {"type": "lora", "r": 4, "lora_alpha": 8})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero in peft: give it values so A's gradients are not zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


# LoRA factors are never projected (they are rank r already): a projected optimizer gives them its
# full-rank update, which for GaLore / APOLLO is their reference implementations' AdamW (eps added
# to sqrt(v) before bias correction: 7e-3 away from torch.optim.AdamW here, so the reference matters).
REFERENCES = {
    ("galore", False): ("galore_torch", "GaLoreAdamW"),
    ("apollo_mini", False): ("apollo_torch", "APOLLOAdamW"),
    ("frugal", False): ("torch.optim", "AdamW"),
    ("adamw", True): ("torch.optim", "AdamW"),  # efft's layer-wise updates inside backward
}


@pytest.mark.parametrize("name,layerwise", list(REFERENCES))
def test_qlora_under_efft_optimizers_equals_the_reference_optimizer(name, layerwise):
    module, cls = REFERENCES[(name, layerwise)]
    ref_cls = getattr(pytest.importorskip(module) if "." not in module else importlib.import_module(module), cls)
    model, ref = _qlora(), _qlora()
    cfg = SimpleNamespace(name=name, rank=4, update_proj_gap=2, target_modules="all-linear", layerwise=layerwise,
                          state_bits=32)
    if name == "adamw":
        opt = optim.build_optimizer(model, cfg, lr=1e-2)
    else:
        with pytest.warns(UserWarning, match="no 2-D weight matched"):
            opt = optim.build_optimizer(model, cfg, lr=1e-2)
    assert not any("rank" in g for g in opt.param_groups)  # no LoRA factor was projected
    ref_opt = ref_cls([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0, eps=1e-8)
    losses = _train(model, opt)
    ref_losses = _train(ref, ref_opt)
    assert losses[-1] < losses[0], losses
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for (n, p), q in zip(trained, [q for q in ref.parameters() if q.requires_grad]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)


def test_peqa_int8_trains_under_adamw():
    model = prepare_peqa(quantize_model(tiny_model("llama"), type="int8", compute_dtype="float32"))
    opt = optim.build_optimizer(model, SimpleNamespace(name="adamw", state_bits=32, layerwise=False), lr=2e-2)
    losses = _train(model, opt)
    assert losses[-1] < losses[0], losses


def test_prepare_from_the_recipe_schema():
    """The recipe's own pydantic sections drive quantize + adapter in one call."""
    config = pytest.importorskip("efft.config")
    from efft.quant import QuantLinear, prepare
    from efft.quant.peqa import PEQALinear

    q = config.QuantConfig(type="nf4", double_quant=True, compute_dtype="float32", skip=["lm_head"])
    lora = prepare(tiny_model("llama"), q, config.AdapterConfig(type="lora", r=2, lora_alpha=4))
    assert sum(isinstance(m, QuantLinear) for m in lora.modules()) == 14
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    peqa = prepare(tiny_model("llama"), q, config.AdapterConfig(type="peqa"))
    assert sum(isinstance(m, PEQALinear) for m in peqa.modules()) == 14
    plain = prepare(tiny_model("llama"), config.QuantConfig(), config.AdapterConfig(type="lora", r=2))
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    with pytest.raises(ValueError, match="no QuantLinear layers; quantize it first"):
        prepare(tiny_model("llama"), config.QuantConfig(), config.AdapterConfig(type="peqa"))
