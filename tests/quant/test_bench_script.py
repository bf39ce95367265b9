"""scripts/bench_quant.py runs end to end at tiny sizes and writes a card with every table."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("bitsandbytes")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_quant_writes_card(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_quant", os.path.join(ROOT, "scripts", "bench_quant.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "quant.md"
    mod.main(["--shape", "128x128", "--quality-shape", "64x128", "--tokens", "8", "--repeats", "1",
              "--machine", "test", "--out", str(out)])
    text = out.read_text()
    assert "## Size and accuracy" in text and "## Speed" in text and "## Notes" in text
    import torch

    assert ("No GPU rows" in text) == (not torch.cuda.is_available())  # a CPU-only card says so
    data = json.loads((tmp_path / "quant.json").read_text())
    effts = [r for r in data["quality"] if r["library"] == "efft" and r["format"].startswith(("nf4", "fp4"))]
    assert len(effts) == 4 and all(r["bytes = bitsandbytes"] == "yes" for r in effts)
    nf4 = next(r for r in effts if r["format"] == "nf4")
    assert abs(nf4["bits/param"] - (4 + 32 / 64 + 16 * 32 / (64 * 128))) < 1e-9
    assert all(r["efft/bnb Linear fwd+bwd"] > 0 for r in data["speed"])
    mod.main(["--from-json", str(tmp_path / "quant.json"), "--out", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == text
