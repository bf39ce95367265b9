"""Checkpoints of quantized models in the transformers + bitsandbytes key layout, as safetensors.

For a 4-bit Linear ``P``::

    P.weight                                   uint8 [(n+1)//2, 1]  packed codes
    P.weight.absmax                            float32 [blocks] (uint8 when double-quantized)
    P.weight.quant_map                         float32 [16]
    P.weight.nested_absmax                     float32 [ceil(blocks/256)]   (double quant only)
    P.weight.nested_quant_map                  float32 [256]                (double quant only)
    P.weight.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape,
                                               nested_blocksize, nested_dtype, nested_offset
    P.bias                                     (if any)

and for an int8 Linear: ``P.weight`` int8 [out, in], ``P.SCB`` float32 [out], ``P.weight_format``
(uint8 0 = row-major). A checkpoint written by bitsandbytes loads here and the reverse; a
full-precision ``P.weight`` [out, in] is quantized on load. Every missing or inconsistent entry
raises :class:`QuantCheckpointError` naming the key and what was expected.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .formats import NESTED_BLOCKSIZE
from .state import QuantState

QS_PREFIX = "weight.quant_state.bitsandbytes__"


class QuantCheckpointError(ValueError):
    """A quantized checkpoint entry is missing or does not match the layer it is loaded into."""


def _pack_json(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QuantCheckpointError(f"{key}: expected uint8 bytes of a JSON object, could not decode ({e})") from None


_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def layer_tensors(layer) -> dict:
    """The checkpoint entries of one QuantLinear, keys relative to the layer (bias excluded)."""
    if layer.quant_type == "int8":
        return {"weight": layer.weight, "SCB": layer.SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    st = layer.quant_state
    return state_tensors(layer.weight, st)


def state_tensors(packed: torch.Tensor, st: QuantState) -> dict:
    """``(packed, QuantState)`` -> the bitsandbytes entries, keys relative to the layer."""
    meta = {"quant_type": st.quant_type, "blocksize": int(st.blocksize),
            "dtype": str(st.dtype).replace("torch.", ""), "shape": [int(s) for s in st.shape]}
    out = {"weight": packed, "weight.absmax": st.absmax, "weight.quant_map": st.code}
    if st.nested:
        out["weight.nested_absmax"] = st.state2.absmax
        out["weight.nested_quant_map"] = st.state2.code
        meta.update(nested_blocksize=int(st.state2.blocksize), nested_dtype="float32",
                    nested_offset=float(st.offset.item()))
    out[QS_PREFIX + st.quant_type] = _pack_json(meta)
    return out


def _need(tensors: dict, rel: str, prefix: str, what: str) -> torch.Tensor:
    if rel not in tensors:
        raise QuantCheckpointError(f"{prefix}{rel}: missing from the checkpoint (expected {what})")
    return tensors[rel]


def _expect(cond: bool, prefix: str, rel: str, msg: str) -> None:
    if not cond:
        raise QuantCheckpointError(f"{prefix}{rel}: {msg}")


def state_from_tensors(tensors: dict, prefix: str = "", shape: Optional[tuple] = None):
    """The bitsandbytes 4-bit entries of one layer (keys relative to it) -> ``(packed, QuantState)``."""
    qs_keys = [k for k in tensors if k.startswith(QS_PREFIX)]
    if len(qs_keys) != 1:
        raise QuantCheckpointError(
            f"{prefix}{QS_PREFIX}nf4|fp4: expected exactly one quant_state entry, found "
            f"{[prefix + k for k in qs_keys] or 'none'}")
    qkey = qs_keys[0]
    qt = qkey[len(QS_PREFIX):]
    _expect(qt in ("nf4", "fp4"), prefix, qkey, f"expected the suffix nf4 or fp4, got {qt!r}")
    meta = _unpack_json(tensors[qkey], prefix + qkey)
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        _expect(field in meta, prefix, qkey, f"JSON lacks {field!r} (has {sorted(meta)})")
    _expect(meta["quant_type"] == qt, prefix, qkey, f"JSON quant_type {meta['quant_type']!r} disagrees with the key suffix {qt!r}")
    _expect(meta["dtype"] in _DT, prefix, qkey, f"expected dtype float32/float16/bfloat16, got {meta['dtype']!r}")
    wshape = tuple(int(s) for s in meta["shape"])
    if shape is not None:
        _expect(wshape == tuple(shape), prefix, qkey, f"shape {list(wshape)} does not match the layer's {list(shape)} [out, in]")
    n = 1
    for s in wshape:
        n *= s
    bs = int(meta["blocksize"])
    nb = -(-n // bs)
    packed = _need(tensors, "weight", prefix, f"the packed 4-bit weight, {(n + 1) // 2} bytes")
    nbytes = packed.numel() * packed.element_size()
    _expect(nbytes == (n + 1) // 2, prefix, "weight",
            f"expected {(n + 1) // 2} bytes of packed codes for shape {list(wshape)}, got {packed.dtype} {tuple(packed.shape)}")
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    nested = "nested_offset" in meta
    absmax = _need(tensors, "weight.absmax", prefix, f"{nb} block scales")
    _expect(absmax.numel() == nb, prefix, "weight.absmax", f"expected {nb} values ({n} weights / blocksize {bs}), got {absmax.numel()}")
    want_dt = torch.uint8 if nested else torch.float32
    _expect(absmax.dtype == want_dt, prefix, "weight.absmax",
            f"expected {want_dt} ({'double' if nested else 'single'} quantized statistics), got {absmax.dtype}")
    code = _need(tensors, "weight.quant_map", prefix, "the 16-value code book")
    _expect(code.numel() == 16, prefix, "weight.quant_map", f"expected 16 values, got {code.numel()}")
    state2 = offset = None
    if nested:
        nb2 = -(-nb // int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)))
        a2 = _need(tensors, "weight.nested_absmax", prefix, f"{nb2} float32 nested scales")
        _expect(a2.numel() == nb2, prefix, "weight.nested_absmax", f"expected {nb2} values, got {a2.numel()}")
        c2 = _need(tensors, "weight.nested_quant_map", prefix, "the 256-value dynamic map")
        _expect(c2.numel() == 256, prefix, "weight.nested_quant_map", f"expected 256 values, got {c2.numel()}")
        state2 = QuantState(absmax=a2.float(), shape=torch.Size((nb,)), dtype=torch.float32,
                            blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)), quant_type="dynamic",
                            code=c2.float())
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
    else:
        for k in ("weight.nested_absmax", "weight.nested_quant_map"):
            _expect(k not in tensors, prefix, k, "present, but the quant_state JSON has no nested_offset (not double-quantized)")
    st = QuantState(absmax=absmax, shape=torch.Size(wshape), dtype=_DT[meta["dtype"]], blocksize=bs,
                    quant_type=qt, code=code.float(), offset=offset, state2=state2)
    return packed, st


def load_layer_tensors(layer, tensors: dict, prefix: str = "") -> None:
    """Fill a QuantLinear from its checkpoint entries (relative keys): 4-bit, int8, or full precision."""
    shape = (layer.out_features, layer.in_features)
    dev = None if layer.weight.device.type == "meta" else layer.weight.device

    def here(t):
        return t if dev is None else t.to(dev)

    if any(k.startswith(QS_PREFIX) for k in tensors):
        packed, st = state_from_tensors(tensors, prefix, shape)
        if layer.quant_type == "int8":
            raise QuantCheckpointError(f"{prefix}weight: the layer is int8 but the checkpoint holds {st.quant_type}")
        layer.set_quantized_(here(packed), st.to(dev) if dev is not None else st)
        return
    w = _need(tensors, "weight", prefix, f"a quantized or full-precision weight of shape {list(shape)}")
    if "SCB" in tensors or w.dtype == torch.int8:
        _expect(w.dtype == torch.int8 and tuple(w.shape) == shape, prefix, "weight",
                f"expected int8 {list(shape)}, got {w.dtype} {list(w.shape)}")
        scb = _need(tensors, "SCB", prefix, f"{shape[0]} float32 row scales")
        _expect(scb.numel() == shape[0], prefix, "SCB", f"expected {shape[0]} row scales, got {scb.numel()}")
        fmt = tensors.get("weight_format")
        _expect(fmt is None or int(fmt) == 0, prefix, "weight_format", f"expected 0 (row-major), got {fmt}")
        if layer.quant_type != "int8":
            raise QuantCheckpointError(f"{prefix}weight: the layer is {layer.quant_type} but the checkpoint holds int8")
        layer.set_int8_(here(w), here(scb))
        return
    if w.dtype == torch.uint8:
        raise QuantCheckpointError(
            f"{prefix}weight: packed uint8 weight without {prefix}{QS_PREFIX}nf4|fp4 (expected the quant_state "
            f"JSON beside it)")
    _expect(w.is_floating_point() and tuple(w.shape) == shape, prefix, "weight",
            f"expected a quantized weight or a float weight of shape {list(shape)}, got {w.dtype} {list(w.shape)}")
    layer.quantize_weight_(here(w))


# ------------------------------------------------------------------------------------ model level
def quantized_state_dict(model: nn.Module) -> dict:
    """The model's state dict in the bitsandbytes layout, contiguous, tied tensors stored once."""
    sd = model.state_dict()
    out, seen = {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue  # a tied copy (e.g. lm_head.weight = embed_tokens.weight)
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous()
    return out


def save_quantized(model: nn.Module, path: str, metadata: Optional[dict] = None) -> str:
    """Write the model (QuantLinear layers in the bitsandbytes layout) to one safetensors file.

    ``path`` may be a directory: ``model.safetensors`` is written there, plus ``config.json`` with a
    bitsandbytes ``quantization_config`` when the model has a transformers config.
    """
    from safetensors.torch import save_file

    if os.path.isdir(path) or not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            d = cfg.to_dict()
            qc = quantization_config(model)
            if qc is not None:
                d["quantization_config"] = qc
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(d, f, indent=2, default=str)
        path = os.path.join(path, "model.safetensors")
    md = {"format": "pt"}
    md.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file({k: v.cpu() for k, v in quantized_state_dict(model).items()}, path, metadata=md)
    return path


def quantization_config(model: nn.Module) -> Optional[dict]:
    """transformers' BitsAndBytesConfig dict describing the model's QuantLinear layers (None if none)."""
    from .linear import QuantLinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    first = layers[0][1]
    is4 = first.quant_type != "int8"
    skipped = sorted({n.split(".")[-1] for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)})
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": is4, "load_in_8bit": not is4,
        "bnb_4bit_quant_type": first.quant_type if is4 else "fp4",
        "bnb_4bit_use_double_quant": bool(first.double_quant),
        "bnb_4bit_compute_dtype": str(first.compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": float(first.outlier_threshold or 6.0),
        "llm_int8_skip_modules": skipped or None,
        "llm_int8_has_fp16_weight": False,
    }


