"""QuantLinear: a frozen Linear whose weight is stored NF4/FP4 (packed, blockwise absmax, optional
double quant) or int8 (row-wise absmax, optional LLM.int8() outlier columns).

The packed weight and its statistics are buffers, so ``.to(device)`` moves them and they never
reach an optimizer. ``state_dict()`` writes the transformers + bitsandbytes key layout
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``; int8: ``weight``, ``SCB``,
``weight_format``), and ``load_state_dict`` reads it (see efft/quant/io.py). The 4-bit forward
is ``efft.ops.dequant_matmul``, which never keeps a dequantized weight between forward and
backward; the int8 forward is efft/quant/int8.py with the same property.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .formats import (
    BLOCKSIZES_4BIT,
    NESTED_BLOCKSIZE,
    dequantize_4bit,
    dequantize_int8_rowwise,
    dynamic_map,
    get_4bit_code,
    quantize_4bit,
    quantize_int8_rowwise,
)
from .state import QuantState

QUANT_TYPES = ("nf4", "fp4", "int8")
KERNELS = ("auto", "triton", "torch")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def as_dtype(d: Union[str, torch.dtype], what: str = "dtype") -> torch.dtype:
    """'bfloat16' / torch.bfloat16 -> torch.bfloat16; only float32, bfloat16, float16."""
    if isinstance(d, torch.dtype) and d in (torch.float32, torch.bfloat16, torch.float16):
        return d
    if isinstance(d, str) and d.replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[d.replace("torch.", "")]
    raise ValueError(f"{what} must be one of float32, bfloat16, float16; got {d!r}")


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W frozen in 4-bit or int8; computes in ``compute_dtype``, returns x's dtype.

    Build with :meth:`from_linear` / :meth:`from_weight`, or construct empty (any device, including
    meta) and fill with :meth:`quantize_weight_` or ``load_state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: Union[str, torch.dtype] = torch.bfloat16,
                 weight_dtype: Union[str, torch.dtype] = torch.float32,
                 outlier_threshold: Optional[float] = None, kernel: str = "auto", device=None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if quant_type != "int8" and blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if outlier_threshold is not None and (quant_type != "int8" or not outlier_threshold > 0):
            raise ValueError(f"outlier_threshold applies to int8 only and must be > 0; got {outlier_threshold!r} "
                             f"with quant_type={quant_type!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant) and quant_type != "int8"
        self.compute_dtype = as_dtype(compute_dtype, "compute_dtype")
        self.weight_dtype = as_dtype(weight_dtype, "weight_dtype")
        self.outlier_threshold = outlier_threshold
        self.kernel = kernel
        self._alloc(device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------------------ storage
    def _alloc(self, device) -> None:
        """Zero buffers of the right shapes (filled later by quantize_weight_ or load_state_dict)."""
        n = self.in_features * self.out_features
        kw = dict(persistent=False)
        for name in ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset", "SCB"):
            if name in self._buffers:
                del self._buffers[name]
        if self.quant_type == "int8":
            self.register_buffer("weight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8,
                                                       device=device), **kw)
            self.register_buffer("SCB", torch.zeros(self.out_features, dtype=torch.float32, device=device), **kw)
            return
        nb = -(-n // self.blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), **kw)
        code = get_4bit_code(self.quant_type).to(device)
        self.register_buffer("quant_map", code.clone(), **kw)
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8, device=device), **kw)
            self.register_buffer("nested_absmax", torch.zeros(-(-nb // NESTED_BLOCKSIZE), dtype=torch.float32,
                                                              device=device), **kw)
            self.register_buffer("nested_quant_map", dynamic_map().to(device).clone(), **kw)
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device), **kw)
        else:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32, device=device), **kw)

    def _apply(self, fn, recurse=True):
        """Device moves apply to the packed weight and statistics; dtype casts (``model.half()``,
        ``model.to(torch.bfloat16)``) do not: the codes and their float32 scales are the format."""
        before = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    @property
    def quant_state(self) -> QuantState:
        """The QuantState view of this layer's buffers (4-bit only)."""
        if self.quant_type == "int8":
            raise AttributeError("an int8 QuantLinear has no 4-bit QuantState (see .weight and .SCB)")
        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, shape=self.absmax.shape, dtype=torch.float32,
                                blocksize=NESTED_BLOCKSIZE, quant_type="dynamic", code=self.nested_quant_map)
            offset = self.nested_offset
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          code=self.quant_map, offset=offset, state2=state2)

    def set_quantized_(self, packed: torch.Tensor, state: QuantState) -> "QuantLinear":
        """Adopt an already-quantized 4-bit weight (its format wins over the constructor's)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear[{self.out_features}x{self.in_features}]: quantized weight has shape "
                             f"{tuple(state.shape)}, expected ({self.out_features}, {self.in_features})")
        if state.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"expected a 4-bit state with quant_type nf4 or fp4, got {state.quant_type!r}")
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, int(state.blocksize), state.nested
        self.weight_dtype = state.dtype
        self._alloc("meta")
        self.weight = packed.reshape(-1, 1)
        self.absmax, self.quant_map = state.absmax, state.code
        if state.nested:
            self.nested_absmax, self.nested_quant_map = state.state2.absmax, state.state2.code
            self.nested_offset = state.offset.reshape(()).float()
        return self

    def set_int8_(self, q: torch.Tensor, scb: torch.Tensor) -> "QuantLinear":
        """Adopt an int8 row-wise weight [out, in] and its float32 row absmax [out]."""
        if q.dtype != torch.int8 or tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected an int8 weight of shape ({self.out_features}, {self.in_features}), "
                             f"got {q.dtype} {tuple(q.shape)}")
        if scb.numel() != self.out_features:
            raise ValueError(f"expected SCB with {self.out_features} row scales, got {scb.numel()}")
        self.quant_type, self.double_quant = "int8", False
        self._alloc("meta")
        self.weight, self.SCB = q, scb.reshape(-1).float()
        return self

    @torch.no_grad()
    def quantize_weight_(self, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize a full-precision weight [out, in] into this layer (on w's device)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear[{self.out_features}x{self.in_features}]: weight has shape {tuple(w.shape)}, "
                             f"expected ({self.out_features}, {self.in_features})")
        if self.quant_type == "int8":
            q, scb, _ = quantize_int8_rowwise(w)
            self.weight_dtype = w.dtype
            self.set_int8_(q, scb)
        else:
            packed, state = quantize_4bit(w, self.quant_type, self.blocksize, self.double_quant)
            self.set_quantized_(packed, state)
        if bias is not None:
            if self.bias is None:
                raise ValueError("this QuantLinear was built without a bias, but a bias was given")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return self

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, **kw) -> "QuantLinear":
        """A QuantLinear holding ``weight`` [out, in] quantized (kw: the constructor's options)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None, weight_dtype=weight.dtype, device="meta", **kw)
        return layer.quantize_weight_(weight, bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, **kw) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (or transformers' Conv1D, whose weight is [in, out])."""
        w = linear.weight.detach()
        if type(linear).__name__ == "Conv1D":
            w = w.t()
        bias = None if getattr(linear, "bias", None) is None else linear.bias.detach()
        layer = cls.from_weight(w, bias, **kw)
        if layer.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    # ------------------------------------------------------------------------------ compute
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full weight [out, in] (default: the dtype it was quantized from)."""
        dtype = dtype or self.weight_dtype
        if self.quant_type == "int8":
            return dequantize_int8_rowwise(self.weight, self.SCB, dtype)
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self.quant_type == "int8":
            from .int8 import int8_matmul

            y = int8_matmul(x, self.weight, self.SCB, bias, self.outlier_threshold)
        else:
            from efft.ops import dequant_matmul  # lazy: efft.ops imports efft.quant

            y = dequant_matmul(x, self.weight, self.quant_state, bias, impl=self.kernel)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        fmt = self.quant_type if self.quant_type == "int8" else (
            f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")
        extra = f", outlier_threshold={self.outlier_threshold}" if self.outlier_threshold else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{fmt}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}{extra}")

    def quantized_nbytes(self) -> int:
        """Bytes of the quantized weight and its statistics (bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    # ------------------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        from .io import layer_tensors

        for k, v in layer_tensors(self).items():
            destination[prefix + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        from .io import QuantCheckpointError, load_layer_tensors

        mine = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix) and (k[len(prefix):] in ("weight", "SCB", "weight_format")
                                             or k[len(prefix):].startswith("weight."))}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for k in list(unexpected_keys):
            if k.startswith(prefix) and k[len(prefix):] in mine:
                unexpected_keys.remove(k)
        if not mine:  # nothing for this layer (e.g. an adapter-only state dict): PyTorch's "missing"
            missing_keys.append(prefix + "weight")
            return
        try:
            load_layer_tensors(self, mine, prefix)
        except QuantCheckpointError as e:
            error_msgs.append(str(e))
