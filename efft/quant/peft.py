"""LoRA / DoRA adapters on QuantLinear through peft's custom-module dispatch.

``apply_lora(model, adapter_cfg)`` registers :class:`QuantLoraLinear` for QuantLinear in the
LoraConfig (``_register_custom_module``) and calls ``get_peft_model``; on a model without
QuantLinear it is plain peft. Adapters are saved by peft's ``save_pretrained`` with the same keys
as a LoRA on bitsandbytes' Linear4bit, so they load onto either base. ``merge()`` (and peft's
``merge_and_unload``) turns a layer into a full-precision ``nn.Linear`` holding
``dequant(W) + delta``; :func:`export_merged` does that for the whole model.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .linear import QuantLinear

try:
    from peft.tuners.lora.layer import LoraLayer
except ImportError as e:  # pragma: no cover - peft is a dependency
    raise ImportError("efft.quant.peft needs peft (pip install peft)") from e


def _dequantized(base: nn.Module, dtype=torch.float32) -> torch.Tensor:
    if isinstance(base, QuantLinear):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


class QuantLoraLinear(nn.Module, LoraLayer):
    """peft LoRA (optionally DoRA) on a QuantLinear: ``base(x) + B(A(dropout(x))) * scaling``.

    The base runs its own quantized forward (no dequantized weight kept for backward); LoRA
    runs in the adapter's dtype (fp32 by default, peft's ``autocast_adapter_dtype``).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")  # we give in/out features
            LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "use_dora", False):
            from .dora import QuantDoraVariant

            return QuantDoraVariant()
        for name in ("arrow_config", "alora_invocation_tokens", "velora_config"):
            if getattr(config, name, None) is not None:
                raise ValueError(f"QuantLoraLinear supports LoRA and DoRA; the LoraConfig sets {name}")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("QuantLoraLinear does not support mixed adapter batches (adapter_names)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
            else:
                result = result + (lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]).to(out_dtype)
        return result.to(out_dtype)

    # ---------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """Replace the quantized base by a full-precision nn.Linear holding dequant(W) + delta(s).

        Exact (no re-quantization); ``unmerge`` subtracts the deltas again.
        """
        from peft.tuners.tuners_utils import check_adapters_to_merge

        names = check_adapters_to_merge(self, adapter_names)
        if not names:
            return
        base = self.get_base_layer()
        w = _dequantized(base, torch.float32)
        for name in names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                w = self.lora_variant[name].merge_safe(self, name, w)
            else:
                w = w + self.get_delta_weight(name).detach().float()
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
            self.merged_adapters.append(name)
        self.base_layer = _full_precision_linear(base, w)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        w = base.weight.detach().float()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_variant:
                w = self.lora_variant[name].unmerge(self, name, w)
            else:
                w = w - self.get_delta_weight(name).detach().float()
        base.weight.data = w.to(base.weight.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _full_precision_linear(base: nn.Module, w: torch.Tensor) -> nn.Linear:
    dtype = base.weight_dtype if isinstance(base, QuantLinear) else base.weight.dtype
    lin = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device, dtype=dtype)
    lin.weight.data.copy_(w.to(dtype))
    lin.weight.requires_grad_(False)
    if base.bias is not None:
        lin.bias.data.copy_(base.bias.detach().to(dtype))
        lin.bias.requires_grad_(base.bias.requires_grad)
    return lin


# ------------------------------------------------------------------------------------ entry points
def _linear_names(model: nn.Module) -> list:
    """Leaf names of the linear layers peft should target for "all-linear" (output head excluded)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, m in model.named_modules():
        if m is out_emb or not name:
            continue
        if isinstance(m, (QuantLinear, nn.Linear)) or type(m).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    out_name = next((n for n, m in model.named_modules() if m is out_emb), None)
    if out_name:
        names.discard(out_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(model: nn.Module, adapter_cfg=None, **overrides):
    """A peft LoraConfig from efft's AdapterConfig (type lora|dora, r, lora_alpha, lora_dropout,
    target_modules, modules_to_save; duck-typed or a dict), with QuantLinear registered."""
    from peft import LoraConfig

    def get(k, default):
        if k in overrides:
            return overrides[k]
        if isinstance(adapter_cfg, dict):
            return adapter_cfg.get(k, default)
        v = getattr(adapter_cfg, k, None) if adapter_cfg is not None else None
        return default if v is None else v

    kind = get("type", "lora")
    if kind not in ("lora", "dora"):
        raise ValueError(f"apply_lora handles adapter type lora or dora, got {kind!r}")
    targets = get("target_modules", "all-linear")
    if targets == "all-linear":
        targets = _linear_names(model)
        if not targets:
            raise ValueError("target_modules='all-linear' found no Linear or QuantLinear layers in the model")
    cfg = LoraConfig(r=int(get("r", 16)), lora_alpha=get("lora_alpha", 32), lora_dropout=float(get("lora_dropout", 0.0)),
                     target_modules=list(targets), modules_to_save=list(get("modules_to_save", [])) or None,
                     use_dora=kind == "dora", task_type=get("task_type", "CAUSAL_LM"),
                     init_lora_weights=get("init_lora_weights", True))
    cfg._register_custom_module({QuantLinear: QuantLoraLinear})
    return cfg


def apply_lora(model: nn.Module, adapter_cfg=None, adapter_name: str = "default", **overrides):
    """Wrap ``model`` with peft LoRA/DoRA (QuantLinear bases supported); returns the PeftModel.

    Only adapter weights (and ``modules_to_save``) train; the quantized base is frozen. With
    gradient checkpointing on, input embeddings are made to require grad (as peft's
    ``prepare_model_for_kbit_training`` does) so checkpointed blocks get gradients.
    """
    from peft import get_peft_model

    cfg = lora_config(model, adapter_cfg, **overrides)
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt = getattr(model, "is_activation_checkpointing", None)  # transformers 5 name
    if ckpt is None:
        ckpt = getattr(model, "is_gradient_checkpointing", False)
    if ckpt and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return get_peft_model(model, cfg, adapter_name=adapter_name)


def load_lora(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False):
    """Load a saved peft LoRA adapter onto a (possibly efft-quantized) base model."""
    from peft import LoraConfig, PeftModel

    cfg = LoraConfig.from_pretrained(path)
    cfg._register_custom_module({QuantLinear: QuantLoraLinear})
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=cfg)


@torch.no_grad()
def export_merged(peft_model, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A full-precision model: adapters merged into dequantized weights, every QuantLinear replaced
    by an nn.Linear (``dtype`` default: each layer's original dtype). Consumes ``peft_model``."""
    model = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _full_precision_linear(m, m.dequantize(torch.float32)))
    if dtype is not None:
        model.to(dtype)
    if hasattr(model, "efft_quant"):
        del model.efft_quant
    return model
