"""Stochastic rounding of int8 block codes: unbiased, keeps sub-half-step updates, and keeps learning
where round-to-nearest stalls."""
import pytest
import torch

from efft.quant.formats import quantize_int8_rowwise
from efft.quant.stochastic import (QMAX, dequantize_int8_blockwise, mix_seed, quantize_int8_blockwise, requantize,
                                   round_codes)
from efft.quant.trainable import Int8TrainableLinear


def test_stochastic_rounding_is_unbiased():
    # 401 code values spread over [-126.9, 126.9] with all kinds of fractional parts, 20,000 draws each.
    # For each value the sample mean of floor(x + u) has standard deviation sqrt(f (1 - f) / N) <= 0.0036;
    # bound: 5 sigma (+1e-5 for float32 x + u), family-wise false alarm < 401 * 6e-7.
    x = torch.linspace(-126.9, 126.9, 401)
    n = 20_000
    q = round_codes(x.repeat(n, 1), "stochastic", seed=1234).float()
    mean = q.mean(0)
    frac = x - x.floor()
    sigma = torch.sqrt(frac * (1 - frac) / n)
    assert (mean - x).abs().le(5 * sigma + 1e-5).all(), (mean - x).abs().max()
    # and it only ever picks one of the two neighbours
    assert ((q == x.floor()) | (q == x.floor() + 1)).all()
    # nearest rounding, by contrast, is off by the distance to the nearest code
    assert (round_codes(x, "nearest").float() - x).abs().max() > 0.4


def test_update_below_half_a_step_moves_the_weight_in_expectation():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    codes, scale = quantize_int8_blockwise(w, 64)
    w0 = dequantize_int8_blockwise(codes, scale, 64)
    step = scale.repeat_interleave(64).view(64, 64)
    delta = 0.1 * step * torch.sign(torch.randn(64, 64))  # a fifth of half a step, per element
    # keep the elements at the edge of each block's range still so no block is re-gridded
    delta[codes.abs() >= QMAX - 1] = 0
    trials = 400
    moved = torch.zeros(64, 64)
    for t in range(trials):
        c, s, refreshed = requantize(w0 + delta, codes, scale, 64, "stochastic", seed=mix_seed(7, t))
        assert not refreshed.any() and torch.equal(s, scale)
        moved += dequantize_int8_blockwise(c, s, 64) - w0
    mean = moved / trials
    # per element: mean of (step * Bernoulli(0.1)) has sd step * 0.3 / 20; averaged over the 4,032 moved
    # elements the relative error of the mean move is ~0.3/20/0.1/sqrt(4000) = 0.24%; bound 2%.
    mask = delta != 0
    ratio = (mean[mask] / delta[mask]).mean()
    assert abs(ratio - 1) < 0.02, ratio
    # round-to-nearest loses all of it
    c, s, _ = requantize(w0 + delta, codes, scale, 64, "nearest")
    assert torch.equal(c, codes)


def test_zero_update_is_an_exact_no_op_and_seeds_reproduce():
    torch.manual_seed(1)
    w = torch.randn(32, 128) * 0.02
    codes, scale = quantize_int8_blockwise(w, 64)
    w0 = dequantize_int8_blockwise(codes, scale, 64)
    c, s, refreshed = requantize(w0.clone(), codes, scale, 64, "stochastic", seed=5)
    assert torch.equal(c, codes) and torch.equal(s, scale) and not refreshed.any()
    w1 = w0 + 0.3 * scale.repeat_interleave(64).view(32, 128)
    a = requantize(w1, codes, scale, 64, seed=99)[0]
    b = requantize(w1, codes, scale, 64, seed=99)[0]
    d = requantize(w1, codes, scale, 64, seed=100)[0]
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_blocks_are_regridded_only_when_their_range_changes():
    torch.manual_seed(2)
    w = torch.randn(4, 64)  # 4 blocks of 64
    codes, scale = quantize_int8_blockwise(w, 64)
    w0 = dequantize_int8_blockwise(codes, scale, 64)
    w1 = w0.clone()
    w1[1, 3] = 3 * scale[1] * QMAX  # block 1 grows past its largest code
    w1[2] *= 0.25  # block 2 shrinks below half its range
    c, s, refreshed = requantize(w1, codes, scale, 64, "stochastic", seed=3)
    assert refreshed.tolist() == [False, True, True, False]
    assert torch.equal(s[[0, 3]], scale[[0, 3]]) and torch.equal(c[[0, 3]], codes[[0, 3]])
    assert torch.allclose(s[1], w1[1].abs().max() / QMAX) and torch.allclose(s[2], w1[2].abs().max() / QMAX)
    back = dequantize_int8_blockwise(c, s, 64)
    # the grown element is represented exactly (it is the new absmax: code 127), the rest within a step
    assert torch.allclose(back[1, 3], w1[1, 3])
    assert ((back - w1).abs() <= s.repeat_interleave(64).view(4, 64) * 1.0001).all()
    assert c.abs().max() <= QMAX


