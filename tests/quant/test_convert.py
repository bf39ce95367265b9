"""quantize_model on the tiny model families, exact memory figures, and building a quantized model
straight from a safetensors checkpoint with measured peak host memory below the full model."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from efft.quant import QuantLinear, load_quantized, quantize_from_checkpoint, quantize_model
from efft.memory.tracker import reset_peak_rss
from efft.quant.convert import is_skipped
from tests.tiny import tiny_batch, tiny_model

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def _dequantized_copy(model_q, family, **kw):
    """A plain fp32 model of the same architecture whose Linear weights are the dequantized ones."""
    ref = tiny_model(family, **kw)
    sd = ref.state_dict()
    for name, m in model_q.named_modules():
        if isinstance(m, QuantLinear):
            w = m.dequantize(torch.float32)
            if family == "gpt2":
                w = w.t()  # Conv1D stores [in, out]
            sd[name + ".weight"] = w
            if m.bias is not None:
                sd[name + ".bias"] = m.bias.detach()
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_model_replaces_linears_and_matches_dequantized_reference(family):
    model = quantize_model(tiny_model(family), {"type": "nf4", "compute_dtype": "float32"})
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert names and not any(n.endswith("lm_head") for n in names)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n in names)
    ref = _dequantized_copy(model, family)
    model.eval(), ref.eval()  # gpt2 has dropout
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits,
                                   ref(input_ids=batch["input_ids"]).logits, rtol=1e-5, atol=1e-5)


def test_skip_and_types():
    model = quantize_model(tiny_model("llama"), type="int8", skip=["lm_head", "mlp"], compute_dtype="float32")
    kinds = {n: m.quant_type for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert kinds and set(kinds.values()) == {"int8"} and not any(".mlp." in n for n in kinds)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert is_skipped("model.layers.0.mlp.up_proj", ["layers.0"]) and not is_skipped("model.layers.10.mlp", ["layers.1"])
    assert quantize_model(tiny_model("llama"), {"type": "none"}).model.layers[0].mlp.up_proj.__class__ is torch.nn.Linear
    with pytest.raises(ValueError, match="blocksize must be a power of two.*got 100"):
        quantize_model(tiny_model("llama"), {"type": "nf4", "blocksize": 100})
    with pytest.raises(ValueError, match="quant type must be one of none, nf4, fp4, int8; got 'q4'"):
        quantize_model(tiny_model("llama"), {"type": "q4"})


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_memory_of_a_quantized_tiny_llama_is_the_exact_formula():
    """4 bits a weight + one fp32 absmax per 64 weights (+ the 16-entry code book); with double
    quant the absmax is 1 byte + per-256-block fp32 scale + 256-entry map + offset."""
    kw = dict(hidden=256, layers=2, heads=4)
    fp16 = tiny_model("llama", dtype=torch.float16, **kw)
    shapes = [m.weight.shape for n, m in fp16.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    numels = [a * b for a, b in shapes]
    linear_fp16 = 2 * sum(numels)
    rest_fp16 = _nbytes(fp16.parameters()) - linear_fp16  # embeddings, norms, lm_head stay fp16
    bits_of = {}
    for dq in (False, True):
        model = quantize_model(tiny_model("llama", dtype=torch.float16, **kw), type="nf4", double_quant=dq)
        q_bytes = _nbytes(b for m in model.modules() if isinstance(m, QuantLinear) for b in m._buffers.values())
        expected = 0
        for n in numels:
            blocks = -(-n // 64)
            expected += n // 2 + 16 * 4
            expected += blocks + 4 * -(-blocks // 256) + 256 * 4 + 4 if dq else 4 * blocks
        assert q_bytes == expected
        assert _nbytes(model.parameters()) + q_bytes == rest_fp16 + expected  # nothing else was kept
        bits_of[dq] = 8 * q_bytes / sum(numels)
        assert q_bytes < 0.29 * linear_fp16
    # 4 + 32/64 (+ code book) vs 4 + 8/64 + a 1 KiB nested map a layer (large at this size)
    assert 4.5 < bits_of[False] < 4.51 and 4.125 < bits_of[True] < 4.25 and bits_of[True] < bits_of[False], bits_of


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_build_from_checkpoint_equals_quantize_model(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    cfg = {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    built = quantize_from_checkpoint(str(tmp_path), cfg, model_kwargs={"attn_implementation": "eager"})
    direct = quantize_model(model, cfg).eval()
    sd_b, sd_d = built.state_dict(), direct.state_dict()
    assert sorted(sd_b) == sorted(sd_d)
    for k in sd_d:
        assert torch.equal(sd_b[k], sd_d[k]), k
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(built(input_ids=batch["input_ids"]).logits,
                                   direct(input_ids=batch["input_ids"]).logits, rtol=0, atol=0)


_PEAK = textwrap.dedent("""
    import gc, json, re, sys, torch
    torch.set_num_threads(1)
    def status(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    from transformers import AutoModelForCausalLM
    from efft.quant import quantize_from_checkpoint, quantize_model
    path, warm = sys.argv[1], sys.argv[2]
    cfg = {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    runs = {"stream": lambda p: quantize_from_checkpoint(p, cfg),
            "full": lambda p: quantize_model(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32), cfg)}
    for fn in runs.values():  # the same code paths once on a tiny checkpoint: lazy imports not counted
        fn(warm)
    peaks = {}
    for mode, fn in runs.items():
        gc.collect()
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM)
        m = fn(path)
        peaks[mode] = status("VmHWM") - base
        del m
    print(json.dumps(peaks))
""")




@pytest.mark.skipif(not sys.platform.startswith("linux") or not reset_peak_rss(),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_build_from_checkpoint_peak_host_memory_below_full_model(tmp_path):
    model = tiny_model("llama", hidden=384, layers=6, heads=6, vocab_size=512)
    full = sum(p.numel() * 4 for p in model.parameters())  # fp32 bytes, ~40 MB
    model.save_pretrained(tmp_path / "big")
    del model
    tiny_model("llama").save_pretrained(tmp_path / "warm")
    # a fixed mmap threshold: large tensors are returned to the OS when freed (no arena reuse)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path), MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big"), str(tmp_path / "warm")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    # layer by layer: quantized model + one fp32 tensor and its temporaries, well below the full model
    print("peak host memory above baseline:", peaks, "fp32 model bytes:", full)
    assert peaks["stream"] < 0.5 * full, (peaks, full)
    # the usual path (load fp32, then quantize) holds the whole fp32 model: the measurement sees it
    assert peaks["full"] > full, (peaks, full)


def test_build_from_checkpoint_names_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from efft.quant import QuantCheckpointError

    tiny_model("llama").save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    cfg = {"type": "nf4", "compute_dtype": "float32"}
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(QuantCheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: missing from the checkpoint"):
        quantize_from_checkpoint(str(tmp_path), cfg)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(65)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(QuantCheckpointError, match=r"model\.norm\.weight: expected shape \[64\], got \[65\]"):
        quantize_from_checkpoint(str(tmp_path), cfg)
    bad = dict(sd)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.ones(64, 65)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(QuantCheckpointError,
                       match=r"model\.layers\.0\.self_attn\.q_proj\.weight: .*has shape \(64, 65\), expected \(64, 64\)"):
        quantize_from_checkpoint(str(tmp_path), cfg)
