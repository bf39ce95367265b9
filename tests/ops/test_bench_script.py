"""scripts/bench_ops.py runs end to end (tiny shapes under the interpreter) and is a no-op without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ops.py"


def _run(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cpu_smoke_writes_a_card(tmp_path):
    out = tmp_path / "ops.md"
    r = _run("--cpu-smoke", "--reps", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Smoke run on CPU" in text
    assert "| 64 | 48 | 1 | fwd |" in text and "| 64 | 48 | 33 | bwd-input |" in text
    assert "| 64 | 48 | 40 | 25% |" in text and "| 64 | 48 | 40 | 100% |" in text
    assert (tmp_path / "ops.json").exists()
    import json

    data = json.loads((tmp_path / "ops.json").read_text())
    # the script checks each kernel's output against the reference before timing it
    assert all(row["rel_err"] < 1e-2 for row in data["rows"] + data["sparse"]), data


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_without_gpu_exits_zero_and_writes_nothing(tmp_path):
    out = tmp_path / "ops.md"
    r = _run("--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout
    assert not out.exists()