def test_nearest_codes_match_llm_int8_rowwise_when_a_block_is_a_row():
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(16, 128) * 0.05).to(dtype)
        codes, scale = quantize_int8_blockwise(w, 128, "nearest")
        q_ref, absmax_ref, _ = quantize_int8_rowwise(w)
        assert torch.equal(codes, q_ref)
        assert torch.allclose(scale * QMAX, absmax_ref)


def test_partial_last_block_and_zero_blocks():
    w = torch.zeros(3, 50)
    w[0, :5] = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    codes, scale = quantize_int8_blockwise(w, 32)  # 150 values: 4 full blocks + 22
    assert scale.numel() == 5 and codes.shape == w.shape
    back = dequantize_int8_blockwise(codes, scale, 32)
    assert (back - w).abs().max() <= 3.0 / QMAX / 2 + 1e-7
    assert scale[2:].eq(0).all() and codes[1:].eq(0).all()
    with pytest.raises(ValueError, match="blocksize"):
        quantize_int8_blockwise(w, 48)
    with pytest.raises(TypeError, match="float"):
        quantize_int8_blockwise(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="scales"):
        dequantize_int8_blockwise(codes, scale[:3], 32)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_round_to_nearest_stalls_where_stochastic_rounding_keeps_learning(rounding):
    """Fit an int8 layer to a target 3 quantization steps away with SGD whose per-step update is at most
    ~0.2 of a step: round-to-nearest never changes a code (the loss stays within 10%); stochastic
    rounding reaches the target (loss below 15% of its start, a measured ~5%)."""
    torch.manual_seed(4)
    w = torch.randn(32, 64) * 0.05
    layer = Int8TrainableLinear.from_linear(torch.nn.Linear(64, 32, bias=False), blocksize=64, rounding=rounding)
    with torch.no_grad():
        layer.load_state_dict({"weight": w})
    step = layer.weight_scale.repeat_interleave(64).view(32, 64)
    target = layer.dequantize() + 3 * step * torch.sign(torch.randn(32, 64)) * (torch.rand(32, 64) < 0.9)
    # targets stay inside each block's range, so the grid stays fixed
    edge = layer.weight_codes.abs() >= QMAX - 3
    target[edge] = layer.dequantize()[edge]
    x = torch.randn(256, 64)
    y = x @ target.t()
    opt = torch.optim.SGD([layer.weight], lr=0.05)
    codes0 = layer.weight_codes.clone()
    losses = []
    for _ in range(150):
        loss = ((layer(x) - y) ** 2).sum(1).mean() / 2
        losses.append(loss.item())
        loss.backward()
        if len(losses) == 1:  # every update is below half a step from the start
            assert (opt.param_groups[0]["lr"] * layer.weight.grad.abs() / step).max() < 0.5
        opt.step()
        opt.zero_grad()
    if rounding == "nearest":
        # no code ever moves (a block's scale may still grow a little when its absmax element is pushed
        # outward, which changes the loss by a few percent at most)
        assert torch.equal(layer.weight_codes, codes0)
        assert losses[-1] > 0.9 * losses[0], (losses[0], losses[-1])
    else:
        assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


def test_chunked_requantize_equals_one_chunk(monkeypatch):
    """Chunking (which bounds the temporaries of large layers) changes nothing but where the noise is drawn:
    with nearest rounding the result is identical, with stochastic rounding it stays within one code."""
    import efft.quant.stochastic as st

    torch.manual_seed(5)
    w = torch.randn(40, 100)  # 4000 values: 62 full blocks of 64 + one of 32
    codes, scale = quantize_int8_blockwise(w, 64)
    w1 = dequantize_int8_blockwise(codes, scale, 64) + 0.3 * torch.randn(40, 100) * scale.max()
    whole = [requantize(w1, codes, scale, 64, r, seed=1) for r in ("nearest", "stochastic")]
    monkeypatch.setattr(st, "CHUNK_ELEMS", 256)  # 4 blocks a chunk, a partial block in the last one
    parts = [requantize(w1, codes, scale, 64, r, seed=1) for r in ("nearest", "stochastic")]
    for a, b in zip(whole[0], parts[0]):
        assert torch.equal(a, b)
    assert torch.equal(whole[1][1], parts[1][1]) and torch.equal(whole[1][2], parts[1][2])
    assert (whole[1][0].int() - parts[1][0].int()).abs().max() <= 1
