"""WTA-CRS sampled-activation linear: the weight gradient from a sampled subset of input rows.

For y = x W^T the weight gradient is dW = sum_i dy_i^T x_i over the R rows (tokens) of the batch,
and plain autograd keeps all of x for it. Winner-take-all column-row sampling (Liu et al. 2023)
keeps k = keep * R rows: the ``deterministic_fraction`` share of k with the largest sampling weight
p_i exactly, and the rest drawn with replacement from the remaining rows with probability
q_j = p_j / P_rest, each drawn row scaled by 1 / (s q_j) (s draws). The estimate is unbiased,
E[dW_hat] = dW, for any positive p; its variance is smallest when p_i ~ ||x_i|| ||dy_i||.
||dy_i|| is unknown in forward, so each layer keeps a per-position gradient-norm proxy from its
previous backward (the last micro-batch, averaged over the batch; no dataset-index cache), and the
first step uses ||x_i|| alone.

Only the kept rows of x (and their indices and scales) are saved for backward; the input gradient
dx = dy W and the bias gradient are exact. Layers that share an input (q/k/v, gate/up) share one
sample, so the kept rows are stored once, as autograd stores the shared input once.

Applies to every ``nn.Linear`` whose weight trains: plain layers, peft LoRA's ``lora_A``/``lora_B``
(the layers that keep the input of a LoRA-wrapped base, frozen or quantized, for their gradients),
quantized layers with a trainable weight carrier (efft's Int8TrainableLinear: dequantize() in
forward and backward, only sampled rows kept) and PEQA's quantized layers with trainable scales
(their scale gradient is a block sum of dW * code values, so the sampled dW gives it unbiased). A
frozen layer (nn.Linear or a QuantLinear base) keeps no input for a weight gradient, so there is
nothing to sample there and it is left as is. Uses ``efft.ops.sparse_weight_grad`` for
the sampled product (Triton on CUDA, its torch reference otherwise).
"""
from __future__ import annotations

import functools
import weakref
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .instance_forward import InstanceForward


def sample_rows(weights: torch.Tensor, k: int, n_det: int, generator: Optional[torch.Generator] = None):
    """WTA-CRS row sample: ``(idx [k], scale [k])`` such that sum_t scale_t * f(idx_t) is an
    unbiased estimate of sum_i f(i) for any f.

    With k >= R every row is kept with scale 1 (exact). Otherwise the ``n_det`` rows with the
    largest ``weights`` are kept with scale 1 (at most k - 1 when k < R,
    so a deterministic fraction of 1 still leaves one draw for the rest); ``k - n_det`` rows are
    drawn with replacement from the others with probability q_j = w_j / sum(rest) and scale
    1 / ((k - n_det) q_j). Weights are floored at a small positive value so no row is impossible.
    """
    r = weights.numel()
    # a non-finite weight (an inf activation in fp16: that step's loss is inf and skipped) gets the floor
    w = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    w = w + (w.mean() * 1e-4 + 1e-30)
    if k >= r:  # the budget covers every row: keep them all, exactly (no draw, no noise)
        return torch.arange(r, device=w.device), torch.ones(r, device=w.device, dtype=torch.float32)
    n_det = min(n_det, k, r)
    if k < r:  # at least one draw stands for the rows outside the top n_det (all-deterministic drops them: biased)
        n_det = min(n_det, k - 1)
    s = k - n_det
    if n_det:
        det = torch.topk(w, n_det, sorted=False).indices
    else:
        det = torch.empty(0, dtype=torch.long, device=w.device)
    if s <= 0 or n_det >= r:
        return det, torch.ones(det.numel(), device=w.device, dtype=torch.float32)
    rest = w.clone()
    rest[det] = 0
    mass = rest.sum()
    drawn = torch.multinomial(rest / mass, s, replacement=True, generator=generator)
    scale = mass / (s * rest[drawn])
    return torch.cat([det, drawn]), torch.cat([torch.ones(n_det, device=w.device), scale])


def uniform_rows(r: int, k: int, device=None, generator: Optional[torch.Generator] = None):
    """Plain column-row sampling with uniform probabilities (the baseline): k draws, scale r / k."""
    idx = torch.randint(0, r, (k,), device=device, generator=generator)
    return idx, torch.full((k,), r / k, device=device)


