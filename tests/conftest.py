"""Test-wide setup: Triton's interpreter on machines without a GPU (set before triton is imported),
deterministic torch, and the tiny models every test directory shares."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.use_deterministic_algorithms(False)
