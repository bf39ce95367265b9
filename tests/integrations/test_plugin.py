"""A plain transformers training script plus a few plugin lines gives the same losses as `efft train`."""
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from efft import config
from efft.data import load_dataset_from_config, make_collator
from efft.integrations.transformers import EfftPlugin
from efft.tokenizer import byte_tokenizer
from efft.train import train
from tests.tiny import tiny_config

SECTIONS = {
    "optim": {"name": "apollo_mini", "rank": 1, "update_proj_gap": 5},
    "sparsity": {"loss_tokens": {"enabled": True, "chunk_size": 16}},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=320, hidden=32), attn_implementation="sdpa")
    tok = byte_tokenizer()
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"instruction": f"Spell {w} backwards.", "output": f"Answer: {w[::-1]}"} for w in
            ["cat", "planet", "river", "stone", "cloud", "garden", "window", "paper", "orange", "silver", "bridge", "forest"]]
    data = root / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, data


def test_plugin_in_plain_script_equals_efft_train(setup, tmp_path):
    root, data = setup
    train_kw = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3, seed=7, logging_steps=1,
                    lr_scheduler_type="linear", warmup_steps=0)
    recipe = config.validate({"model": {"path": str(root / "model"), "attn_implementation": "sdpa"},
                              "data": {"path": str(data), "max_seq_length": 64},
                              "train": {**train_kw, "output_dir": str(tmp_path / "cli")}, **SECTIONS})
    cli_losses = [l for _, l in train(recipe)["loss_curve"]]

    # --- the user's existing script -------------------------------------------------------------
    transformers.set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    train_ds, _ = load_dataset_from_config(recipe.data, tokenizer, seed=7)
    args = TrainingArguments(output_dir=str(tmp_path / "script"), use_cpu=True, report_to="none",
                             remove_unused_columns=False, save_strategy="no", **train_kw)
    # --- the lines efft adds ----------------------------------------------------------------------
    plugin = EfftPlugin(SECTIONS)
    model = plugin.prepare_model(model)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=make_collator(tokenizer, recipe.data),
                      **plugin.trainer_kwargs(model, args))
    # -----------------------------------------------------------------------------------------------
    trainer.train()
    script_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # the plugin's LabelRowsCallback made every training batch carry its label rows: no device read
    assert model._efft_loss_tokens.host_reads == 0

    assert len(cli_losses) == 6
    assert script_losses == pytest.approx(cli_losses, rel=1e-6, abs=1e-7)
    assert cli_losses[-1] < cli_losses[0]


def test_conflicting_training_arguments_are_listed(setup, tmp_path):
    plugin = EfftPlugin({**SECTIONS, "train": {"learning_rate": 1e-3}, "quant": {"type": "int8", "trainable": True,
                                                                                  "compute_dtype": "bfloat16"}})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=5e-4,
                             optim="adafactor", fp16=False)
    with pytest.raises(config.RecipeError) as e:
        plugin.trainer_kwargs(torch.nn.Linear(2, 2), args)
    paths = dict(e.value.problems)
    assert "optim" in paths and "adafactor" in paths["optim"]
    assert "train.learning_rate" in paths and "0.0005" in paths["train.learning_rate"]


def test_recipe_checkpointing_that_the_training_arguments_leave_off_is_refused(tmp_path):
    """The recipe's train.gradient_checkpointing was not compared (renamed activation_checkpointing in
    transformers 5), so a recipe asking for it trained without it under the plugin, silently."""
    plugin = EfftPlugin({**SECTIONS, "train": {"gradient_checkpointing": True}})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(config.RecipeError) as e:
        plugin.trainer_kwargs(torch.nn.Linear(2, 2), args)
    assert "recipe says True" in dict(e.value.problems)["train.gradient_checkpointing"]
    agreeing = plugin.training_arguments(output_dir=str(tmp_path), use_cpu=True)
    assert plugin.trainer_kwargs(AutoModelForCausalLM.from_config(tiny_config("llama", hidden=32)), agreeing)["optimizers"][0]


def test_rebuilding_the_optimizer_detaches_the_old_one():
    """Re-running a notebook cell builds a second layer-wise optimizer: the first must stop training."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", learning_rate=1e-2, max_grad_norm=0.0)
    plugin = EfftPlugin({"optim": {"name": "adamw", "layerwise": True}})
    first = plugin.trainer_kwargs(m, TrainingArguments(output_dir="unused", use_cpu=True, report_to="none",
                                                       learning_rate=1e-6, max_grad_norm=0.0))["optimizers"][0]
    second = plugin.trainer_kwargs(m, args)["optimizers"][0]
    assert first is not second
    w0 = m[0].weight.detach().clone()
    m(torch.ones(2, 4)).sum().backward()
    second.step()
    # lr 1e-2 (the second optimizer), not 1e-6 (the first): AdamW's first step moves each weight by ~lr
    assert (m[0].weight - w0).abs().max().item() == pytest.approx(1e-2, rel=0.01)


def test_recipe_object_with_overrides_and_dict_without_data():
    recipe = config.load_recipe("tiny-smoke")
    assert EfftPlugin(recipe, ["adapter.type=lora"]).recipe.adapter.type == "lora"
    assert EfftPlugin({"optim": {"name": "apollo_mini"}}).recipe.optim.name == "apollo_mini"


def test_trainer_kwargs_needs_the_training_arguments():
    with pytest.raises(TypeError, match="args"):
        EfftPlugin({"optim": {"name": "adamw"}}).trainer_kwargs(torch.nn.Linear(2, 2))