def _read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors file in {path}")
        out = {}
        for f in files:
            out.update(load_file(os.path.join(path, f)))
        return out
    return load_file(path)


def load_quantized(model: nn.Module, path_or_tensors, strict: bool = True) -> nn.Module:
    """Load a safetensors checkpoint (file, directory, or a dict of tensors) into a model whose
    Linear layers are already QuantLinear (e.g. from ``quantize_model``, possibly on meta).

    Raises :class:`QuantCheckpointError` naming the first missing or mismatched key; with
    ``strict``, keys the model does not have are an error too.
    """
    from .linear import QuantLinear

    tensors = path_or_tensors if isinstance(path_or_tensors, dict) else _read_safetensors(path_or_tensors)
    used = set()
    for name, mod in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(mod, QuantLinear):
            rel = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                   and _layer_key(k[len(prefix):])}
            load_layer_tensors(mod, rel, prefix)
            used.update(prefix + k for k in rel if k != "bias")
    plain = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = _load_plain(model, plain)
    if missing:
        raise QuantCheckpointError(f"{missing[0]}: missing from the checkpoint (expected a tensor for this "
                                   f"parameter/buffer; {len(missing)} missing in all: {missing[:5]})")
    if strict and unexpected:
        raise QuantCheckpointError(f"{unexpected[0]}: not a parameter or buffer of the model "
                                   f"({len(unexpected)} unexpected: {unexpected[:5]})")
    return model


