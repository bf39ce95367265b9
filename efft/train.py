"""The training loop behind ``efft train``: transformers.Trainer driven by the EfftPlugin.

recipe -> model (+quant, +adapter, +sparsity, +offload) -> optimizer -> Trainer -> checkpoints,
final weights (safetensors), run card and memory report.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import transformers
from transformers import Trainer

from efft import card as cards
from efft.config import Recipe, recipe_to_dict
from efft.integrations.transformers import EfftPlugin, last_checkpoint


def _resume_target(recipe: Recipe) -> str | None:
    r = recipe.train.resume_from_checkpoint
    out = Path(recipe.train.output_dir)
    if r is True:
        found = last_checkpoint(out)
        if found is None:
            print(f"efft: no complete checkpoint in {out}; starting from step 0")
        return found
    if not r and out.is_dir() and any(d.name.startswith("checkpoint-") for d in out.iterdir()):
        from efft.config import RecipeError

        raise RecipeError([("train.output_dir", f"{str(out)!r} holds checkpoints of an earlier run: set "
                                                "train.resume_from_checkpoint=true to continue it, or choose another output_dir")])
    if isinstance(r, str) and r:
        if not (Path(r) / "trainer_state.json").is_file():
            from efft.config import RecipeError

            raise RecipeError([("train.resume_from_checkpoint", f"not a checkpoint directory (no trainer_state.json): {r!r}")])
        return r
    return None


def _problem(section: str, err: Exception):
    """A loading error about the user's recipe as a RecipeError, at the path its message starts with
    (``"model.config: ..."`` -> ``model.config``), else at ``section``."""
    from efft.config import RecipeError

    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head and (head == section or head.startswith(section + ".")):
        return RecipeError([(head, rest)])
    return RecipeError([(section, msg)])


def _check_reporters(recipe: Recipe) -> None:
    """``train.report_to``: names transformers knows and whose package is installed, checked before
    loading (Trainer would raise only after the model and data are loaded)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    from efft.config import RecipeError

    known, installed = list(INTEGRATION_TO_CALLBACK), get_available_reporting_integrations()
    problems = []
    for name in recipe.train.report_to:
        if name in ("none", "all") or name in installed:
            continue
        if name not in known:
            problems.append(("train.report_to", f"unknown reporter {name!r} (allowed: none, all, {', '.join(known)})"))
        else:
            problems.append(("train.report_to", f"{name!r} is not installed here (installed: {', '.join(installed) or 'none'}); "
                                                f"pip install {name}, or leave it out"))
    if problems:
        raise RecipeError(problems)


def _check_fits(recipe: Recipe) -> None:
    """With ``target_gpu_memory`` set, plan before loading anything and refuse what cannot fit."""
    if not recipe.target_gpu_memory:
        return
    from efft.config import RecipeError
    from efft.memory import estimate as est

    try:
        plan = est.estimate(recipe, gpu_memory=est.parse_size(recipe.target_gpu_memory))
    except ValueError as e:  # a family the planner has no activation model for: train anyway
        print(f"efft: no memory plan ({e})")
        return
    if plan.fits is False:
        fix = f"; {plan.suggestion}" if plan.suggestion else ""
        raise RecipeError([("target_gpu_memory", f"{plan.verdict}{fix}")])
    print(f"efft: {plan.verdict}")


