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
