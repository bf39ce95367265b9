"""Exact tensor accounting of int8 training: weights, gradients and optimizer state equal their formulas."""
import math

import torch

from efft.optim import APOLLOAdamW
from efft.quant.trainable import Int8LayerwiseOptimizer, int8_layers
from tests.quantized_ft.helpers import apollo_mini_groups, batches, int8_model
from tests.tiny import tiny_model


def _storage_bytes(tensors):
    """Bytes of the distinct storages behind ``tensors`` (a stride-0 carrier counts its one element)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _linear_shapes(model):
    return [(m.out_features, m.in_features) for m in int8_layers(model)]


def test_weight_bytes_equal_the_formula():
    ref = tiny_model("llama")
    model = int8_model()
    shapes = _linear_shapes(model)
    bs = 64
    # int8 layer: 1 byte a weight + a float32 scale a block + 16 bytes of rounding-stream state + the 4-byte carrier
    int8_bytes = sum(m * n + 4 * math.ceil(m * n / bs) + 16 + 4 for m, n in shapes)
    other = sum(p.numel() * 4 for n, p in ref.named_parameters()
                if not any(n.endswith(x + ".weight") for x in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj")))
    measured = _storage_bytes(list(model.parameters()) + list(model.buffers()))
    rope = _storage_bytes(ref.buffers())  # rotary inv_freq, the same in both
    assert measured == int8_bytes + other + rope
    fp32 = _storage_bytes(list(ref.parameters()) + list(ref.buffers()))
    linear_fp32 = sum(4 * m * n for m, n in shapes)
    assert fp32 - measured == linear_fp32 - int8_bytes  # 4 -> ~1.06 bytes a Linear weight


def test_gradient_and_state_bytes_whole_step_adamw():
    model = int8_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    b = batches(1)[0]
    model(**b).loss.backward()
    n_train = sum(p.numel() for p in params)  # carriers count their logical m x n
    assert _storage_bytes(p.grad for p in params) == 4 * n_train
    opt.step()
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert state == 2 * 4 * n_train + 4 * len(params)  # exp_avg + exp_avg_sq float32, step as a float32 scalar
    # after the step no weight is left materialized
    assert all(m.weight.untyped_storage().nbytes() == 4 for m in int8_layers(model))


def test_layerwise_apollo_mini_gradients_and_state_bytes():
    model = int8_model()
    params = [p for p in model.parameters() if p.requires_grad]
    peak = [0]

    def probe(p):
        peak[0] = max(peak[0], _storage_bytes(q.grad for q in params if q.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(probe)
    opt = Int8LayerwiseOptimizer(APOLLOAdamW(apollo_mini_groups(model), lr=1e-3))
    for b in batches(2):
        model(**b).loss.backward()
        assert all(p.grad is None for p in params)  # nothing left after backward
        opt.step()
    # peak gradient memory: the largest single parameter's float32 gradient
    assert peak[0] == 4 * max(p.numel() for p in params)
    # APOLLO-Mini on an m x n int8 weight: rank-1 projection of the smaller side, so Adam's two float32
    # moments have max(m, n) entries, plus one float32 scalar (the norm-growth limiter's last norm);
    # the other trainable parameters (norms) get AdamW: two float32 moments of their size.
    shapes = _linear_shapes(model)
    expected = sum(2 * 4 * max(m, n) + 4 for m, n in shapes)
    expected += sum(2 * 4 * p.numel() for p in params if p.dim() != 2)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert state == expected
    adamw = sum(2 * 4 * p.numel() for p in params)
    lin = sum(2 * 4 * m * n for m, n in shapes)
    assert sum(2 * 4 * max(m, n) + 4 for m, n in shapes) < 0.03 * lin  # ~1/64 of AdamW's here (1/4096 at 8B)
    assert state < adamw
