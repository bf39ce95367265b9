"""PEQA (Kim et al. 2023): fine-tune only the quantization scales of a quantized model.

Every 4-bit or int8 QuantLinear becomes a :class:`PEQALinear`: its integer codes stay frozen and
its scales become the only trainable tensor, either one per quantization block (``"block"``:
the absmax of each NF4/FP4 block, or the row absmax of int8) or one multiplier per output row
on top of the block scales (``"channel"``, the paper's per-channel form; blocks must not cross
rows). ``W = value(code) * scale[block]`` is rebuilt in forward and again in backward, so only
the layer input and the scales are saved for backward. :func:`export_peqa` folds the trained
scales back into QuantLinear layers, which save and load in the bitsandbytes 4-bit layout.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .formats import (
    NESTED_BLOCKSIZE,
    dynamic_map,
    quantize_blockwise,
    unpack_4bit,
)
from .linear import QuantLinear
from .state import QuantState

GRANULARITIES = ("block", "channel")


def _unit_values(layer: "PEQALinear") -> torch.Tensor:
    """The frozen normalized weights (code values, int8 / 127), flat, zero-padded to whole blocks."""
    n = layer.out_features * layer.in_features
    if layer.quant_type == "int8":
        v = layer.codes.reshape(-1).float() * (1.0 / 127.0)
    else:
        v = layer.quant_map.float()[unpack_4bit(layer.codes, n).long()]
    pad = layer.n_blocks * layer.blocksize - n
    return torch.nn.functional.pad(v, (0, pad)) if pad else v


def _weight(layer: "PEQALinear", scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = layer.out_features * layer.in_features
    v = _unit_values(layer).view(layer.n_blocks, layer.blocksize)
    w = (v * scales.float().unsqueeze(1)).reshape(-1)[:n]
    return w.view(layer.out_features, layer.in_features).to(dtype)


def scale_grad(layer: "PEQALinear", dw: torch.Tensor) -> torch.Tensor:
    """Per-block scale gradient from the weight gradient ``dw`` [out, in]: W = v * scale[block], so
    dL/dscale[b] = sum over block b of dW * v. Linear in ``dw``: an unbiased estimate of dW (WTA-CRS)
    gives an unbiased scale gradient."""
    dw = dw.float().reshape(-1)
    pad = layer.n_blocks * layer.blocksize - dw.numel()
    if pad:
        dw = torch.nn.functional.pad(dw, (0, pad))
    return (dw * _unit_values(layer)).view(layer.n_blocks, layer.blocksize).sum(1)


class _ScaledCodeMatmul(torch.autograd.Function):
    """y = x W^T + b with W = values(codes) * scales[block]; grads for x, scales, bias."""

    @staticmethod
    def forward(ctx, x, scales, bias, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, scales)
        ctx.has_bias = bias is not None
        w = _weight(layer, scales, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, scales = ctx.saved_tensors
        layer = ctx.layer
        dx = dscales = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _weight(layer, scales, dy.dtype)
        if ctx.needs_input_grad[1]:
            dy2 = dy.reshape(-1, dy.shape[-1]).float()
            x2 = x.reshape(-1, x.shape[-1]).float()
            dscales = scale_grad(layer, dy2.t() @ x2).to(scales.dtype)  # dW transient [out, in]; never kept
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dscales, db, None


class PEQALinear(nn.Module):
    """Frozen integer codes, trainable scales (``block_scales`` or ``channel_scales``)."""

    def __init__(self, layer: QuantLinear, granularity: str = "block", train_bias: bool = False):
        super().__init__()
        if not isinstance(layer, QuantLinear):
            raise TypeError(f"PEQALinear wraps an efft QuantLinear, got {type(layer).__name__}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.quant_type, self.compute_dtype = layer.quant_type, layer.compute_dtype
        self.weight_dtype, self.granularity = layer.weight_dtype, granularity
        self.double_quant = layer.double_quant
        if layer.quant_type == "int8":
            self.blocksize = layer.in_features
            self.register_buffer("codes", layer.weight)
            block_scales = layer.SCB.float()
        else:
            self.blocksize = layer.blocksize
            self.register_buffer("codes", layer.weight)
            self.register_buffer("quant_map", layer.quant_map)
            from .formats import dequantize_absmax

            block_scales = dequantize_absmax(layer.quant_state).float()
        self.n_blocks = block_scales.numel()
        if granularity == "channel":
            if self.in_features % self.blocksize:
                raise ValueError(f"channel scales need blocks inside rows: in_features={self.in_features} is not a "
                                 f"multiple of blocksize={self.blocksize}")
            self.register_buffer("block_scales", block_scales.clone())
            self.channel_scales = nn.Parameter(torch.ones(self.out_features, device=block_scales.device))
        else:
            self.block_scales = nn.Parameter(block_scales.clone())
        self.bias = None
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=train_bias)

    def scales(self) -> torch.Tensor:
        """Effective per-block scales (differentiable w.r.t. the trained parameter)."""
        if self.granularity == "channel":
            per_row = self.in_features // self.blocksize
            return self.block_scales * self.channel_scales.repeat_interleave(per_row)
        return self.block_scales

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        with torch.no_grad():
            return _weight(self, self.scales(), dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        y = _ScaledCodeMatmul.apply(x.to(self.compute_dtype), self.scales(), self.bias, self)
        return y.to(in_dtype)

    def to_quant_linear(self, double_quant: Optional[bool] = None) -> QuantLinear:
        """A QuantLinear with the same codes and the trained scales (re-double-quantized if asked;
        default: as the layer was)."""
        dq = self.double_quant if double_quant is None else double_quant
        with torch.no_grad():
            s = self.scales().detach().float()
            q = QuantLinear(self.in_features, self.out_features, bias=self.bias is not None,
                            quant_type=self.quant_type, blocksize=self.blocksize if self.quant_type != "int8" else 64,
                            double_quant=dq, compute_dtype=self.compute_dtype, weight_dtype=self.weight_dtype,
                            device="meta")
            if self.quant_type == "int8":
                q.set_int8_(self.codes, s)
            else:
                state = QuantState(absmax=s, shape=torch.Size((self.out_features, self.in_features)),
                                   dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                                   code=self.quant_map)
                if dq:
                    offset = s.mean()
                    qa, a2 = quantize_blockwise(s - offset, blocksize=NESTED_BLOCKSIZE, rounding="bnb_cpu")
                    state2 = QuantState(absmax=a2, shape=qa.shape, dtype=torch.float32, blocksize=NESTED_BLOCKSIZE,
                                        quant_type="dynamic", code=dynamic_map(s.device).clone())
                    state = QuantState(absmax=qa, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                                       quant_type=state.quant_type, code=state.code, offset=offset, state2=state2)
                q.set_quantized_(self.codes, state)
            if self.bias is not None:
                q.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"granularity={self.granularity}, trainable scales={self.n_blocks if self.granularity == 'block' else self.out_features}")


def _swap(model: nn.Module, cls, make) -> int:
    count = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, cls):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(m))
            count += 1
    return count


def prepare_peqa(model: nn.Module, granularity: str = "block", train_bias: bool = False) -> nn.Module:
    """Make the quantization scales of every QuantLinear the only trainable parameters (in place).

    Raises if the model has no QuantLinear (quantize it first: ``quantize_model``).
    """
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("prepare_peqa: the model has no QuantLinear layers; quantize it first "
                         "(quant.type nf4, fp4 or int8)")
    for p in model.parameters():
        p.requires_grad_(False)
    _swap(model, QuantLinear, lambda m: PEQALinear(m, granularity, train_bias))
    return model


def export_peqa(model: nn.Module, double_quant: Optional[bool] = None) -> nn.Module:
    """Fold trained scales back into QuantLinear layers (in place), ready for ``save_quantized``."""
    _swap(model, PEQALinear, lambda m: m.to_quant_linear(double_quant))
    return model
