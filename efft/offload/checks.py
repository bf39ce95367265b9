"""Recipe combinations offload cannot serve, reported before any weight loads.

``recipe_problems(recipe)`` returns ``(path, message)`` pairs in the form ``efft.config`` collects
(duck-typed: any object with ``offload``, ``optim`` and ``train`` sections works).
"""
from __future__ import annotations

from typing import Any


def recipe_problems(recipe: Any) -> list[tuple[str, str]]:
    off = getattr(recipe, "offload", None)
    if off is None:
        return []
    optim, train = getattr(recipe, "optim", None), getattr(recipe, "train", None)
    p: list[tuple[str, str]] = []
    if getattr(off, "optimizer", False):
        if getattr(optim, "layerwise", False):
            p.append(("offload.optimizer", "cannot combine with optim.layerwise: both update parameters inside backward "
                                           "(offload already steps each parameter as its gradient arrives); keep one"))
        name, bits = getattr(optim, "name", None), getattr(optim, "state_bits", 32)
        if name == "adamw8bit" or (name == "adamw" and bits == 8 and not getattr(optim, "layerwise", False)):
            p.append(("offload.optimizer", "bitsandbytes' 8-bit AdamW keeps its state in its own paged buffers and has no "
                                           "per-parameter CPU step; use optim.name: adamw (or a projected optimizer) with offload"))
        if getattr(train, "fp16", False):
            p.append(("offload.optimizer", "fp16 loss scaling unscales (and may skip) gradients after backward, when the "
                                           "offloaded CPU steps have already used them; use train.bf16 instead"))
    if getattr(off, "weights", False):
        quant = getattr(recipe, "quant", None)
        if getattr(quant, "type", None) != "int8" or not getattr(quant, "trainable", False):
            p.append(("offload.weights", "streams the decoder layers' trainable int8 weights from host memory: set "
                                         "quant.type: int8 and quant.trainable: true (other weights are not streamed)"))
        if not getattr(optim, "layerwise", False):
            p.append(("offload.weights", "needs optim.layerwise: true: a whole-model optimizer step updates every "
                                         "layer at once, which would bring every layer's float32 weight onto the "
                                         "device; layer-wise updates run in backward while each layer is resident"))
    if getattr(off, "activations", False) and getattr(off, "activation_mode", "all") == "checkpoint_inputs" \
            and not getattr(train, "gradient_checkpointing", False):
        p.append(("offload.activation_mode", "checkpoint_inputs offloads what gradient checkpointing keeps: set "
                                             "train.gradient_checkpointing: true, or use activation_mode: all"))
    return p
