"""Recipe combinations offload refuses, with the path and a reason, before anything loads."""
import pytest

from efft.offload import recipe_problems

config = pytest.importorskip("efft.config")


def recipe(**sections):
    data = {"model": {"config": {"model_type": "llama"}}, "data": {"path": "x.jsonl"}}
    data.update(sections)
    return config.Recipe.model_validate(data)


def test_supported_combination_has_no_problems():
    r = recipe(offload={"optimizer": True, "activations": True}, train={"bf16": True, "gradient_checkpointing": True},
               optim={"name": "galore"})
    assert recipe_problems(r) == []


@pytest.mark.parametrize("sections,path,words", [
    ({"optim": {"name": "adamw", "layerwise": True}}, "offload.optimizer", "layerwise"),
    ({"optim": {"name": "adamw8bit"}}, "offload.optimizer", "8-bit"),
    ({"optim": {"name": "adamw", "state_bits": 8}}, "offload.optimizer", "8-bit"),
    ({"train": {"fp16": True}}, "offload.optimizer", "bf16"),
])
def test_optimizer_offload_refusals(sections, path, words):
    problems = recipe_problems(recipe(offload={"optimizer": True}, **sections))
    assert len(problems) == 1 and problems[0][0] == path and words in problems[0][1]
    assert recipe_problems(recipe(**sections)) == []  # fine without offload


def test_checkpoint_inputs_needs_checkpointing():
    r = recipe(offload={"activations": True, "activation_mode": "checkpoint_inputs"})
    assert [p for p, _ in recipe_problems(r)] == ["offload.activation_mode"]
    r = recipe(offload={"activations": True, "activation_mode": "checkpoint_inputs"}, train={"gradient_checkpointing": True})
    assert recipe_problems(r) == []
