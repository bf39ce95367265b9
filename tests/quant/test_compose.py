"""Quantized bases compose with efft's optimizers: QLoRA and PEQA train under build_optimizer
(GaLore / APOLLO-Mini / AdamW groups), the frozen codes never change."""
from types import SimpleNamespace

import pytest
import torch

optim = pytest.importorskip("efft.optim")

from efft.quant import quantize_model  # noqa: E402
from efft.quant.peft import apply_lora  # noqa: E402
from efft.quant.peqa import prepare_peqa  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402


def _train(model, opt_cfg, steps=6, lr=1e-2):
    codes = {n: b.clone() for n, b in model.named_buffers() if b.dtype in (torch.uint8, torch.int8)}
    assert codes
    opt = optim.build_optimizer(model, opt_cfg, lr=lr)
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


@pytest.mark.parametrize("name", ["galore", "apollo_mini"])
def test_qlora_trains_under_efft_optimizers(name):
    model = apply_lora(quantize_model(tiny_model("llama"), type="nf4", compute_dtype="float32"),
                       {"type": "lora", "r": 4, "lora_alpha": 8})
    cfg = SimpleNamespace(name=name, rank=4, update_proj_gap=2, target_modules="all-linear", layerwise=False,
                          state_bits=32)
    losses = _train(model, cfg)
    assert losses[-1] < losses[0], losses


def test_peqa_int8_trains_under_adamw():
    model = prepare_peqa(quantize_model(tiny_model("llama"), type="int8", compute_dtype="float32"))
    losses = _train(model, SimpleNamespace(name="adamw", state_bits=32, layerwise=False), lr=2e-2)
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
