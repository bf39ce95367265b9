"""Composes the plugins from a recipe: checks, model preparation, the optimizer, the final save.

The CLI loop (efft/train.py) and the Trainer plugin (efft/integrations/transformers.py) both call
these functions, so a recipe gives the same model and optimizer either way. Each plugin is a
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
    if recipe.train.fsdp:
        from efft.integrations.fsdp import fsdp_problems

        problems += fsdp_problems(recipe)
    return problems


def check_recipe(recipe: Recipe) -> None:
    """Raise RecipeError listing every plugin-level problem, before any weight loads."""
    from efft.config import RecipeError

    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError(problems)


def sparsity_enabled(recipe: Recipe) -> bool:
    s = recipe.sparsity
    return any(getattr(s, k).enabled for k in ("loss_tokens", "token_elimination", "sampled_linear", "partial", "recompute"))


def prepare_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Quantize -> adapter -> sparsity -> activation offload -> weight streaming, in that order (each
    sees the last). Weight streaming (``offload.weights``) moves the int8 decoder layers' master copy
    to host memory; it stays installed for the model's life (the model cannot run without it)."""
    q, a = recipe.quant, recipe.adapter
    if q.trainable:  # the schema allows no adapter beside trainable int8 weights
        from efft.quant.trainable import prepare_int8_training

        model = prepare_int8_training(model, q, embeddings=q.embeddings, seed=recipe.train.seed, host_cfg=recipe.offload)
    else:
        from efft.quant import QuantLinear, prepare

        already = any(isinstance(m, QuantLinear) for m in model.modules())  # built quantized from a checkpoint
        model = prepare(model, None if already else q, a)  # quantize (or not), then lora | dora | peqa | none
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
    if recipe.offload.weights:
        from efft.offload.weights import enable_weight_streaming

        enable_weight_streaming(model, recipe.offload)  # kept as model._efft_weight_stream
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
    from efft.offload.host_embeddings import host_resident_parameters

    host = host_resident_parameters(model)
    if host:  # quant.embeddings: host: the recipe's optimizer on the device, AdamW on the CPU for these
        from efft.offload.host_optimizer import host_params_optimizer

        main = _build(model, recipe.optim, exclude=host, **kwargs)
        return host_params_optimizer(main, host, recipe.offload, lr=t.learning_rate, weight_decay=t.weight_decay,
                                     betas=kwargs["betas"], eps=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
                                     gradient_accumulation_steps=t.gradient_accumulation_steps,
                                     state_bits=recipe.optim.state_bits,
                                     order=[p for p in model.parameters() if p.requires_grad])
    return _build(model, recipe.optim, **kwargs)


def save_final(trainer, tokenizer, out_dir, recipe: Recipe):
    """The trained result in the form each method loads back from, under ``out_dir`` (rank 0 only):
    peft adapters; PEQA as a 4-bit (bitsandbytes-layout) model; int8-trained weights as a plain
    bf16 ``from_pretrained`` model plus the int8 file; PaCA's trained columns as a small adapter;
    otherwise the full model. All safetensors. Under FSDP every rank must call it (gathers)."""
    from pathlib import Path

    from efft.integrations.fsdp import full_parameters

    out_dir = Path(out_dir)
    with full_parameters(trainer.model):  # FSDP: every rank gathers, rank 0 writes
        if recipe.quant.trainable or recipe.adapter.type == "peqa" or recipe.sparsity.partial.enabled:
            if trainer.is_world_process_zero():
                _save_exported(trainer.model, tokenizer, out_dir, recipe)
        else:
            trainer.save_model(str(out_dir))  # adapters only for peft models; tokenizer included
    return out_dir


def _save_exported(model, tokenizer, out_dir, recipe: Recipe) -> None:
    """save_final's forms that are not ``save_pretrained``: int8, PEQA's 4-bit layout, PaCA's columns."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.quant.trainable:
        from efft.quant.trainable import export_full_precision, save_int8_checkpoint

        export_full_precision(model, out_dir)
        save_int8_checkpoint(model, out_dir / "int8" / "model.safetensors")
    elif recipe.adapter.type == "peqa":
        from efft.quant import save_quantized
        from efft.quant.peqa import export_peqa

        save_quantized(export_peqa(model), str(out_dir))
    else:
        from efft.sparsity.partial import save_partial

        save_partial(model, out_dir)
        model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def close_optimizer(optimizer) -> None:
    """Take an efft optimizer's backward hooks off and stop its worker threads (None: nothing)."""
    for name in ("remove_hooks", "close"):
        fn = getattr(optimizer, name, None)
        if callable(fn):
            fn()


def release_model(model: nn.Module) -> None:
    """Remove the activation-offload hooks prepare_model installed, if any, and give back the host
    gradient buffers of host-resident embeddings (quant.embeddings: host)."""
    handle = getattr(model, "_efft_activation_offload", None)
    if handle is not None:
        handle.remove()
        del model._efft_activation_offload
    residency = getattr(model, "_efft_host_residency", None)
    if residency is not None:
        residency.release_grads()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of elements in the model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
