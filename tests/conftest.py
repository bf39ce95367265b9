"""Test-wide setup: Triton's interpreter on machines without a GPU (set before triton is imported),
deterministic torch, and the tiny models every test directory shares."""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """36 short instruction examples ("Add a and b." -> "Answer: a+b") as a JSONL file, for recipes."""
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [{"instruction": f"Add {a} and {b}.", "output": f"Answer: {a + b}"} for a in range(6) for b in range(6)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