def train(recipe: Recipe, recipe_path: str | None = None, *, trainer_hook=None) -> dict:
    """Run a validated recipe end to end; returns the run card (also written to output_dir).

    ``trainer_hook(trainer)`` is called before ``trainer.train()`` (tests use it to add callbacks).
    """
    from efft.data import load_dataset_from_config, make_collator
    from efft.model import generate_answers, load_model

    from efft.compose import check_recipe

    check_recipe(recipe)  # plugin-level refusals come before any weight loads
    if recipe.train.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        from efft.config import RecipeError
        from efft.integrations.fsdp import ALONE

        raise RecipeError([("train.fsdp", ALONE)])
    _check_reporters(recipe)
    _check_fits(recipe)
    t = recipe.train
    out_dir = Path(t.output_dir)
    resume = _resume_target(recipe)
    transformers.set_seed(t.seed)
    started = time.time()

    try:
        model, tokenizer = load_model(recipe.model, quant=recipe.quant)
    except (ValueError, OSError) as e:  # the user's model.config, model.tokenizer, missing wheel or files
        raise _problem("model", e) from None
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks and writes
    prompts = recipe.generate.prompts if main else []
    before = generate_answers(model, tokenizer, prompts, recipe.generate.max_new_tokens) if prompts else []

    if recipe.data.packing:
        from efft.data import packing_problem

        problem = packing_problem(model)
        if problem:
            from efft.config import RecipeError

            raise RecipeError([("data.packing", problem)])
    plugin = EfftPlugin(recipe)
    plugin.resume_from = resume  # under FSDP its callback loads the optimizer state from this checkpoint
    model = plugin.prepare_model(model)
    try:
        train_ds, eval_ds = load_dataset_from_config(recipe.data, tokenizer, seed=t.seed)
    except (ValueError, KeyError) as e:  # fields, formats, sizes of the user's data
        raise _problem("data", e) from None
    args = plugin.training_arguments()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=make_collator(tokenizer, recipe.data),
        processing_class=tokenizer,
        **plugin.trainer_kwargs(model, args),
    )
    if trainer_hook is not None:
        trainer_hook(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        memory = plugin.callback.memory_report()  # before closing gives host buffers back
    finally:  # hooks and worker threads must not outlive the run (a notebook keeps the model)
        from efft.compose import close_optimizer, release_model

        close_optimizer(plugin.optimizer)
        release_model(model)
        plugin.callback.stop_measuring()
    from efft.compose import save_final, trainable_parameters

    final_dir = save_final(trainer, tokenizer, out_dir / "final", recipe)

    # FSDP: every forward gathers on all ranks, so all ranks generate (greedy, same weights: in step)
    asked = recipe.generate.prompts if recipe.train.fsdp else prompts
    after = generate_answers(trainer.model, tokenizer, asked, recipe.generate.max_new_tokens) if asked else []
    cb = plugin.callback
    curve = cards.loss_curve(trainer.state.log_history)
    n_train, n_total = trainable_parameters(trainer.model)
    card = {
        "recipe_name": Path(recipe_path).stem if recipe_path else "recipe",
        "recipe": recipe_to_dict(recipe),
        "versions": cards.package_versions(),
        "device": cards.device_description(),
        "global_step": trainer.state.global_step,
        "steps_this_run": trainer.state.global_step - cb.start_step,
        "resumed_from": resume,
        "train_seconds": cb.train_seconds,
        "wall_seconds": time.time() - started,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": cb.tokens_per_second,
        "train_loss": result.training_loss,
        "first_loss": curve[0][1] if curve else None,
        "last_loss": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "trainable_params": n_train,
        "total_params": n_total,
        "memory": memory,
        "final_dir": str(final_dir),
        "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)],
    }
    if trainer.is_world_process_zero():
        cards.write_card(out_dir, card)
        _print_summary(card, cb)
    return card


def _print_summary(card: dict, cb) -> None:
    from efft.memory.tracker import format_report

    print()
    first, last = card["first_loss"], card["last_loss"]
    trend = f"; loss {first:.4f} -> {last:.4f}" if first is not None and last is not None else ""
    resumed = f" (resumed at step {card['global_step'] - card['steps_this_run']})" if card["resumed_from"] else ""
    print(f"efft: {card['steps_this_run']} steps in {card['train_seconds']:.1f} s{resumed}{trend}")
    print(format_report(card["memory"]))
    for g in card["generations"]:
        print(f"\nprompt: {g['prompt']}\n  before: {g['before']}\n  after:  {g['after']}")
    print(f"\nrun card: {Path(card['final_dir']).parent / 'card.md'}")
