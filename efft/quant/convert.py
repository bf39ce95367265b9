"""Turn a model's Linear layers into QuantLinear: in place on a loaded model, or straight from a
safetensors checkpoint one tensor at a time so the full-precision model never sits in memory.

``config`` is duck-typed: ``efft.config.QuantConfig``, a dict, or any object with the attributes
``type`` (none|nf4|fp4|int8), ``blocksize``, ``double_quant``, ``compute_dtype``, ``skip``,
``outlier_threshold``, ``kernel``. (``trainable`` int8 weights are not handled here.)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .linear import KERNELS, QUANT_TYPES, QuantLinear, as_dtype


@dataclass
class QuantSpec:
    """The quantization options this module reads from a config."""

    type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip: list = field(default_factory=lambda: ["lm_head"])
    outlier_threshold: Optional[float] = None
    kernel: str = "auto"

    @classmethod
    def of(cls, config=None, **overrides) -> "QuantSpec":
        d = {}
        if config is not None:
            for k in cls.__dataclass_fields__:
                v = config.get(k) if isinstance(config, dict) else getattr(config, k, None)
                if v is not None:
                    d[k] = v
        d.update({k: v for k, v in overrides.items() if v is not None})
        spec = cls(**d)
        if spec.type not in ("none",) + QUANT_TYPES:
            raise ValueError(f"quant type must be one of none, nf4, fp4, int8; got {spec.type!r}")
        if spec.kernel not in KERNELS:
            raise ValueError(f"quant kernel must be one of {KERNELS}; got {spec.kernel!r}")
        b = spec.blocksize
        if not isinstance(b, int) or b < 32 or b > 4096 or b & (b - 1):
            raise ValueError(f"quant blocksize must be a power of two in 32..4096; got {b!r}")
        spec.compute_dtype = as_dtype(spec.compute_dtype, "quant compute_dtype")
        if isinstance(spec.skip, str):
            spec.skip = [spec.skip]
        return spec

    def layer_kwargs(self) -> dict:
        return dict(quant_type=self.type, blocksize=self.blocksize, double_quant=self.double_quant,
                    compute_dtype=self.compute_dtype,
                    outlier_threshold=self.outlier_threshold if self.type == "int8" else None, kernel=self.kernel)


def is_skipped(name: str, skip) -> bool:
    """True when an entry of ``skip`` is a whole dotted run of ``name`` ("lm_head", "mlp", "layers.0")."""
    padded = "." + name + "."
    return any(("." + s.strip(".") + ".") in padded for s in skip if s)


def _is_linear(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)) or type(m).__name__ == "Conv1D"


def _targets(model: nn.Module, spec: QuantSpec):
    return [(n, m) for n, m in model.named_modules() if n and _is_linear(m) and not is_skipped(n, spec.skip)]


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _mark(model: nn.Module, spec: QuantSpec) -> None:
    model.efft_quant = {"type": spec.type, "blocksize": spec.blocksize, "double_quant": spec.double_quant,
                        "compute_dtype": str(spec.compute_dtype).replace("torch.", ""), "skip": list(spec.skip)}


@torch.no_grad()
def quantize_model(model: nn.Module, config=None, **overrides) -> nn.Module:
    """Replace every Linear (and transformers Conv1D) not matched by ``skip`` with a QuantLinear,
    one layer at a time (each full-precision weight is freed as soon as it is quantized).

    Returns the same model. ``type: none`` returns it untouched.
    """
    spec = QuantSpec.of(config, **overrides)
    if spec.type == "none":
        return model
    kw = spec.layer_kwargs()
    for name, lin in _targets(model, spec):
        _set_child(model, name, QuantLinear.from_linear(lin, **kw))
        del lin
    _mark(model, spec)
    return model


def quantized_skeleton(model: nn.Module, config=None, dtype: Optional[torch.dtype] = None, **overrides) -> nn.Module:
    """Swap the Linear layers of a (meta-device) model for empty QuantLinear layers on meta."""
    spec = QuantSpec.of(config, **overrides)
    kw = spec.layer_kwargs()
    for name, lin in _targets(model, spec):
        w = lin.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if type(lin).__name__ == "Conv1D" else (w.shape[0], w.shape[1])
        wdt = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        layer = QuantLinear(in_f, out_f, bias=getattr(lin, "bias", None) is not None, weight_dtype=wdt,
                            device="meta", **kw)
        layer.transposed_source = type(lin).__name__ == "Conv1D"  # checkpoint stores W as [in, out]
        _set_child(model, name, layer)
    _mark(model, spec)
    return model


def _checkpoint_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path} (expected model.safetensors or an index)")
    return files


def spec_from_bnb_config(qc: dict) -> QuantSpec:
    """QuantSpec from a transformers BitsAndBytesConfig dict (a pre-quantized checkpoint's config)."""
    four = bool(qc.get("load_in_4bit"))
    if not four and not qc.get("load_in_8bit"):
        raise ValueError(f"quantization_config is neither load_in_4bit nor load_in_8bit: {qc}")
    return QuantSpec.of(type=qc.get("bnb_4bit_quant_type", "nf4") if four else "int8",
                        double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
                        compute_dtype=str(qc.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", ""),
                        skip=qc.get("llm_int8_skip_modules") or ["lm_head"])


def _owner(key: str, layers: dict):
    """(layer name, key relative to it) when ``key`` is a checkpoint entry of a QuantLinear."""
    from .io import _layer_key

    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in layers:
            rel = ".".join(parts[i:])
            return (name, rel) if _layer_key(rel) else (None, None)
    return None, None


@torch.no_grad()
def quantize_from_checkpoint(path: str, config=None, dtype: torch.dtype = torch.float32, device="cpu",
                             model_config=None, model_kwargs: Optional[dict] = None, **overrides) -> nn.Module:
    """Build a quantized transformers causal LM from a safetensors checkpoint directory, layer by layer.

    The model is created on the meta device (no weights), its Linear layers become empty
    QuantLinear layers, then each layer's checkpoint entries are read alone, moved to ``device``
    and either quantized (full-precision checkpoint: cast to ``dtype`` first) or adopted as they are
    (a checkpoint already in the bitsandbytes layout, e.g. saved by transformers + bitsandbytes or
    by ``save_quantized``), and dropped. Peak host memory is about the quantized model plus one
    full-precision tensor. With ``config=None`` a pre-quantized checkpoint's
    ``quantization_config`` decides the format. ``model_kwargs`` go to
    ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation``).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .io import QuantCheckpointError, load_layer_tensors

    cfg = model_config or AutoConfig.from_pretrained(path)
    qc = getattr(cfg, "quantization_config", None)
    if qc is not None:
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    if config is None and not overrides and qc is not None and qc.get("quant_method") == "bitsandbytes":
        spec = spec_from_bnb_config(qc)
    else:
        spec = QuantSpec.of(config, **overrides)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are small and computed
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **(model_kwargs or {}))
    if spec.type != "none":
        quantized_skeleton(model, spec, dtype=dtype)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    params = dict(model.named_parameters(remove_duplicate=False))

    def read(file, key):
        # reopen per tensor: an open mapping would keep every page read so far resident
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)

    groups: dict = {}
    plain = []
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            owner, rel = _owner(key, layers)
            if owner is not None and rel != "bias":
                groups.setdefault(owner, {})[rel] = (file, key)
            else:
                plain.append((file, key))
    for owner, entries in groups.items():
        layer = layers[owner]
        if set(entries) == {"weight"}:  # full precision: quantize now
            w = read(*entries["weight"]).to(device=device, dtype=dtype)
            try:
                layer.quantize_weight_(w.t() if getattr(layer, "transposed_source", False) else w)
            except (ValueError, TypeError) as e:
                raise QuantCheckpointError(f"{entries['weight'][1]}: {e}") from None
            del w
        else:
            load_layer_tensors(layer, {rel: read(*fk).to(device) for rel, fk in entries.items()}, owner + ".")
    for file, key in plain:
        if key not in params:
            continue  # e.g. rotary inv_freq saved by old versions: recomputed at init
        owner, _, attr = key.rpartition(".")
        t = read(file, key)
        cur = params[key]
        if tuple(cur.shape) != tuple(t.shape):
            raise QuantCheckpointError(f"{key}: expected shape {list(cur.shape)}, got {list(t.shape)}")
        mod = model.get_submodule(owner) if owner else model
        setattr(mod, attr, nn.Parameter(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype),
                                        requires_grad=cur.requires_grad))
        del t
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still += [n + ".weight" for n, m in layers.items() if m.weight.device.type == "meta"]
    if still:
        raise QuantCheckpointError(f"{still[0]}: missing from the checkpoint in {path} "
                                   f"({len(still)} tensors missing: {still[:5]})")
    model.eval()
    return model
