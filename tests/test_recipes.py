"""Every shipped recipe trains end to end with its model swapped for a tiny config of the same family.

This is where the plugins meet: quantized bases under adapters, projected optimizers in layer-wise
mode, loss-token skipping with token elimination and activation offload, trainable int8 weights.
"""
import json

import pytest
import yaml

from efft import config
from efft.train import train

FAMILY = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "smollm2": "llama"}


def tiny_block(recipe) -> dict:
    arch = recipe.model.architecture or recipe.model.builtin or "llama"
    family = next(v for k, v in FAMILY.items() if arch.startswith(k) or k in arch)
    return {"model_type": family, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", [p for p in config.list_recipes() if p.stem != "tiny-smoke"], ids=lambda p: p.stem)
def test_recipe_smoke_runs_on_a_tiny_model_of_its_family(path, tmp_path):
    recipe = config.load_recipe(path, weights=False)
    block = tiny_block(recipe)
    overrides = [
        "model.architecture=null", "model.path=null", "model.builtin=null", f"model.config={json.dumps(block)}",
        "model.dtype=float32", "train.bf16=false", "train.max_steps=3", "train.num_train_epochs=1",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.logging_steps=1",
        f"train.output_dir={tmp_path}", "train.save_steps=100", "data.max_seq_length=96", "generate.prompts=[]",
        "quant.compute_dtype=float32", "quant.blocksize=32",
    ]
    if recipe.optim.name in ("galore", "apollo", "frugal"):
        overrides.append("optim.rank=8")
    tiny = config.load_recipe(path, overrides)
    card = train(tiny, recipe_path=str(path))
    assert card["global_step"] == 3
    losses = [l for _, l in card["loss_curve"]]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)  # finite, sane
    assert (tmp_path / "card.json").is_file()
    final = tmp_path / "final"
    if tiny.quant.trainable:  # a plain bf16 model any transformers code loads, plus the int8 file
        from transformers import AutoModelForCausalLM

        assert (final / "int8" / "model.safetensors").is_file()
        assert AutoModelForCausalLM.from_pretrained(final).config.model_type == block["model_type"]
    elif tiny.adapter.type == "peqa":  # the 4-bit layout, quantization_config in config.json
        assert "quantization_config" in json.loads((final / "config.json").read_text())
        assert (final / "model.safetensors").is_file()
    elif tiny.adapter.type in ("lora", "dora"):
        assert (final / "adapter_model.safetensors").is_file()
    elif tiny.sparsity.partial.enabled:
        assert (final / "paca_adapter.safetensors").is_file()
    else:
        assert (final / "model.safetensors").is_file()


def test_large_recipes_state_a_target_that_the_planner_agrees_with():
    from efft.memory import estimate as est

    for path in config.list_recipes():
        target = yaml.safe_load(path.read_text()).get("target_gpu_memory")
        if path.stem == "tiny-smoke":
            continue
        assert target, f"{path.name} states no target_gpu_memory"
        plan = est.estimate(config.load_recipe(path, weights=False), gpu_memory=est.parse_size(target), suggest=False)
        assert plan.fits, f"{path.name}: planned peak does not fit its own target {target}"
