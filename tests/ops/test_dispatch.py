"""impl dispatch: "torch" always, "triton" or an error saying what was expected, "auto" falls back once."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from efft.ops import dequant_matmul, dequant_matmul_reference
from efft.ops._dispatch import _warned, resolve_impl

from .helpers import TOL, quantize


def test_auto_on_cpu_is_the_reference_silently():
    packed, state = quantize(torch.randn(16, 64))
    x = torch.randn(3, 64, dtype=torch.bfloat16)  # bf16 fine for the reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = dequant_matmul(x, packed, state, impl="auto")
    torch.testing.assert_close(y, dequant_matmul_reference(x, packed, state), **TOL[torch.bfloat16])


def test_auto_falls_back_with_one_warning_on_cuda_inputs_the_kernel_cannot_take():
    _warned.clear()
    with pytest.warns(RuntimeWarning, match="falling back to the torch reference: expected x in float"):
        assert resolve_impl("auto", "op", torch.device("cuda"), "expected x in float16/bfloat16/float32") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: silent
        assert resolve_impl("auto", "op", torch.device("cuda"), "expected x in float16/bfloat16/float32") == "torch"
    assert resolve_impl("auto", "op", torch.device("cuda"), None) == "triton"


def test_triton_errors_say_what_was_expected(monkeypatch):
    packed, state = quantize(torch.randn(16, 64))
    with pytest.raises(ValueError, match="bfloat16 is not supported by the Triton CPU interpreter"):
        dequant_matmul(torch.randn(2, 64, dtype=torch.bfloat16), packed, state, impl="triton")
    with pytest.raises(ValueError, match="expected the packed weight, its statistics and bias on cpu"):
        dequant_matmul(torch.randn(2, 64), packed, state, bias=torch.randn(16, device="meta"), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        dequant_matmul(torch.randn(2, 64), packed, state, impl="triton")
    # auto without the interpreter on CPU: the reference, no error
    dequant_matmul(torch.randn(2, 64), packed, state, impl="auto")


def _run(code):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_is_lazy_and_works_without_triton():
    r = _run("import sys, efft.ops; assert 'triton' not in sys.modules, 'triton imported eagerly'")
    assert r.returncode == 0, r.stderr
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, efft.ops as o\n"
        "from efft.quant import quantize_4bit\n"
        "p, s = quantize_4bit(torch.randn(8, 64))\n"
        "o.dequant_matmul(torch.randn(2, 64), p, s, impl='auto')\n"
        "try:\n"
        "    o.dequant_matmul(torch.randn(2, 64), p, s, impl='triton')\n"
        "except ValueError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_autotune_families_for_training_and_decode_shapes(monkeypatch):
    """One config per family under the interpreter; on a GPU, big row tiles for training shapes and
    split-K tiles for decode shapes, picked by M."""
    tk = pytest.importorskip("efft.ops._dequant_matmul_triton")
    for tuned in (tk._fwd_tile, tk._fwd_splitk, tk._bwd_tile, tk._bwd_splitk):
        assert len(tuned.configs) == 1
    launched = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda tuned, *a, **kw: launched.append(tuned) or real(tuned, *a, **kw))
    packed, state = quantize(torch.randn(16, 64))
    for m in (1, tk.SMALL_M, tk.SMALL_M + 1):
        x = torch.randn(m, 64)
        torch.testing.assert_close(tk.forward(x, packed, state), dequant_matmul_reference(x, packed, state),
                                   **TOL[torch.float32])
    assert launched == [tk._fwd_splitk, tk._fwd_splitk, tk._fwd_tile]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU config lists
    tile, split = tk.tile_configs(), tk.splitk_configs()
    assert len(tile) > 1 and len(split) > 1
    assert all(c.kwargs["BLOCK_M"] >= 64 and c.kwargs["SPLIT_K"] == 1 for c in tile)
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in split) and {c.kwargs["SPLIT_K"] for c in split} > {1}
    assert {c.kwargs["BLOCK_M"] for c in tk._prune_small_m(split, {"M": 1})} == {16}  # M = 1: 16-row tiles only


def test_shapes_and_tables_the_kernel_cannot_take_are_named():
    from efft.ops.dequant_matmul import unsupported_reason
    from efft.quant.formats import get_4bit_code
    from efft.quant.state import QuantState

    x = torch.randn(1, 2**15)
    big = QuantState(absmax=torch.zeros(1), shape=torch.Size((2**16, 2**15)), dtype=torch.float32, blocksize=64,
                     quant_type="nf4", code=get_4bit_code("nf4"))
    reason = unsupported_reason(x, torch.zeros(1, dtype=torch.uint8), big)
    assert reason == "the kernel indexes W with int32; W(65536, 32768) has 2**31 elements or more"
    with pytest.raises(ValueError, match=r"dequant_matmul\(impl='triton'\): the kernel indexes W with int32"):
        resolve_impl("triton", "dequant_matmul", torch.device("cpu"), reason)
    _warned.clear()
    with pytest.warns(RuntimeWarning, match="falling back to the torch reference: the kernel indexes W with int32"):
        assert resolve_impl("auto", "dequant_matmul", torch.device("cuda"), reason) == "torch"
    packed, state = quantize(torch.randn(16, 64))
    state.code = state.code[:8]
    assert unsupported_reason(torch.randn(2, 64), packed, state) == "expected a 16-entry 4-bit code table, got 8 entries"
