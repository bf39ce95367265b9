"""One call from a recipe's ``quant`` and ``adapter`` sections to a model ready to train.

``prepare(model, quant_cfg, adapter_cfg)``: quantize (type none|nf4|fp4|int8), then add the adapter
(lora|dora through peft, peqa by training the quantization scales, none). Both configs are
duck-typed (efft.config.QuantConfig / AdapterConfig, dicts, namespaces) or None.
"""
from __future__ import annotations

from torch import nn

from .convert import quantize_model


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    v = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return default if v is None else v


def prepare(model: nn.Module, quant_cfg=None, adapter_cfg=None) -> nn.Module:
    """Quantize ``model`` per ``quant_cfg`` and attach the adapter of ``adapter_cfg``.

    Returns the model to train: a peft ``PeftModel`` for lora/dora, the same model otherwise.
    Raises ValueError for peqa without a quantized base.
    """
    if _get(quant_cfg, "type", "none") != "none":
        model = quantize_model(model, quant_cfg)
    kind = _get(adapter_cfg, "type", "none")
    if kind in ("lora", "dora"):
        from .peft import apply_lora

        return apply_lora(model, adapter_cfg)
    if kind == "peqa":
        from .peqa import prepare_peqa

        return prepare_peqa(model, granularity=_get(adapter_cfg, "granularity", "block"))
    if kind != "none":
        raise ValueError(f"adapter type must be one of none, lora, dora, peqa; got {kind!r}")
    return model
