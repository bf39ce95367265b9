"""PaCA (partial connection adaptation): train a random subset of each weight's input columns in place.

Instead of an adapter beside a frozen weight, k input columns of each target ``nn.Linear`` weight
W (out x in) become trainable (k = ``r``, PaCA's rank and peft's name for it, or ``fraction`` of the
input columns): they live in a parameter ``paca_weight``
(out x k) and are written back into W's columns before every forward, so the forward is the one
matmul of the plain layer and there is no adapter path. The weight gradient of those columns is
dY^T X[:, idx], so only the k matching input columns are saved for backward, not the whole input
(PaCA's activation saving; with a frozen base nothing else needs X). Everything else in the model
is frozen, as with an adapter.

``save_partial`` writes only the trained columns and their indices (a small safetensors file),
``load_partial`` puts them back (installing PaCA where it is missing), and ``merge_partial`` folds
them into W and removes the hooks (a plain model again).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .instance_forward import InstanceForward, remove_wrapper

ADAPTER_FILE = "paca_adapter.safetensors"


class PartialLinearFn(torch.autograd.Function):
    """y = x W^T + b where W's columns ``idx`` hold ``cols``; grads for x and ``cols`` only."""

    @staticmethod
    def forward(ctx, x, weight, cols, idx, bias):
        y = F.linear(x, weight, bias)
        x_cols = x.index_select(-1, idx) if ctx.needs_input_grad[2] else None
        ctx.save_for_backward(x_cols, weight if ctx.needs_input_grad[0] else None)
        ctx.dtypes = (x.dtype, cols.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        x_cols, weight = ctx.saved_tensors
        x_dtype, cols_dtype = ctx.dtypes  # autocast may have run the forward matmul in another dtype
        gx = (gy.to(weight.dtype) @ weight).to(x_dtype) if weight is not None else None
        gcols = None
        if x_cols is not None:
            g2 = gy.reshape(-1, gy.shape[-1]).t()
            gcols = (g2.to(x_cols.dtype) @ x_cols.reshape(-1, x_cols.shape[-1])).to(cols_dtype)
        return gx, None, gcols, None, None


class _PartialForward(InstanceForward):
    """The layer's one matmul with W's trained columns written in first (see the module docstring)."""

    def forward(self, x):
        module = self.module
        with torch.no_grad():  # in place: W's columns follow the trained parameter (no version bump)
            module.weight.data.index_copy_(1, module.paca_index, module.paca_weight.data.to(module.weight.dtype))
        return PartialLinearFn.apply(x, module.weight, module.paca_weight, module.paca_index, module.bias)


DEFAULT_FRACTION = 0.05


def partial_columns(in_features: int, fraction: Optional[float] = None, r: Optional[int] = None) -> int:
    """k, the trained input columns of a weight: ``r`` (capped at in_features), else ``fraction`` of
    them (default 5%), at least one."""
    if r is not None:
        return min(int(r), in_features)
    return max(1, int(round((DEFAULT_FRACTION if fraction is None else fraction) * in_features)))


def column_indices(in_features: int, fraction: Optional[float], seed: int, name: str, r: Optional[int] = None) -> torch.Tensor:
    """The sorted input columns trained for module ``name``: a seeded draw, stable across runs."""
    k = partial_columns(in_features, fraction, r)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randperm(in_features, generator=g)[:k].sort().values


def _matches(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def _install(module: nn.Linear, idx: torch.Tensor) -> None:
    w = module.weight
    module.weight.requires_grad_(False)
    if module.bias is not None:
        module.bias.requires_grad_(False)
    idx = idx.to(w.device)
    module.register_buffer("paca_index", idx, persistent=True)
    module.paca_weight = nn.Parameter(w.detach().index_select(1, idx).clone())
    _PartialForward(module).install()


def partial_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Names -> modules that carry trained partial columns."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "paca_weight", None), nn.Parameter)}


def apply_partial(model: nn.Module, fraction: Optional[float] = None, target_modules: Union[str, Iterable[str]] = "all-linear",
                  seed: int = 0, r: Optional[int] = None) -> nn.Module:
    """Freeze the model and make ``r`` input columns (or ``fraction`` of them; 5% if neither is
    given) of each target Linear trainable.

    ``target_modules``: "all-linear" (every nn.Linear except the output embedding) or names matched
    like peft (exact or dotted suffix). Raises ValueError on a bad fraction or r, both given, or no
    matching module.
    """
    if fraction is not None and r is not None:
        raise ValueError("sparsity.partial: give fraction or r (columns per weight), not both")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ValueError(f"sparsity.partial.fraction must be in (0, 1], got {fraction!r}")
    if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ValueError(f"sparsity.partial.r must be an integer >= 1, got {r!r}")
    if target_modules != "all-linear":
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        target_modules = list(target_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = []
    for name, m in model.named_modules():
        if m is head or not _matches(name, target_modules):
            continue
        if type(m) is nn.Linear:
            chosen.append((name, m))
        elif target_modules != "all-linear" and isinstance(m, nn.Module) and any(name.endswith(t) for t in target_modules) \
                and hasattr(m, "in_features") and not isinstance(m, nn.Linear):
            raise ValueError(f"sparsity.partial: {name} is a {type(m).__name__}, not a plain nn.Linear "
                             "(PaCA trains columns of unquantized, unwrapped weights)")
    if not chosen:
        raise ValueError(f"sparsity.partial: no nn.Linear matches target_modules={target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in chosen:
        if hasattr(m, "paca_weight"):
            raise ValueError(f"sparsity.partial is already applied to {name}")
        _install(m, column_indices(m.in_features, fraction, seed, name, r))
    model._efft_partial = {"fraction": None if fraction is None else float(fraction), "r": r, "seed": int(seed),
                           "target_modules": target_modules if target_modules == "all-linear" else list(target_modules)}
    return model


def _adapter_path(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / ADAPTER_FILE


def save_partial(model: nn.Module, path: Union[str, os.PathLike]) -> str:
    """Write the trained columns and their indices to ``path`` (a directory, or a .safetensors file).

    Returns the file written. Only the k trained columns per weight are stored (k / in_features of
    the target weights' size).
    """
    from safetensors.torch import save_file

    mods = partial_modules(model)
    if not mods:
        raise ValueError("save_partial: the model has no PaCA columns (apply_partial first)")
    tensors = {}
    for name, m in mods.items():
        tensors[f"{name}.paca_weight"] = m.paca_weight.detach().cpu().contiguous()
        tensors[f"{name}.paca_index"] = m.paca_index.detach().cpu().contiguous()
    out = _adapter_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "efft-paca", "config": json.dumps(getattr(model, "_efft_partial", {}))}
    save_file(tensors, str(out), metadata=meta)
    return str(out)


def load_partial(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load trained columns saved by :func:`save_partial` into ``model`` (same architecture).

    Modules without PaCA get it installed with the saved indices; modules that have it must have the
    same indices. Raises ValueError for a file from another model (missing module, shape mismatch).
    """
    from safetensors import safe_open

    src = _adapter_path(path)
    if not src.is_file():
        raise FileNotFoundError(f"load_partial: no PaCA adapter at {src}")
    modules = dict(model.named_modules())
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "efft-paca":
            raise ValueError(f"load_partial: {src} is not an efft PaCA adapter (metadata {meta})")
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        loaded = {n: (f.get_tensor(f"{n}.paca_weight"), f.get_tensor(f"{n}.paca_index")) for n in names}
    fresh = not partial_modules(model)
    if fresh:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, (cols, idx) in loaded.items():
        m = modules.get(name)
        if type(m) is not nn.Linear:
            raise ValueError(f"load_partial: the adapter has columns for {name!r}, which is not an nn.Linear in this model")
        if cols.shape != (m.out_features, idx.numel()) or int(idx.max()) >= m.in_features:
            raise ValueError(f"load_partial: {name}: adapter columns {tuple(cols.shape)} do not fit weight {tuple(m.weight.shape)}")
        if not hasattr(m, "paca_weight"):
            _install(m, idx)
        elif not torch.equal(m.paca_index.cpu(), idx):
            raise ValueError(f"load_partial: {name}: the model trains other columns than the adapter (different seed, fraction or r)")
        with torch.no_grad():
            m.paca_weight.copy_(cols.to(m.paca_weight.dtype))
            m.weight.index_copy_(1, m.paca_index, m.paca_weight.to(m.weight.dtype))
    if fresh or not hasattr(model, "_efft_partial"):
        cfg = json.loads(meta.get("config", "{}") or "{}")
        model._efft_partial = cfg
    return model


def merge_partial(model: nn.Module, modules: Optional[dict] = None) -> nn.Module:
    """Fold the trained columns into the full weights and remove PaCA (a plain model afterwards).

    The merged weights are left frozen; call ``requires_grad_`` to train them further.
    """
    for name, m in (modules or partial_modules(model)).items():
        with torch.no_grad():
            m.weight.index_copy_(1, m.paca_index, m.paca_weight.detach().to(m.weight.dtype))
        del m.paca_weight
        del m._buffers["paca_index"]
        remove_wrapper(m, _PartialForward)  # only PaCA's: loss_tokens' last-block wrapper over it stays
    model.__dict__.pop("_efft_partial", None)
    return model
