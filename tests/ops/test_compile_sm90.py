"""The kernels compile for an H100 (sm_90) ahead of time, without a GPU: catches what the interpreter
accepts but the compiler rejects (it runs the same source on numpy). Resources of every config:
``python scripts/bench_ops.py --compile-check``."""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton wheel without the NVIDIA backend's ptxas")
def test_kernels_compile_for_sm90():
    code = (
        "from efft.ops._compile_check import compile_all\n"
        "rows = compile_all(full=False, names={'fwd/tile', 'bwd/splitk', 'wgrad/store', 'fwd/tile general'})\n"
        "assert len(rows) == 4, rows\n"
        "bad = [r for r in rows if not r['ok'] or not r['fits_smem']]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
