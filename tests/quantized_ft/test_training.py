"""Training on int8 weights: the update is the optimizer's high-precision update written back with
stochastic rounding; layer-wise equals whole-step; accumulation; exact resume; export."""
import torch
from torch import nn

from efft.optim import APOLLOAdamW
from efft.quant.stochastic import mix_seed, requantize
from efft.quant.trainable import (Int8LayerwiseOptimizer, Int8TrainableLinear, export_full_precision,
                                  int8_layers, load_int8_checkpoint, save_int8_checkpoint)
import efft.quant.trainable as trainable
from tests.quantized_ft.helpers import (apollo_mini_groups, assert_codes_within_one, assert_same_state, batches,
                                       int8_model, int8_state, train_steps)


def test_adamw_step_is_the_fp32_update_written_back_with_stochastic_rounding():
    torch.manual_seed(0)
    layer = Int8TrainableLinear.from_linear(nn.Linear(128, 48, bias=True), seed=11)
    codes0, scale0 = layer.weight_codes.clone(), layer.weight_scale.clone()
    w_ref = nn.Parameter(layer.dequantize().clone())
    b_ref = nn.Parameter(layer.bias.detach().clone())
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3, weight_decay=0.1)
    opt_ref = torch.optim.AdamW([w_ref, b_ref], lr=3e-3, weight_decay=0.1)
    x = torch.randn(8, 128)
    layer(x).square().sum().backward()
    nn.functional.linear(x, w_ref, b_ref).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-6, atol=1e-5)
    w_ref.grad.copy_(layer.weight.grad)  # same gradient bits, so the comparison below is exact
    opt.step()
    opt_ref.step()
    codes, scale, _ = requantize(w_ref.detach(), codes0, scale0, 64, "stochastic", seed=mix_seed(int(layer.sr_state[0]), 0))
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.bias.detach(), b_ref.detach())
    assert layer.sr_state[1] == 1 and layer.weight.untyped_storage().nbytes() == 4
    # AdamW's state is keyed on the carrier and full-size, as for a float weight
    assert opt.state[layer.weight]["exp_avg"].shape == (48, 128)


def test_layerwise_apollo_mini_equals_whole_step_and_keeps_one_gradient_alive():
    data = batches(3)
    a, b = int8_model(), int8_model()
    train_steps(a, APOLLOAdamW(apollo_mini_groups(a), lr=2e-3), data)

    params = [p for p in b.parameters() if p.requires_grad]
    alive, materialized = [], []

    def probe(p):  # registered before the optimizer's hook: sees the gradient just completed
        alive.append(sum(q.grad.numel() * 4 for q in params if q.grad is not None))
        materialized.append(sum(m._materialized for m in int8_layers(b)))

    for p in params:
        p.register_post_accumulate_grad_hook(probe)
    opt = Int8LayerwiseOptimizer(APOLLOAdamW(apollo_mini_groups(b), lr=2e-3))
    train_steps(b, opt, data)
    # same gradients, same per-parameter update, same rounding stream: bit-identical
    assert_same_state(a, b)
    # one parameter's float32 gradient at a time (the current one), no weight materialized between updates
    assert max(alive) == 4 * max(p.numel() for p in params)
    assert max(materialized) == 0
    assert all(p.grad is None for p in params)


def test_foreign_layerwise_hooks_see_a_materialized_weight():
    """An optimizer written without int8 in mind that updates ``p`` in place in its own post-accumulate-grad
    hook (the way efft/optim's layer-wise mode works) gets a real float32 weight; at most two layers are
    materialized at once and everything is written back by the end of backward."""
    data = batches(2)
    a, b = int8_model(), int8_model()
    opt_a = Int8LayerwiseOptimizer(torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.05))
    train_steps(a, opt_a, data)
    params = [p for p in b.parameters() if p.requires_grad]
    seen = []

    def foreign(p):
        seen.append(len(trainable._deferred))
        p.add_(p.grad, alpha=-0.05)
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(foreign)
    for batch in data:
        b(**batch).loss.backward()
        assert not trainable._deferred and not any(m._materialized for m in int8_layers(b))
    assert_same_state(a, b)
    assert 0 < max(seen) <= 1  # the current layer (plus the previous one being written back on entry)


def test_gradient_accumulation_in_layerwise_mode_matches_one_large_batch():
    full = batches(2, batch=4)
    halves = []
    for b in full:
        halves += [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    a, b = int8_model(), int8_model()
    train_steps(a, Int8LayerwiseOptimizer(torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-3)), full)
    opt = Int8LayerwiseOptimizer(torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-3),
                                 gradient_accumulation_steps=2)
    train_steps(b, opt, halves, accumulate=2)
    assert_codes_within_one(int8_state(a), int8_state(b), updates=2)  # two updates each, not four


