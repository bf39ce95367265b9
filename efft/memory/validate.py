"""Build what a recipe trains on CPU (tiny shapes) and measure it, to check the planner against
real tensors: used by tests/memory and by ``python -m efft.memory.card``.

The model is built from the recipe's ``model`` section and prepared by ``efft.compose.prepare_model``
(quantization, adapters, PEQA, efft.sparsity: the training code path); gradient checkpointing is reentrant here so that the recompute of each layer in
backward passes through the saved-tensor hooks (transformers' default, non-reentrant, hides it).
With ``train.bf16`` / ``train.fp16`` the forward runs under autocast as training runs it (``autocast_for``).
"""
from __future__ import annotations

from typing import Any

import torch

from . import estimate as est
from .tracker import count_saved_tensors, gradient_bytes, optimizer_state_bytes, weight_bytes


def build(recipe_dict: Any, seed: int = 0):
    """(recipe, transformers config, model in train mode) for a recipe dict, real tensors on CPU."""
    from transformers import AutoModelForCausalLM

    r = est._recipe_from(recipe_dict)
    cfg = est.resolve_config(r.model)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=est._DTYPE[r.model.dtype],
                                             attn_implementation=r.model.attn_implementation)
    if r.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x name
            enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    from efft.compose import prepare_model

    # quantize -> adapter -> sparsity, as training does; activation offload (saved-tensor hooks of
    # its own) is left to the caller, who measures it through its stats
    prep = r.model_copy(update={"offload": r.offload.model_copy(update={"activations": False})})
    model = prepare_model(model, prep)
    model.train()
    return r, cfg, model


def autocast_for(r, device_type: str = "cpu"):
    """The autocast training enters for recipe ``r``'s forward: with ``train.bf16`` / ``train.fp16``
    Trainer (through accelerate's ``prepare_model``) wraps ``model.forward`` in
    ``torch.autocast(device_type, dtype=bfloat16 / float16)`` with the default weight-cast cache;
    the loss is computed inside the forward, backward runs outside it (reentrant checkpointing
    re-enters the forward's autocast state for its recompute). A no-op context without either flag."""
    import contextlib

    if r.train.bf16:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if r.train.fp16:
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def batch_for(r, cfg, seed: int = 0, label_fraction: float = 1.0, label_rows: bool = False) -> dict:
    """Random ids; labels on the last ``label_fraction`` of each row (a prompt without labels before).
    ``label_rows``: with loss-token skipping, the batch carries its label rows as training's collator
    makes it (the last block then computes the queries of each row's labels only, not of min(labels, seq)
    positions per row as the forward's own fallback does)."""
    g = torch.Generator().manual_seed(seed)
    b, s = r.train.per_device_train_batch_size, r.data.max_seq_length
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = ids.clone()
    labels[:, : s - int(round(label_fraction * s))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if label_rows and r.sparsity.loss_tokens.enabled:
        from efft.sparsity.label_rows import with_label_rows

        batch = with_label_rows(batch)
    return batch


def measure_activations(recipe_dict: Any, seed: int = 0, label_fraction: float = 1.0) -> tuple[int, int]:
    """(predicted, measured) peak live saved-tensor bytes over one forward + backward (the forward
    under the recipe's autocast, ``autocast_for``); the planner is given the prepared model (it reads
    what efft.sparsity installed)."""
    r, cfg, model = build(recipe_dict, seed)
    batch = batch_for(r, cfg, seed, label_fraction, label_rows=True)
    with count_saved_tensors(model) as c:
        with autocast_for(r):
            loss = model(**batch).loss
        loss.backward()
    pred = est.estimate(recipe_dict, label_fraction=label_fraction, model=model).details["activation_parts"]["peak"]
    return pred, c.peak_bytes


def measure_step(recipe_dict: Any, seed: int = 0) -> dict:
    """One training step with the optimizer efft's factory builds; (predicted, measured) bytes.
    Gradients: the most gradient bytes alive at once during backward."""
    from efft.optim.factory import build_optimizer

    r, cfg, model = build(recipe_dict, seed)
    peak = [0]

    def sample(_p):  # registered before the optimizer's hooks: sees each gradient before a layer-wise update frees it
        peak[0] = max(peak[0], gradient_bytes(model))

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(sample)
    opt = build_optimizer(model, r.optim, lr=1e-3)
    with autocast_for(r):
        loss = model(**batch_for(r, cfg, seed)).loss
    loss.backward()
    grads = max(peak[0], gradient_bytes(model))
    opt.step()
    w = weight_bytes(model)
    e = est.estimate(recipe_dict)
    return {
        "weights": (e.weights + e.adapters, w["total"]),
        "gradients": (e.gradients, grads),
        "optimizer_state": (e.optimizer_state, optimizer_state_bytes(opt)),
    }


def measure_peak(recipe_dict: Any, seed: int = 0, label_fraction: float = 1.0) -> dict:
    """A whole training step on CPU, measured: weights + optimizer state (exact, after a warm-up
    step so the state exists) + the peak of tensor bytes the step allocates (LiveTensorBytes:
    activations, gradients, temporaries). Returns predicted and measured totals and dynamic parts."""
    from efft.optim.factory import build_optimizer

    from .tracker import LiveTensorBytes

    r, cfg, model = build(recipe_dict, seed)
    opt = build_optimizer(model, r.optim, lr=1e-3)
    batch = batch_for(r, cfg, seed, label_fraction, label_rows=True)

    def step():
        with autocast_for(r):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with LiveTensorBytes() as live:
        step()
    static = weight_bytes(model)["total"] + optimizer_state_bytes(opt)
    e = est.estimate(recipe_dict, label_fraction=label_fraction, model=model)
    pred_static = e.weights + e.adapters + e.optimizer_state
    return {"total": (e.total, static + live.peak_bytes), "dynamic": (e.total - pred_static, live.peak_bytes),
            "static": (pred_static, static)}