def _weight_grad(gy2, x_kept, idx, scale, dtype):
    """sum_t scale_t dy[idx_t]^T x_kept[t]: efft.ops' sparse weight gradient (Triton on CUDA, its torch
    reference elsewhere) pairs the compact saved rows with dY's rows without gathering dY."""
    try:
        from efft.ops import sparse_weight_grad
    except ImportError:  # ops not present: plain torch
        d = gy2.index_select(0, idx)
        return ((d.float() * scale[:, None]).to(d.dtype).t() @ x_kept.to(d.dtype)).to(dtype)
    return sparse_weight_grad(gy2, x_kept, idx, row_scale=scale, out_dtype=dtype, x_compact=True)


class SampledLinearFn(torch.autograd.Function):
    """y = x W^T + b; backward: exact dx and db, WTA-CRS dW from the saved rows ``x_kept``."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_kept, idx, scale, state):
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, x_kept, idx, scale)
        ctx.state = state
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        weight, x_kept, idx, scale = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = (gy.to(weight.dtype) @ weight).to(gy.dtype) if weight is not None else None
        gw = _weight_grad(gy2, x_kept, idx, scale, ctx.state.weight_dtype) if ctx.needs_input_grad[1] else None
        gb = gy2.sum(0) if ctx.needs_input_grad[2] else None
        if ctx.state is not None:
            ctx.state.observe(gy2, ctx.x_shape)
        return gx, gw, gb, None, None, None, None


class DequantSampledLinearFn(torch.autograd.Function):
    """The same for a quantized layer with a trainable weight (efft's Int8TrainableLinear: int8
    codes, float32 gradient carrier): W is dequantized in forward and again in backward for dx, never
    kept; dW (the carrier's gradient) is the WTA-CRS estimate."""

    @staticmethod
    def forward(ctx, x, carrier, bias, x_kept, idx, scale, state, layer):
        cd = getattr(layer, "compute_dtype", None) or x.dtype
        y = F.linear(x.to(cd), layer.dequantize(cd), None if bias is None else bias.to(cd))
        ctx.save_for_backward(x_kept, idx, scale)
        ctx.layer, ctx.state, ctx.cd, ctx.x_dtype, ctx.x_shape = layer, state, cd, x.dtype, x.shape
        ctx.has_bias = bias is not None
        codes = getattr(layer, "weight_codes", None)
        ctx.version = codes._version if torch.is_tensor(codes) else None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x_kept, idx, scale = ctx.saved_tensors
        codes = getattr(ctx.layer, "weight_codes", None)
        if ctx.version is not None and codes._version != ctx.version:  # as Int8TrainableLinear's own backward checks
            raise RuntimeError(f"{getattr(ctx.layer, '_name', None) or type(ctx.layer).__name__}: its int8 weight was updated "
                               "between forward and backward (an optimizer step inside the graph?); the gradient would be wrong")
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = (gy.to(ctx.cd) @ ctx.layer.dequantize(ctx.cd)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = _weight_grad(gy2.to(ctx.cd), x_kept.to(ctx.cd), idx, scale, ctx.state.weight_dtype) if ctx.needs_input_grad[1] else None
        gb = gy2.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.state.observe(gy2, ctx.x_shape)
        return gx, gw, gb, None, None, None, None, None


class PEQASampledFn(torch.autograd.Function):
    """The same for PEQA (efft.quant.peqa.PEQALinear: frozen codes, trainable scales): the scale
    gradient is a linear function of dW (a block sum of dW * code values), so it is computed from the
    WTA-CRS estimate of dW and stays unbiased; W is rebuilt from codes and scales in backward."""

    @staticmethod
    def forward(ctx, x, scales, bias, x_kept, idx, scale, state, layer):
        from efft.quant.peqa import _weight

        y = F.linear(x, _weight(layer, scales, x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(scales, x_kept, idx, scale)
        ctx.layer, ctx.state, ctx.x_shape, ctx.has_bias = layer, state, x.shape, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        from efft.quant.peqa import _weight, scale_grad

        scales, x_kept, idx, scale = ctx.saved_tensors
        layer = ctx.layer
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gy @ _weight(layer, scales, gy.dtype) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = scale_grad(layer, _weight_grad(gy2.float(), x_kept.float(), idx, scale, torch.float32)).to(scales.dtype)
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.state.observe(gy2, ctx.x_shape)
        return gx, gs, gb, None, None, None, None, None


class _LayerState:
    """Per-layer proxy of ||dy|| by position (from the last backward) and the shared-sample cache."""

    def __init__(self, weight_dtype: torch.dtype, keep: float, n_det_fraction: float, shared: "SharedSamples"):
        self.keep, self.det_fraction, self.shared = keep, n_det_fraction, shared
        self.proxy: Optional[torch.Tensor] = None
        self.weight_dtype = weight_dtype

    def observe(self, gy2: torch.Tensor, x_shape) -> None:
        seq = x_shape[-2] if len(x_shape) >= 3 else gy2.shape[0]
        norms = gy2.float().norm(dim=1).reshape(-1, seq).mean(0).detach()
        finite = torch.isfinite(norms)  # an overflowing backward (fp16, skipped by the scaler) says nothing
        if self.proxy is not None and self.proxy.shape == norms.shape:
            norms = torch.where(finite, 0.5 * (self.proxy + norms), self.proxy)
        else:
            norms = torch.where(finite, norms, torch.zeros_like(norms))
        self.proxy = norms

    def weights(self, x2: torch.Tensor, seq: int) -> torch.Tensor:
        w = x2.float().norm(dim=1)
        if self.proxy is not None and self.proxy.numel() == seq and self.proxy.device == w.device:
            w = (w.view(-1, seq) * self.proxy[None, :]).reshape(-1)
        return w


class SharedSamples:
    """One sample per input tensor per forward, so layers reading the same x store its rows once."""

    def __init__(self):
        self._cache: dict = {}

    def clear(self) -> None:
        self._cache.clear()

    def __getstate__(self):  # a copy or pickle of the model starts without samples (they live for one forward)
        return {"_cache": {}}

    def get(self, x: torch.Tensor, state: _LayerState, dtype: Optional[torch.dtype] = None):
        """(kept rows, their indices, their scales) of ``x``, the kept rows cast to ``dtype`` if given
        (PEQA computes in its compute dtype: keyed on the input itself, so its q/k/v still share)."""
        key = (x.data_ptr(), x._version, tuple(x.shape), x.dtype, dtype, state.keep, state.det_fraction)
        hit = self._cache.get(key)
        # reuse only for another layer in the same pass; a layer seeing the same x again is a new pass
        if hit is not None and hit[0]() is x and id(state) not in hit[2]:
            hit[2].add(id(state))
            return hit[1]
        x2 = x.detach().reshape(-1, x.shape[-1])
        seq = x.shape[-2] if x.dim() >= 3 else x2.shape[0]
        r = x2.shape[0]
        k = max(1, int(round(state.keep * r)))
        with torch.no_grad():
            idx, scale = sample_rows(state.weights(x2, seq), k, int(round(state.det_fraction * k)))
            kept = x2.index_select(0, idx)
            if dtype is not None:
                kept = kept.to(dtype)
        out = (kept, idx, scale)
        cache = self._cache

        def drop(ref, key=key):  # x freed: forget its sample (unless the key was reused since)
            if key in cache and cache[key][0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(x, drop), out, {id(state)})
        return out


class _SampledForward(InstanceForward):
    """The layer's forward with a WTA-CRS weight gradient in training (its own forward otherwise)."""

    def __init__(self, module: nn.Module, state: _LayerState, kind: str):
        super().__init__(module)
        self.state, self.kind = state, kind

    def forward(self, x):
        module, state, kind = self.module, self.state, self.kind
        trains = any(p.requires_grad for p in _trained(module)) if kind == "peqa" else module.weight.requires_grad
        if not (torch.is_grad_enabled() and trains and module.training):
            if trains and module.training and torch.is_tensor(x):
                # reentrant checkpointing's no-grad pass: draw the sample its recompute will draw from the
                # restored RNG state, so the random stream (dropout masks) stays the same in both passes
                state.shared.get(x, state, module.compute_dtype if kind == "peqa" else None)
            return self.inner(x)
        if kind == "peqa":
            kept, idx, scale = state.shared.get(x, state, module.compute_dtype)
            xc = x.to(module.compute_dtype)
            return PEQASampledFn.apply(xc, module.scales(), module.bias, kept, idx, scale, state, module).to(x.dtype)
        kept, idx, scale = state.shared.get(x, state)
        if kind == "dequant":
            return DequantSampledLinearFn.apply(x, module.weight, module.bias, kept, idx, scale, state, module)
        return SampledLinearFn.apply(x, module.weight, module.bias, kept, idx, scale, state)


def _clear_samples(shared: "SharedSamples", *_) -> None:
    """Model forward pre/post hook (a partial, not a closure: deepcopy and pickle follow it)."""
    shared.clear()


def _trainable_quantized(m: nn.Module) -> bool:
    """A quantized linear (duck-typed: in/out_features, dequantize()) whose ``weight`` parameter is
    a trainable gradient carrier of shape (out, in), like efft's Int8TrainableLinear."""
    w = getattr(m, "weight", None)
    return (type(m) is not nn.Linear and callable(getattr(m, "dequantize", None)) and hasattr(m, "in_features")
            and isinstance(w, nn.Parameter) and w.requires_grad and tuple(w.shape) == (m.out_features, m.in_features))


def _peqa(m: nn.Module) -> bool:
    from efft.quant.peqa import PEQALinear

    return isinstance(m, PEQALinear) and any(p.requires_grad for p in _trained(m))


def _trained(m: nn.Module) -> list:
    """A PEQA layer's trainable scale parameter (block or channel scales)."""
    return [p for p in (getattr(m, "block_scales", None), getattr(m, "channel_scales", None)) if isinstance(p, nn.Parameter)]


def _name_matches(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    # a whole dotted component or suffix, as peft matches: "up_proj" is not "gate_up_proj"; a LoRA's
    # lora_A/lora_B match through their wrapped layer's component
    parts = name.split(".")
    return any(t in parts or name == t or name.endswith("." + t) for t in targets)


def apply_sampled_linear(model: nn.Module, keep: float = 0.3, deterministic_fraction: float = 0.5,
                         target_modules: Union[str, Iterable[str]] = "all-linear") -> nn.Module:
    """Make the weight gradients of the model's trainable ``nn.Linear`` layers WTA-CRS estimates.

    ``target_modules``: "all-linear" (all but the output embedding) or names; a LoRA's inner
    ``lora_A``/``lora_B`` match their wrapped layer's name. Returns the model; raises ValueError on
    a bad ``keep``/``deterministic_fraction`` or when nothing trainable matches.
    """
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ValueError(f"sparsity.sampled_linear.keep must be in (0, 1], got {keep!r}")
    if not (isinstance(deterministic_fraction, (int, float)) and 0 <= deterministic_fraction <= 1):
        raise ValueError(f"sparsity.sampled_linear.deterministic_fraction must be in [0, 1], got {deterministic_fraction!r}")
    if target_modules != "all-linear":
        target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    head = None
    try:
        from .loss_tokens import _unwrap

        lm = _unwrap(model)
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    except Exception:  # not a transformers model: no head to exclude
        head = None
    # the head and what it wraps (peft modules_to_save keeps the trained copy of lm_head inside a wrapper)
    in_head = {id(x) for x in head.modules()} if isinstance(head, nn.Module) else set()
    shared = getattr(model, "_efft_sampled_shared", None) or SharedSamples()
    done = []
    for name, m in model.named_modules():
        if id(m) in in_head or hasattr(m, "_efft_sampled") or not _name_matches(name, target_modules):
            continue
        if _peqa(m):
            kind, wdtype = "peqa", torch.float32
        elif _trainable_quantized(m):
            kind, wdtype = "dequant", m.weight.dtype
        elif type(m) is nn.Linear and m.weight.requires_grad:
            kind, wdtype = "linear", m.weight.dtype
        else:
            continue  # frozen (plain or quantized): autograd keeps no input for a weight gradient here
        state = _LayerState(wdtype, float(keep), float(deterministic_fraction), shared)
        m._efft_sampled = state
        _SampledForward(m, state, kind).install()
        done.append(name)
    if not done:
        raise ValueError(f"sparsity.sampled_linear: no trainable linear layer (nn.Linear, LoRA, int8 trainable, PEQA) matches "
                         f"target_modules={target_modules!r} "
                         "(apply it after the adapter, or to a model whose linear weights train)")
    if not hasattr(model, "_efft_sampled_shared"):
        model._efft_sampled_shared = shared
        # a sample lives for one forward; autograd keeps what backward needs
        model.register_forward_pre_hook(functools.partial(_clear_samples, shared))
        model.register_forward_hook(functools.partial(_clear_samples, shared))
    return model


def sampled_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "_efft_sampled")}
