"""Int8 trainable weights with efft's optimizer factory (all four optimizers, layer-wise or not) and
with the recipe -> Trainer path (efft.train.train), including an exact resume."""

import pytest
import torch
from safetensors.torch import load_file

from efft import config
from efft.config import OptimConfig
from efft.optim.factory import build_optimizer
from efft.quant.trainable import int8_layers
from tests.quantized_ft.helpers import assert_codes_within_one, assert_same_state, batches, int8_model, int8_state


def _run(model, opt, data, accumulate=1):
    for i in range(0, len(data), accumulate):
        for b in data[i:i + accumulate]:
            (model(**b).loss / accumulate).backward()
        opt.step()
        opt.zero_grad()


def _build(model, layerwise, accumulate=1, **cfg):
    return build_optimizer(model, OptimConfig(layerwise=layerwise, **cfg), lr=2e-3,
                           gradient_accumulation_steps=accumulate, max_grad_norm=0.0)


def test_factory_puts_int8_weights_in_low_rank_groups():
    model = int8_model()
    opt = _build(model, False, name="apollo_mini")
    carriers = {id(m.weight) for m in int8_layers(model)}
    low = [g for g in opt.param_groups if "rank" in g]
    assert len(low) == 1 and {id(p) for p in low[0]["params"]} == carriers


def test_factory_layerwise_apollo_mini_equals_its_whole_step_mode():
    data = batches(3)
    a, b = int8_model(), int8_model()
    _run(a, _build(a, False, name="apollo_mini"), data)
    params = [p for p in b.parameters() if p.requires_grad]
    alive, materialized = [], []

    def probe(p):
        alive.append(sum(q.grad.numel() * 4 for q in params if q.grad is not None))
        materialized.append(sum(m._materialized for m in int8_layers(b)))

    for p in params:
        p.register_post_accumulate_grad_hook(probe)
    opt = _build(b, True, name="apollo_mini")
    _run(b, opt, data)
    assert_same_state(a, b)
    assert not any(m._materialized for m in int8_layers(b))
    # efft's LayerwiseOptimizer: one gradient alive, at most two float32 weights materialized
    assert max(alive) == 4 * max(p.numel() for p in params)
    assert 1 <= max(materialized) <= 2


@pytest.mark.parametrize("name", ["adamw", "galore", "apollo", "frugal"])
def test_every_efft_optimizer_trains_int8_weights_layerwise_and_not(name):
    data = batches(4)
    extra = {"rank": 8, "update_proj_gap": 2} if name != "adamw" else {}
    for layerwise in (False, True):
        model = int8_model()
        before = int8_state(model)
        opt = _build(model, layerwise, name=name, **extra)
        with torch.no_grad():
            l0 = sum(model(**b).loss.item() for b in data)
        _run(model, opt, data * 3)
        with torch.no_grad():
            l1 = sum(model(**b).loss.item() for b in data)
        after = int8_state(model)
        changed = sum(int((after[k][0] != before[k][0]).sum()) for k in after)
        assert changed > 0 and l1 < l0 - 0.05, (name, layerwise, l0, l1, changed)
        assert all(m.weight.untyped_storage().nbytes() == 4 for m in int8_layers(model))


def test_factory_layerwise_galore_with_accumulation_matches_one_large_batch():
    full = batches(2, batch=4)
    halves = []
    for b in full:
        halves += [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    a, b = int8_model(), int8_model()
    _run(a, _build(a, True, name="galore", rank=8), full)
    _run(b, _build(b, True, accumulate=2, name="galore", rank=8), halves, accumulate=2)
    assert_codes_within_one(int8_state(a), int8_state(b))


TINY = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _recipe(data_path, out, **train):
    t = {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
         "logging_steps": 1, "save_steps": 3, "seed": 3, "lr_scheduler_type": "cosine", "warmup_steps": 1,
         "gradient_checkpointing": True}
    t.update(train)
    return config.validate({
        "model": {"config": TINY}, "data": {"path": str(data_path), "max_seq_length": 64}, "train": t,
        "quant": {"type": "int8", "trainable": True, "compute_dtype": "float32"},
        "optim": {"name": "apollo_mini", "layerwise": True},
        "sparsity": {"loss_tokens": {"enabled": True}},
    })


def test_recipe_trains_through_trainer_and_resumes_exactly(data_path, tmp_path):
    from transformers import TrainerCallback

    from efft.train import train

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 3:
                control.should_training_stop = True

    full = train(_recipe(data_path, tmp_path / "full"))
    assert full["global_step"] == 6 and full["last_loss"] < full["first_loss"]
    part = tmp_path / "part"
    first = train(_recipe(data_path, part), trainer_hook=lambda tr: tr.add_callback(StopAt()))
    assert first["global_step"] == 3
    second = train(_recipe(data_path, part, resume_from_checkpoint=True))
    assert second["global_step"] == 6
    curve = lambda c: [l for _, l in c["loss_curve"]]  # noqa: E731
    assert curve(second) == curve(full)
    # the final int8 files (codes, scales, rounding-stream state) are bit-identical; final/ itself
    # holds the plain bf16 export (efft.compose.save_final)
    a = load_file(tmp_path / "full" / "final" / "int8" / "model.safetensors")
    b = load_file(part / "final" / "int8" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("weight_codes") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(a[k].dtype == torch.int8 for k in a if k.endswith("weight_codes"))


def test_bfloat16_model_with_bfloat16_compute_trains():
    """The 8B recipe's precision: bf16 model (norms, frozen embedding/head), bf16 matmuls, float32
    gradients, update and block scales for the int8 weights."""
    from efft.quant.trainable import prepare_int8_training
    from tests.quantized_ft.helpers import int8_cfg
    from tests.tiny import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16)
    cfg = int8_cfg()
    cfg.compute_dtype = "bfloat16"
    prepare_int8_training(model, cfg)
    layer = int8_layers(model)[0]
    assert layer.compute_dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    opt = _build(model, True, name="apollo_mini")
    data = batches(2)
    with torch.no_grad():
        l0 = sum(model(**b).loss.float().item() for b in data)
    _run(model, opt, data * 4)
    with torch.no_grad():
        out = model(**data[0])
        l1 = sum(model(**b).loss.float().item() for b in data)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert l1 < l0 - 0.05, (l0, l1)
    assert opt.state[layer.weight]["exp_avg"].dtype == torch.float32


def test_trainable_embeddings_with_8bit_state():
    """Embedding/head option "8-bit state": embeddings="trainable" (full precision) with bitsandbytes'
    AdamW8bit (optim.name: adamw8bit); the int8 weights' update goes through the same step."""
    model = int8_model(embeddings="trainable")
    opt = _build(model, False, name="adamw8bit")
    data = batches(2)
    with torch.no_grad():
        l0 = sum(model(**b).loss.item() for b in data)
    _run(model, opt, data * 4)
    with torch.no_grad():
        l1 = sum(model(**b).loss.item() for b in data)
    assert l1 < l0 - 0.05, (l0, l1)
    for p in (model.model.embed_tokens.weight, model.lm_head.weight, int8_layers(model)[0].weight):
        st = opt.state[p]
        assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    assert all(m.weight.untyped_storage().nbytes() == 4 for m in int8_layers(model))
