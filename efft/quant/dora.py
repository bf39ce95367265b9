"""DoRA (Liu et al. 2024) on a QuantLinear base, reusing peft's DoRA math.

peft's DoRA layer reads the base weight through ``dequantize_module_weight``, which knows
bitsandbytes, HQQ and torchao but would hand back efft's packed bytes. Here the base is shown to
it as a dense view (the dequantized weight, rebuilt on each call and dropped after), so the
magnitude vector, its initialisation, the detached norm and the saved keys
(``lora_magnitude_vector.<adapter>.weight``) are peft's own, and adapters move between efft and
bitsandbytes bases.
"""
from __future__ import annotations

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn


class _DenseView(nn.Module):
    """What peft's DoRA needs of a base layer: ``weight`` (a plain dequantized tensor) and ``bias``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight = base.dequantize(torch.float32) if hasattr(base, "dequantize") else base.weight
        self.bias = base.bias


class QuantDoraLayer(DoraLinearLayer):
    def update_layer(self, *, base_layer, **kwargs) -> None:
        super().update_layer(base_layer=_DenseView(base_layer), **kwargs)

    def forward(self, x, *, base_layer, **kwargs):
        return super().forward(x, base_layer=_DenseView(base_layer), **kwargs)


class QuantDoraVariant(DoraLinearVariant):
    """peft's DoRA variant with a QuantDoraLayer and merges on float32 dequantized weights."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        layer = QuantDoraLayer(fan_in_fan_out=False)
        layer.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter_name].weight,
                           lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
        module.lora_magnitude_vector[adapter_name] = layer

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter).detach().float()
        mag = module.lora_magnitude_vector[active_adapter]
        norm = mag.get_weight_norm(orig_weight, delta, scaling=1).detach()
        module._cache_store(f"{active_adapter}-weight_norm", norm)
        return (mag.weight.detach().float() / norm).view(-1, 1) * (orig_weight + delta)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = QuantDoraVariant.merge_safe(module, active_adapter, orig_weight.data.float()).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter).detach().float()
        norm = module._cache_pop(f"{active_adapter}-weight_norm")
        factor = (module.lora_magnitude_vector[active_adapter].weight.detach().float() / norm).view(-1, 1)
        return orig_weight / factor - delta
