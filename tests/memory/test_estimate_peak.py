"""The predicted peak of a whole step against the measured one on CPU: exact static bytes plus the
peak of tensor bytes the step allocates (activations, gradients, temporaries), seen op by op."""
import pytest

from efft.memory.validate import measure_peak
from tests.memory.harness import recipe, tiny_block

B = dict(layers=3, vocab=1024)
CASES = [
    ("full AdamW eager", recipe(tiny_block("llama", **B), 4, 64, "eager")),
    ("full AdamW sdpa checkpointing", recipe(tiny_block("llama", **B), 4, 64, "sdpa", True)),
    ("LoRA", recipe(tiny_block("qwen2", **B), 4, 64, "sdpa", adapter={"type": "lora", "r": 8})),
    ("APOLLO-Mini layer-wise", recipe(tiny_block("llama", **B), 4, 64, "sdpa", optim={"name": "apollo_mini", "layerwise": True})),
    ("GaLore", recipe(tiny_block("llama", **B), 4, 64, "sdpa", optim={"name": "galore", "rank": 8})),
    ("bf16 full AdamW", recipe(tiny_block("mistral", **B), 4, 64, "sdpa", dtype="bfloat16")),
    ("loss-token skipping", recipe(tiny_block("llama", **B), 4, 64, "sdpa", sparsity={"loss_tokens": {"enabled": True, "chunk_size": 64}})),
]


@pytest.mark.parametrize("name,rd", CASES, ids=[c[0] for c in CASES])
def test_predicted_peak_within_10_percent_on_cpu(name, rd):
    m = measure_peak(rd)
    pred, meas = m["total"]
    assert m["static"][0] == m["static"][1]
    assert abs(pred - meas) <= 0.10 * meas, m
    dp, dm = m["dynamic"]
    assert abs(dp - dm) <= 0.15 * dm, m
