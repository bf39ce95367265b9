"""QLoRA on efft's QuantLinear through peft: gradients equal the same LoRA on the dequantized fp32
model; the saved adapter loads onto a bitsandbytes-4bit model of the same weights with the same
outputs; merged full-precision export."""
import pytest
import torch

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from efft.quant import QuantLinear, quantize_model  # noqa: E402
from efft.quant.peft import QuantLoraLinear, apply_lora, export_merged, load_lora  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402

QCFG = {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
ACFG = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _dequantized_reference(model_q):
    ref = tiny_model("llama")
    sd = ref.state_dict()
    for name, m in model_q.named_modules():
        if isinstance(m, QuantLinear):
            sd[name.replace(".base_layer", "") + ".weight"] = m.dequantize(torch.float32)
    ref.load_state_dict(sd)
    return ref


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_grads_match_lora_on_dequantized_fp32_model(kind):
    acfg = dict(ACFG, type=kind)
    q = apply_lora(quantize_model(tiny_model("llama"), QCFG), acfg)
    assert any(isinstance(m, QuantLoraLinear) for m in q.modules())
    ref = apply_lora(_dequantized_reference(q.base_model.model), acfg)  # plain peft on nn.Linear
    _randomize_lora(q)
    _randomize_lora(ref)
    trainable = [n for n, p in q.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # A and B (and DoRA's magnitude) for 7 projections x 2 layers
    assert len(trainable) == (3 if kind == "dora" else 2) * 7 * 2
    batch = tiny_batch()
    loss_q, g_q = _lora_grads(q, batch)
    loss_r, g_r = _lora_grads(ref, batch)
    torch.testing.assert_close(loss_q, loss_r, rtol=1e-5, atol=1e-6)
    assert sorted(g_q) == sorted(g_r)
    for n in g_q:
        torch.testing.assert_close(g_q[n], g_r[n], rtol=1e-4, atol=1e-6, msg=n)


def test_training_lowers_the_loss_and_leaves_the_base_untouched():
    model = apply_lora(quantize_model(tiny_model("llama"), QCFG), ACFG)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".weight")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch(seq=16)
    losses = []
    for _ in range(8):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, b in model.named_buffers():
        if n in before:
            assert torch.equal(b, before[n]), n


def _bnb_model_from(efft_model):
    """The same architecture with bitsandbytes Linear4bit layers holding efft's quantized bytes."""
    m = tiny_model("llama", seed=7)
    m.load_state_dict({k: v for k, v in efft_model.state_dict().items() if k in m.state_dict()
                       and efft_model.state_dict()[k].dtype == torch.float32
                       and efft_model.state_dict()[k].shape == m.state_dict()[k].shape}, strict=False)
    for name, ql in list(efft_model.named_modules()):
        if not isinstance(ql, QuantLinear):
            continue
        sd = ql.state_dict()
        b = bnb.nn.Linear4bit(ql.in_features, ql.out_features, bias=ql.bias is not None,
                              compute_dtype=torch.float32, quant_type=ql.quant_type)
        stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        b.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=b)
        parent, _, child = name.replace(".base_layer", "").rpartition(".")
        setattr(m.get_submodule(parent), child, b)
    m.is_loaded_in_4bit = True  # peft picks its bnb LoRA layer only then
    return m


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_saved_from_efft_loads_onto_bitsandbytes_4bit_model(tmp_path, kind):
    base = quantize_model(tiny_model("llama"), QCFG)
    model = apply_lora(base, dict(ACFG, type=kind))
    _randomize_lora(model)
    batch = tiny_batch()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path / "adapter")
    bnb_model = _bnb_model_from(model.base_model.model)
    loaded = peft.PeftModel.from_pretrained(bnb_model, tmp_path / "adapter")
    assert any(type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A") for m in loaded.modules())
    # bitsandbytes' eval mode on AVX512-BF16 CPUs repacks the weight for a bf16 kernel; train mode
    # (dropout is 0) keeps its fp32 dequantize + matmul, the computation efft does
    loaded.train()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and back onto a fresh efft model of the same weights
    fresh = quantize_model(tiny_model("llama"), QCFG)
    again = load_lora(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=batch["input_ids"]).logits, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_full_precision_export(kind):
    model = apply_lora(quantize_model(tiny_model("llama"), QCFG), dict(ACFG, type=kind))
    _randomize_lora(model)
    batch = tiny_batch()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    merged = export_merged(model)
    assert not any(isinstance(m, (QuantLinear, QuantLoraLinear)) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, want, rtol=1e-5, atol=1e-5)


def test_apply_lora_on_an_unquantized_model_is_plain_peft():
    model = apply_lora(tiny_model("llama"), {"type": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    kinds = {type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")}
    assert kinds == {"Linear"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (2 * 64 + 64 + 32)
    with pytest.raises(ValueError, match="lora or dora, got 'peqa'"):
        apply_lora(tiny_model("llama"), {"type": "peqa"})
