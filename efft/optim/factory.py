"""The optimizer a recipe's ``optim`` section asks for, with its param groups built from the model.

Groups: 2-D weights of the targeted Linear layers are low-rank (galore / apollo / apollo_mini /
frugal); embeddings, the LM head, LoRA adapter matrices, norms and biases get AdamW in the same
optimizer. Weight decay follows transformers.Trainer: 2-D weights decay, biases and norm weights
do not. Only parameters with ``requires_grad`` are included (frozen or quantized weights are not).
``cfg`` is read by attribute, so the pydantic OptimConfig or a SimpleNamespace both work.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .adamw import AdamW
from .apollo import APOLLOAdamW
from .frugal import FRUGAL
from .galore import GaLoreAdamW
from .layerwise import LayerwiseOptimizer

NAMES = ("adamw", "adamw8bit", "galore", "apollo", "apollo_mini", "frugal")
DEFAULT_SCALE = {"galore": 0.25, "apollo": 1.0, "apollo_mini": 128.0, "frugal": 1.0}
DEFAULT_PROJECTOR = {"galore": "svd", "apollo": "random", "apollo_mini": "random", "frugal": "block"}
ALLOWED_PROJECTOR = {"galore": ("svd", "rsvd"), "apollo": ("random", "svd"), "apollo_mini": ("random", "svd"),
                     "frugal": ("block", "svd", "random")}
_NEVER_LOWRANK = ("lm_head", "embed", "wte", "wpe", "lora_", "modules_to_save")


def _get(cfg: Any, key: str, default=None):
    return getattr(cfg, key, default)


def _explicit(cfg: Any, key: str) -> bool:
    """Whether the recipe set ``key`` (pydantic tracks it; for plain objects, assume it did)."""
    fields_set = getattr(cfg, "model_fields_set", None)
    return True if fields_set is None else key in fields_set


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None  # GPT-2's Linear


def lowrank_parameter_names(model: nn.Module, target_modules="all-linear", exclude_modules=()) -> set[str]:
    """Names of the trainable 2-D weights that the projected optimizers treat as low-rank."""
    special = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, getter, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            special.add(id(emb.weight))
    names = set()
    for mod_name, module in model.named_modules():
        if not _linear_like(module):
            continue
        w = module.weight
        if not (isinstance(w, nn.Parameter) and w.requires_grad and w.dim() == 2) or id(w) in special:
            continue
        if any(tag in mod_name for tag in _NEVER_LOWRANK):
            continue
        if target_modules != "all-linear" and not any(t in mod_name for t in target_modules):
            continue
        if any(x in mod_name for x in exclude_modules):
            continue
        names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


def param_groups(model: nn.Module, cfg: Any, weight_decay: float, exclude=()) -> tuple[list[dict], list[dict]]:
    """(full-rank groups, low-rank groups-without-keys): decayed/non-decayed AdamW params, low-rank.
    ``exclude``: parameters another optimizer updates (host-resident embeddings)."""
    target = _get(cfg, "target_modules", "all-linear")
    if isinstance(target, str) and target != "all-linear":
        target = [target]
    low_names = lowrank_parameter_names(model, target, tuple(_get(cfg, "exclude_modules", ()) or ()))
    low, decay, no_decay, seen = [], [], [], {id(p) for p in exclude}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name in low_names:
            low.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    full = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    lowrank = [{"params": low, "weight_decay": weight_decay}] if low else []
    return full, lowrank


def build_optimizer(model: nn.Module, cfg: Any, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float = 1e-8, max_grad_norm: float = 0.0, gradient_accumulation_steps: int = 1,
                    exclude=()) -> torch.optim.Optimizer:
    """Build ``cfg.name`` over ``model``'s trainable parameters.

    ``max_grad_norm`` and ``gradient_accumulation_steps`` matter only in layer-wise mode (the
    optimizer then clips and accumulates itself; see efft.optim.layerwise); otherwise the training
    loop clips and accumulates as usual. ``exclude``: parameters left out (another optimizer's).
    """
    name = _get(cfg, "name", "adamw")
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    layerwise = bool(_get(cfg, "layerwise", False))
    bits = int(_get(cfg, "state_bits", 32))
    full, low = param_groups(model, cfg, weight_decay, exclude)
    if not full and not low:
        raise ValueError("model has no trainable parameters")
    common = dict(lr=lr, betas=tuple(betas), eps=eps)

    if name in ("adamw", "adamw8bit"):
        groups = full + low
        if layerwise:
            if name == "adamw8bit":
                raise ValueError("layerwise: not available for adamw8bit (use adamw with state_bits: 8)")
            opt = AdamW(groups, weight_decay=weight_decay, state_bits=bits, **common)
        elif name == "adamw8bit" or bits == 8:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, weight_decay=weight_decay, **common)
        else:
            opt = torch.optim.AdamW(groups, weight_decay=weight_decay, **common)
    else:
        if not low:
            warnings.warn(f"{name}: no 2-D weight matched target_modules; every parameter gets plain AdamW", UserWarning, stacklevel=2)
        rank = 1 if name == "apollo_mini" else _get(cfg, "rank", 128)
        scale = _get(cfg, "scale", None)
        projector = _get(cfg, "projector", None) if _explicit(cfg, "projector") else None
        projector = projector or DEFAULT_PROJECTOR[name]
        if projector not in ALLOWED_PROJECTOR[name]:
            raise ValueError(f"projector must be one of {ALLOWED_PROJECTOR[name]} for {name}, got {projector!r}")
        keys = dict(rank=rank, update_proj_gap=_get(cfg, "update_proj_gap", 200),
                    scale=DEFAULT_SCALE[name] if scale is None else scale, proj_type=_get(cfg, "proj_type", "std"))
        for g in low:
            g.update(keys)
        groups = full + low
        shared = dict(common, weight_decay=weight_decay, stagger_refresh=bool(_get(cfg, "stagger_refresh", True)), state_bits=bits)
        if name == "galore":
            opt = GaLoreAdamW(groups, projector=projector, **shared)
        elif name in ("apollo", "apollo_mini"):
            scale_type = _get(cfg, "scale_type", None) or ("tensor" if name == "apollo_mini" else "channel")
            for g in low:
                g.update(proj=projector, scale_type=scale_type)
            opt = APOLLOAdamW(groups, norm_growth_limit=_get(cfg, "norm_growth_limit", 1.01), **shared)
        else:
            for g in low:
                g.update(projector=projector, density=_get(cfg, "density", 0.25),
                         state_free_lr_scale=_get(cfg, "state_free_lr_scale", 0.1))
            opt = FRUGAL(groups, **shared)
    if layerwise:
        lw = LayerwiseOptimizer(opt, gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm)
        lw.keep_out_of_ddp(model)  # several processes: DDP (or Trainer's) must not reduce what the hooks do
        return lw
    return opt
