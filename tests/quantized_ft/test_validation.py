"""Combinations that cannot work are refused before training, with the recipe path in the message."""
import pytest

from efft.config import Recipe, RecipeError, load_recipe, validate
from efft.quant.trainable import int8_training_problems, prepare_int8_training, validate_int8_training
from tests.quantized_ft.helpers import int8_cfg
from tests.tiny import tiny_model

BASE = {
    "model": {"config": {"model_type": "llama", "hidden_size": 64}},
    "data": {"path": "data/quickstart.jsonl"},
    "quant": {"type": "int8", "trainable": True},
}


def _recipe(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    # the schema alone (no cross-section rules), so each rule can be checked by itself
    return Recipe.model_validate(data)


def test_a_plain_int8_recipe_passes():
    r = _recipe(optim={"name": "apollo_mini", "rank": 1, "layerwise": True})
    assert int8_training_problems(r) == []
    validate_int8_training(r)


@pytest.mark.parametrize("section, values, path, words", [
    ("adapter", {"type": "lora"}, "adapter.type", "cannot sit on trainable int8"),
    ("quant", {"outlier_threshold": 6.0}, "quant.outlier_threshold", "outlier columns"),
    ("quant", {"kernel": "triton"}, "quant.kernel", "torch path"),
    ("offload", {"optimizer": True}, "offload.optimizer", "not wired"),
    ("quant", {"type": "nf4"}, "quant.trainable", "need quant.type: int8"),
])
def test_bad_combinations_are_refused_with_their_path(section, values, path, words):
    r = _recipe(**{section: values})
    with pytest.raises(RecipeError) as e:
        validate_int8_training(r)
    assert any(p == path and words in m for p, m in e.value.problems), e.value.problems


def test_all_problems_are_reported_at_once():
    r = _recipe(adapter={"type": "dora"}, quant={"outlier_threshold": 6.0, "kernel": "triton"}, offload={"optimizer": True})
    with pytest.raises(RecipeError) as e:
        validate_int8_training(r)
    assert len(e.value.problems) == 4


def test_the_schema_refuses_lora_on_trainable_int8_too():
    data = {**BASE, "adapter": {"type": "lora"}}
    with pytest.raises(RecipeError, match="cannot sit on trainable int8"):
        validate(data)


def test_lora_or_frozen_quantized_layers_on_the_model_are_refused():
    import peft

    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA adapters"):
        prepare_int8_training(model, int8_cfg())


def test_the_8b_recipe_validates():
    r = load_recipe("recipes/llama3-8b-int8-apollo-mini.yaml", weights=False)
    validate_int8_training(r)
    assert r.quant.trainable and r.optim.name == "apollo_mini" and r.optim.layerwise
    assert r.train.gradient_checkpointing and r.sparsity.loss_tokens.enabled and r.target_gpu_memory


def test_sampled_linear_on_trainable_int8_is_allowed_but_not_with_weight_streaming():
    assert int8_training_problems(_recipe(sparsity={"sampled_linear": {"enabled": True}})) == []
    r = _recipe(sparsity={"sampled_linear": {"enabled": True}}, offload={"weights": True}, optim={"layerwise": True})
    assert any(p == "sparsity.sampled_linear.enabled" and "offload.weights" in m for p, m in int8_training_problems(r))
