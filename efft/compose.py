"""Composes the plugins from a recipe: model preparation and the optimizer.

The CLI loop (efft/train.py) and the Trainer plugin (efft/integrations/transformers.py) both call
these two functions, so a recipe gives the same model and optimizer either way. Each plugin is a
function of (model, its section) or (params, its section); none imports another.
"""
from __future__ import annotations

import torch
from torch import nn

from efft.config import Recipe


def recipe_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """What each plugin refuses in this recipe, beyond the schema: ``(path, message)`` pairs."""
    from efft.offload.checks import recipe_problems as offload_problems
    from efft.quant.trainable import int8_training_problems
    from efft.sparsity import sparsity_problems

    problems = []
    if sparsity_enabled(recipe):
        problems += sparsity_problems(recipe.sparsity)
    problems += int8_training_problems(recipe)
    problems += offload_problems(recipe)
    return problems


def check_recipe(recipe: Recipe) -> None:
    """Raise RecipeError listing every plugin-level problem, before any weight loads."""
    from efft.config import RecipeError

    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError(problems)


def sparsity_enabled(recipe: Recipe) -> bool:
    s = recipe.sparsity
    return any(getattr(s, k).enabled for k in ("loss_tokens", "token_elimination", "sampled_linear", "partial"))


def prepare_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Quantize -> adapter -> sparsity -> activation offload, in that order (each sees the last)."""
    q, a = recipe.quant, recipe.adapter
    if q.type != "none":
        if q.trainable:
            from efft.quant.trainable import prepare_int8_training

            model = prepare_int8_training(model, q)
        else:
            from efft.quant import quantize_model

            model = quantize_model(model, q)
    if a.type in ("lora", "dora"):
        from efft.quant.peft import apply_lora

        model = apply_lora(model, a)
    elif a.type == "peqa":
        from efft.quant.peqa import prepare_peqa

        model = prepare_peqa(model)
    if sparsity_enabled(recipe):
        from efft.sparsity import apply_sparsity

        model = apply_sparsity(model, recipe.sparsity)
    if recipe.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        # Frozen embeddings (adapters, quantized bases) would leave checkpointed blocks without a
        # grad-requiring input, and their parameters without gradients.
        model.enable_input_require_grads()
    if recipe.offload.activations:
        from efft.offload.activations import enable_activation_offload

        model._efft_activation_offload = enable_activation_offload(model, recipe.offload)
    return model


def build_optimizer(model: nn.Module, recipe: Recipe, train=None) -> torch.optim.Optimizer:
    """The recipe's optimizer over the model's trainable parameters (offloaded if asked).

    Learning rate, weight decay, betas, eps, clipping and accumulation come from ``train``: the
    user's ``TrainingArguments`` under the plugin, the recipe's ``train`` section (same names) in
    the CLI, so Trainer's scheduler and the optimizer agree."""
    from efft.optim.factory import build_optimizer as _build

    t = train if train is not None else recipe.train
    kwargs = dict(
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
    )
    if recipe.offload.optimizer:
        from efft.offload.optimizer import offload_optimizer

        return offload_optimizer(_build(model, recipe.optim, **kwargs), recipe.offload)
    return _build(model, recipe.optim, **kwargs)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of elements in the model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