def test_save_and_resume_continue_exactly(tmp_path):
    data = batches(6)

    def build():
        m = int8_model()
        return m, Int8LayerwiseOptimizer(APOLLOAdamW(apollo_mini_groups(m), lr=2e-3))

    ref, opt_ref = build()
    train_steps(ref, opt_ref, data)

    a, opt_a = build()
    train_steps(a, opt_a, data[:3])
    save_int8_checkpoint(a, tmp_path / "model.safetensors")
    torch.save(opt_a.state_dict(), tmp_path / "optimizer.pt")
    b, opt_b = build()
    load_int8_checkpoint(b, tmp_path / "model.safetensors")
    opt_b.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    train_steps(b, opt_b, data[3:])
    assert_same_state(ref, b)


def test_export_full_precision_loads_as_the_original_architecture(tmp_path):
    from transformers import AutoModelForCausalLM

    model = int8_model()
    train_steps(model, Int8LayerwiseOptimizer(APOLLOAdamW(apollo_mini_groups(model), lr=2e-3)), batches(2))
    batch = batches(1, seed=50)[0]
    with torch.no_grad():
        ref = model(**batch).logits
    export_full_precision(model, tmp_path / "fp32", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    assert not any(isinstance(m, Int8TrainableLinear) for m in plain.modules())
    for m in int8_layers(model):
        w = plain.get_submodule(m._name).weight
        assert torch.equal(w.detach(), m.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ref, rtol=0, atol=1e-5)
    export_full_precision(model, tmp_path / "bf16")
    plain16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert plain16.dtype == torch.bfloat16
    assert not hasattr(plain16.config, "efft_int8_trainable")
    # the int8 model survives the export untouched
    assert all(m.weight.untyped_storage().nbytes() == 4 for m in int8_layers(model))


def test_int8_update_context_for_custom_update_code():
    from efft.quant.trainable import int8_update

    layer = Int8TrainableLinear.from_linear(nn.Linear(64, 16, bias=False))
    codes0 = layer.weight_codes.clone()
    step = layer.weight_scale.repeat_interleave(64).view(16, 64)
    inner = (codes0.abs() <= 100).float()  # away from the range edge: no block is re-gridded
    with torch.no_grad(), int8_update(layer.weight) as p:
        assert p.untyped_storage().nbytes() == 16 * 64 * 4  # a real float32 weight inside
        p.add_(2 * step * inner)  # exactly two quantization steps up
    assert torch.equal(layer.weight_codes, codes0 + 2 * inner.to(torch.int8))
    assert layer.weight.untyped_storage().nbytes() == 4
    other = torch.zeros(3)
    with int8_update(other) as q:  # not a carrier: a no-op context
        assert q is other


def test_save_pretrained_round_trip_through_load_int8_pretrained(tmp_path):
    from efft.quant.trainable import load_int8_pretrained

    model = int8_model()
    train_steps(model, Int8LayerwiseOptimizer(APOLLOAdamW(apollo_mini_groups(model), lr=2e-3)), batches(2))
    model.save_pretrained(tmp_path)  # what Trainer checkpoints and efft's final save write
    back = load_int8_pretrained(tmp_path, attn_implementation="eager")  # tiny_model uses eager
    assert_same_state(model, back)
    batch = batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, back(**batch).logits)
    import pytest

    from tests.tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not an int8-trained"):
        load_int8_pretrained(tmp_path / "plain")


def test_layerwise_wrapper_under_transformers_trainer(tmp_path):
    """Int8LayerwiseOptimizer passed to Trainer: trains, Trainer's scheduler drives the lr the hooks use,
    and a Trainer built with another accumulation count is refused."""
    import pytest
    from transformers import Trainer, TrainingArguments

    model = int8_model()
    opt = Int8LayerwiseOptimizer(APOLLOAdamW(apollo_mini_groups(model), lr=2e-3))
    data = [{k: v[i] for k, v in b.items()} for b in batches(4) for i in range(2)]

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=2e-3,
                                 lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True, **kw)

    codes0 = {k: v[0] for k, v in int8_state(model).items()}
    tr = Trainer(model=model, args=args(), train_dataset=data, optimizers=(opt, None), callbacks=opt.trainer_callbacks())
    out = tr.train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    assert opt.param_groups[0]["lr"] == 0.0  # linear decay to zero at the last step: the scheduler drives the groups
    after = int8_state(model)
    assert all(int(after[k][2][1]) == 4 for k in after)  # four write-backs per layer, one per optimizer step
    assert sum(int((after[k][0] != codes0[k]).sum()) for k in after) > 0
    tr2 = Trainer(model=model, args=args(gradient_accumulation_steps=2), train_dataset=data, optimizers=(opt, None),
                  callbacks=opt.trainer_callbacks())
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        tr2.train()