def _layer_key(rel: str) -> bool:
    return rel in ("weight", "bias", "SCB", "weight_format") or rel.startswith("weight.")


def _load_plain(model: nn.Module, tensors: dict):
    """Assign non-quantized parameters and buffers by name (works on meta skeletons)."""
    from .linear import QuantLinear

    expected = {}
    for mname, mod in model.named_modules():
        pre = mname + "." if mname else ""
        for pname, p in mod.named_parameters(recurse=False):
            expected.setdefault(pre + pname, (mod, pname, True))
        for bname, b in mod.named_buffers(recurse=False):
            if isinstance(mod, QuantLinear) or bname in mod._non_persistent_buffers_set:
                continue
            expected.setdefault(pre + bname, (mod, bname, False))
    for key, (mod, attr, is_param) in expected.items():
        if key not in tensors:
            continue
        t = tensors[key]
        cur = getattr(mod, attr)
        if tuple(t.shape) != tuple(cur.shape):
            raise QuantCheckpointError(f"{key}: expected shape {list(cur.shape)}, got {list(t.shape)}")
        dev = t.device if cur.device.type == "meta" else cur.device
        t = t.to(device=dev, dtype=cur.dtype if cur.is_floating_point() else t.dtype)
        if is_param:
            setattr(mod, attr, nn.Parameter(t, requires_grad=cur.requires_grad))
        else:
            mod._buffers[attr] = t
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # e.g. lm_head.weight follows embed_tokens.weight when tied
    missing = [k for k, (mod, attr, _) in expected.items()
               if getattr(mod, attr) is not None and getattr(mod, attr).device.type == "meta"]
    unexpected = [k for k in tensors if k not in expected]
    return missing, unexpected
