"""Int8TrainableLinear: forward/backward against autograd on the dequantized weight, no persistent
full-precision weight, model preparation, state dicts."""
import pytest
import torch
from torch import nn

from efft.config import QuantConfig
from efft.quant.stochastic import quantize_int8_blockwise
from efft.quant.trainable import Int8TrainableLinear, int8_layers, prepare_int8_training
from tests.tiny import tiny_batch, tiny_model


def _int8_cfg(**kw):
    return QuantConfig(type="int8", trainable=True, compute_dtype="float32", **kw)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_equal_autograd_on_the_dequantized_weight(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)  # 3840 weights: 60 blocks of 64
    layer = Int8TrainableLinear.from_linear(lin, blocksize=64)
    w = layer.dequantize().clone().requires_grad_(True)
    b = None if not bias else layer.bias.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    gy = torch.randn(3, 5, 40)
    y = layer(x)
    y_ref = nn.functional.linear(x_ref, w, b)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-6, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-6, atol=1e-6)
    # the initial codes are the nearest ones: within half a step of the original weight
    step = layer.weight_scale.repeat_interleave(64).view(40, 96)
    assert ((layer.dequantize() - lin.weight.detach()).abs() <= step / 2 + 1e-7).all()


def test_bf16_compute_dtype_is_close_and_output_keeps_the_input_dtype():
    torch.manual_seed(1)
    layer = Int8TrainableLinear.from_linear(nn.Linear(64, 64, bias=False), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = x @ layer.dequantize().t()
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()


def test_carrier_holds_no_weight_and_dtype_moves_keep_it_that_way():
    layer = Int8TrainableLinear.from_linear(nn.Linear(128, 64, bias=False))
    assert layer.weight.shape == (64, 128) and layer.weight.dtype == torch.float32
    assert layer.weight.untyped_storage().nbytes() == 4
    assert layer.weight_codes.dtype == torch.int8 and layer.weight_codes.untyped_storage().nbytes() == 64 * 128
    assert layer.weight_scale.untyped_storage().nbytes() == 4 * (64 * 128 // 64)
    before = layer.weight_scale.clone()
    layer.to(torch.bfloat16)  # must neither materialize the carrier nor cast the scales
    assert layer.weight.untyped_storage().nbytes() == 4 and layer.weight.dtype == torch.float32
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, before)
    assert layer.weight_codes.dtype == torch.int8


def test_prepare_converts_linears_skips_lm_head_and_freezes_embeddings():
    model = tiny_model("llama")
    ref = tiny_model("llama")
    batch = tiny_batch()
    prepare_int8_training(model, _int8_cfg())
    layers = int8_layers(model)
    assert len(layers) == 2 * 7  # q k v o gate up down per layer
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    # no full-size float tensor left behind by the conversion: every int8 layer's storage is codes + scales + 4 bytes
    for m in layers:
        assert m.weight.untyped_storage().nbytes() == 4
    with torch.no_grad():
        l_ref = ref(**batch).loss.item()
        l_int8 = model(**batch).loss.item()
    assert abs(l_int8 - l_ref) < 0.01 * l_ref  # int8 block-wise weights change the loss by < 1%


def test_prepare_options_skip_and_trainable_embeddings():
    model = prepare_int8_training(tiny_model("llama"), _int8_cfg(skip=["lm_head", "down_proj"], blocksize=32),
                                  embeddings="trainable")
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert int8_layers(model)[0].blocksize == 32
    with pytest.raises(ValueError, match="already has int8"):
        prepare_int8_training(model, _int8_cfg())


def test_prepare_refuses_bad_inputs():
    with pytest.raises(ValueError, match="type: int8"):
        prepare_int8_training(tiny_model("llama"), QuantConfig(type="nf4", trainable=True))
    with pytest.raises(ValueError, match="trainable: true"):
        prepare_int8_training(tiny_model("llama"), QuantConfig(type="int8"))
    with pytest.raises(ValueError, match="outlier"):
        prepare_int8_training(tiny_model("llama"), _int8_cfg(outlier_threshold=6.0))
    with pytest.raises(ValueError, match="embeddings must be one of"):
        prepare_int8_training(tiny_model("llama"), _int8_cfg(), embeddings="cpu")
    with pytest.raises(ValueError, match="keep it in quant.skip"):
        prepare_int8_training(tiny_model("llama"), _int8_cfg(skip=[]), embeddings="host")
    with pytest.raises(ValueError, match="no nn.Linear"):
        prepare_int8_training(nn.Sequential(nn.Embedding(4, 4)), _int8_cfg())
    tied = tiny_model("llama", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied"):
        prepare_int8_training(tied, _int8_cfg(skip=[]))


def test_state_dict_round_trip_and_float_checkpoints():
    torch.manual_seed(2)
    a = Int8TrainableLinear.from_linear(nn.Linear(64, 32))
    a.sr_state[1] = 17
    sd = a.state_dict()
    assert set(sd) == {"weight_codes", "weight_scale", "sr_state", "bias"}
    b = Int8TrainableLinear(64, 32)
    b.load_state_dict(sd)
    for k in sd:
        assert torch.equal(getattr(b, k), getattr(a, k))
    # a float weight (an ordinary checkpoint) is quantized with nearest rounding on load
    w = torch.randn(32, 64)
    b.load_state_dict({"weight": w, "bias": torch.zeros(32)})
    c, s = quantize_int8_blockwise(w, 64)
    assert torch.equal(b.weight_codes, c) and torch.equal(b.weight_scale, s)
    with pytest.raises(RuntimeError, match="32 float32 block scales"):
        b.load_state_dict({"weight_codes": torch.zeros(32, 64, dtype=torch.int8), "weight_scale": torch.zeros(3),
                           "bias": torch.zeros(32)})
    with pytest.raises(RuntimeError, match="Missing"):
        b.load_state_dict({"bias": torch.zeros(32)})


def test_non_finite_update_is_refused_and_leaves_the_weight_unchanged():
    from efft.quant.trainable import int8_update

    layer = Int8TrainableLinear.from_linear(nn.Linear(64, 8, bias=False))
    codes, scale, sr = layer.weight_codes.clone(), layer.weight_scale.clone(), layer.sr_state.clone()
    with pytest.raises(FloatingPointError, match="non-finite"):
        with torch.no_grad(), int8_update(layer.weight) as p:
            p[0, 0] = float("nan")
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.sr_state, sr) and layer.weight.untyped_storage().nbytes() == 4
    assert not layer._materialized
    layer(torch.randn(2, 64))  # still usable
