"""Checkpoints move both ways between efft and bitsandbytes' own serialization (Linear4bit /
Linear8bitLt state dicts, QuantState.as_dict(packed=True)), through safetensors files."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from safetensors.torch import load_file, save_file  # noqa: E402

from efft.quant import quantize_4bit  # noqa: E402
from efft.quant.io import QuantCheckpointError, load_quantized, save_quantized, state_from_tensors  # noqa: E402
from efft.quant.linear import QuantLinear  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402


def _lin(i=128, o=48, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o)


def _bnb4(lin, qt, dq):
    b = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compress_statistics=dq, quant_type=qt,
                          compute_dtype=torch.float32)
    b.load_state_dict(lin.state_dict())
    return b.to("cpu")


def _bnb4_from_state_dict(sd, lin):
    """How transformers loads a pre-quantized 4-bit checkpoint into bitsandbytes."""
    b = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    b.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=b)
    b.bias = torch.nn.Parameter(sd["bias"])
    return b


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_bitsandbytes_checkpoint_loads_into_efft(tmp_path, qt, dq):
    lin = _lin()
    b = _bnb4(lin, qt, dq)
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, tmp_path / "bnb.safetensors")
    q = QuantLinear(128, 48, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)  # format adopted
    q.load_state_dict(load_file(tmp_path / "bnb.safetensors"))
    assert (q.quant_type, q.double_quant) == (qt, dq)
    assert torch.equal(q.dequantize(), bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state))
    x = torch.randn(4, 128)
    torch.testing.assert_close(q(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_efft_checkpoint_loads_into_bitsandbytes(tmp_path, qt, dq):
    lin = _lin(seed=1)
    q = QuantLinear.from_linear(lin, quant_type=qt, double_quant=dq, compute_dtype=torch.float32)
    sd = q.state_dict()
    # same keys and tensors as bitsandbytes' own serialization of the same weights
    ref = _bnb4(lin, qt, dq).state_dict()
    assert sorted(sd) == sorted(ref)
    for k in sd:
        assert torch.equal(sd[k], ref[k]), k
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "efft.safetensors")
    b = _bnb4_from_state_dict(load_file(tmp_path / "efft.safetensors"), lin)
    assert torch.equal(bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state), q.dequantize())
    x = torch.randn(4, 128)
    torch.testing.assert_close(b(x), q(x), rtol=0, atol=0)


def test_quant_state_as_dict_packed_round_trip():
    w = torch.randn(40, 96)
    p, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, mine = state_from_tensors({"weight": p, **{"weight." + k: v for k, v in st.as_dict(packed=True).items()}},
                                      shape=(40, 96))
    ours_p, ours = quantize_4bit(w, "nf4", 64, True)
    assert torch.equal(packed, ours_p) and torch.equal(mine.absmax, ours.absmax)
    assert torch.equal(mine.offset, ours.offset) and torch.equal(mine.state2.absmax, ours.state2.absmax)


def test_int8_checkpoint_both_ways():
    lin = _lin(128, 40)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())  # bitsandbytes quantizes from fp16
    b = bnb.nn.Linear8bitLt(128, 40, has_fp16_weights=False)
    b.load_state_dict(lin.state_dict())
    b = b.to("cpu")
    q = QuantLinear(128, 40, quant_type="int8", compute_dtype=torch.float32)
    q.load_state_dict(b.state_dict())
    assert torch.equal(q.weight, b.weight.data) and torch.equal(q.SCB, b.weight.SCB)
    q2 = QuantLinear.from_linear(lin, quant_type="int8")
    sd = q2.state_dict()
    assert sorted(sd) == sorted(b.state_dict())
    b2 = bnb.nn.Linear8bitLt(128, 40, has_fp16_weights=False)
    b2.load_state_dict(torch.nn.Linear(128, 40).state_dict())
    b2 = b2.to("cpu")
    b2.load_state_dict(sd)
    assert torch.equal(b2.weight.data, q2.weight) and torch.equal(b2.weight.SCB, q2.SCB)


def test_model_save_load_round_trip(tmp_path):
    from efft.quant import quantize_model

    model = quantize_model(tiny_model("llama"), {"type": "nf4", "double_quant": True, "compute_dtype": "float32"})
    batch = tiny_batch()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
    save_quantized(model, str(tmp_path / "ckpt"))
    # a fresh quantized skeleton with different random weights, then load
    other = quantize_model(tiny_model("llama", seed=5), {"type": "nf4", "compute_dtype": "float32"})
    load_quantized(other, str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=batch["input_ids"]).logits, ref, rtol=0, atol=0)


def _good(qt="nf4"):
    q = QuantLinear.from_linear(_lin(), quant_type=qt, double_quant=True)
    return q.state_dict()


@pytest.mark.parametrize("drop,msg", [
    ("weight.absmax", r"p\.weight\.absmax: missing from the checkpoint \(expected 96 block scales\)"),
    ("weight.nested_absmax", r"p\.weight\.nested_absmax: missing .*expected 1 float32 nested scales"),
    ("weight.quant_state.bitsandbytes__nf4", r"p\.weight\.quant_state\.bitsandbytes__nf4\|fp4: expected exactly one quant_state entry, found none"),
    ("weight", r"p\.weight: missing"),
])
def test_missing_keys_are_named(drop, msg):
    sd = {"p." + k: v for k, v in _good().items() if k != drop}
    model = torch.nn.Module()
    model.p = QuantLinear(128, 48)
    if drop == "weight.quant_state.bitsandbytes__nf4":
        msg = r"p\.weight: packed uint8 weight without p\.weight\.quant_state\.bitsandbytes__nf4\|fp4"
    with pytest.raises(QuantCheckpointError, match=msg):
        load_quantized(model, sd)


def test_mismatched_keys_are_named():
    model = torch.nn.Module()
    model.p = QuantLinear(64, 48)  # checkpoint is 48 x 128
    with pytest.raises(QuantCheckpointError, match=r"p\.weight\.quant_state\.bitsandbytes__nf4: shape \[48, 128\] does not match the layer's \[48, 64\]"):
        load_quantized(model, {"p." + k: v for k, v in _good().items()})
    model.p = QuantLinear(128, 48)
    sd = {"p." + k: v for k, v in _good().items()}
    sd["p.weight.absmax"] = sd["p.weight.absmax"][:-1]
    with pytest.raises(QuantCheckpointError, match=r"p\.weight\.absmax: expected 96 values \(6144 weights / blocksize 64\), got 95"):
        load_quantized(model, sd)
    sd = {"p." + k: v for k, v in _good().items()}
    sd["p.weight.quant_state.bitsandbytes__fp4"] = sd.pop("p.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(QuantCheckpointError, match="disagrees with the key suffix 'fp4'"):
        load_quantized(model, sd)
    sd = {"p." + k: v for k, v in _good().items()}
    sd["p.extra"] = torch.zeros(1)
    with pytest.raises(QuantCheckpointError, match=r"p\.extra: not a parameter or buffer"):
        load_quantized(model, sd)
    # through nn.Module.load_state_dict the same message surfaces
    with pytest.raises(RuntimeError, match=r"weight\.absmax: expected 96 values"):
        sd = _good()
        sd["weight.absmax"] = sd["weight.absmax"][:-1]
        QuantLinear(128, 48).load_state_dict(sd)


def _p(sd):
    return {"p." + k: v for k, v in sd.items()}


def _int8_sd():
    return QuantLinear.from_linear(_lin(), quant_type="int8").state_dict()


@pytest.mark.parametrize("case,source,layer_type,msg", [
    ("no quant_map", "nf4", "nf4", r"p\.weight\.quant_map: missing from the checkpoint \(expected the 16-value code book\)"),
    ("short quant_map", "nf4", "nf4", r"p\.weight\.quant_map: expected 16 values, got 15"),
    ("no nested_quant_map", "nf4", "nf4", r"p\.weight\.nested_quant_map: missing .*expected the 256-value dynamic map"),
    ("float absmax, nested", "nf4", "nf4", r"p\.weight\.absmax: expected torch\.uint8 \(double quantized statistics\), got torch\.float32"),
    ("short packed weight", "nf4", "nf4", r"p\.weight: expected 3072 bytes of packed codes for shape \[48, 128\], got torch\.uint8 \(3071, 1\)"),
    ("bad quant_state JSON", "nf4", "nf4", r"p\.weight\.quant_state\.bitsandbytes__nf4: expected uint8 bytes of a JSON object"),
    ("JSON without blocksize", "nf4", "nf4", r"p\.weight\.quant_state\.bitsandbytes__nf4: JSON lacks 'blocksize'"),
    ("4-bit into int8 layer", "nf4", "int8", r"p\.weight: the layer is int8 but the checkpoint holds nf4"),
    ("short SCB", "int8", "int8", r"p\.SCB: expected 48 row scales, got 47"),
    ("int8 into 4-bit layer", "int8", "nf4", r"p\.weight: the layer is nf4 but the checkpoint holds int8"),
    ("int8 weight of wrong shape", "int8", "int8", r"p\.weight: expected int8 \[48, 128\], got torch\.int8 \[48, 127\]"),
])
def test_more_malformed_checkpoints_are_named(case, source, layer_type, msg):
    """Each remaining check of the loader: the key, and what was expected there."""
    import json

    sd = _p(_good() if source == "nf4" else _int8_sd())
    qs = "p.weight.quant_state.bitsandbytes__nf4"
    if case == "no quant_map":
        del sd["p.weight.quant_map"]
    elif case == "short quant_map":
        sd["p.weight.quant_map"] = sd["p.weight.quant_map"][:15]
    elif case == "no nested_quant_map":
        del sd["p.weight.nested_quant_map"]
    elif case == "float absmax, nested":
        sd["p.weight.absmax"] = sd["p.weight.absmax"].float()
    elif case == "short packed weight":
        sd["p.weight"] = sd["p.weight"][:-1]
    elif case == "bad quant_state JSON":
        sd[qs] = torch.tensor([0xFF, 0x00], dtype=torch.uint8)
    elif case == "JSON without blocksize":
        meta = json.loads(bytes(sd[qs].tolist()).decode())
        del meta["blocksize"]
        sd[qs] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    elif case == "short SCB":
        sd["p.SCB"] = sd["p.SCB"][:-1]
    elif case == "int8 weight of wrong shape":
        sd["p.weight"] = sd["p.weight"][:, :-1]
    model = torch.nn.Module()
    model.p = QuantLinear(128, 48, quant_type=layer_type)
    with pytest.raises(QuantCheckpointError, match=msg):
        load_quantized(model, sd)
    # the untouched checkpoint loads into a layer of its own type: the refusal is about the one change
    model.p = QuantLinear(128, 48, quant_type=source)
    load_quantized(model, _p(_good() if source == "nf4" else _int8_sd()))


def test_transformers_loads_efft_checkpoint_as_bitsandbytes_and_back(tmp_path):
    """save_quantized writes a directory transformers opens as a bitsandbytes 4-bit model (same
    logits); a checkpoint quantized and saved by transformers + bitsandbytes builds an efft model
    (same logits)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from efft.quant import quantize_from_checkpoint, quantize_model

    batch = tiny_batch()
    model = quantize_model(tiny_model("llama"), type="nf4", double_quant=True, compute_dtype="float32").eval()
    save_quantized(model, str(tmp_path / "efft"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "efft", attn_implementation="eager")
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    hf.train()  # bitsandbytes' eval mode on AVX512-BF16 CPUs switches to a bf16 kernel
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(hf(input_ids=batch["input_ids"]).logits, want, rtol=0, atol=0)
    # the other way: transformers quantizes a full-precision checkpoint and saves it
    # (transformers 5.23 cannot re-save a model it loaded pre-quantized, so start from fp32)
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "fp")
    bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bc, dtype=torch.float32,
                                              attn_implementation="eager")
    hf.save_pretrained(tmp_path / "hf")
    back = quantize_from_checkpoint(str(tmp_path / "hf"), model_kwargs={"attn_implementation": "eager"})
    assert all(m.quant_type == "fp4" and m.double_quant for m in back.modules() if isinstance(m, QuantLinear))
    hf.train()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=batch["input_ids"]).logits,
                                   hf(input_ids=batch["input_ids"]).logits, rtol=0, atol=0)
