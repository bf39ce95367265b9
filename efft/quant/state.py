"""QuantState: everything needed to dequantize a packed 4-bit tensor.

Same fields as bitsandbytes' ``QuantState`` so that checkpoints and kernels agree on one layout:
the packed weight is the row-major flattened tensor, two 4-bit codes a byte (element 2p in the high
nibble of byte p); ``absmax`` holds one scale per ``blocksize`` consecutive elements. With double
quantization ``absmax`` is uint8 codes into ``state2.code`` (the 8-bit dynamic map), scaled per
256-block by ``state2.absmax`` and shifted by ``offset``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class QuantState:
    absmax: torch.Tensor  # float32 [n_blocks]; uint8 [n_blocks] when nested
    shape: torch.Size  # shape of the unquantized tensor
    dtype: torch.dtype  # dtype dequantize returns
    blocksize: int
    quant_type: str  # "nf4" | "fp4"
    code: torch.Tensor  # float32 [16]: value of each 4-bit code
    offset: Optional[torch.Tensor] = None  # float32 scalar, nested only
    state2: Optional["QuantState"] = None  # nested statistics: absmax float32, code = dynamic map [256], blocksize 256

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def to(self, device) -> "QuantState":
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            state2=None if self.state2 is None else self.state2.to(device),
        )

    def nbytes(self) -> int:
        """Bytes of the statistics (not the packed weight)."""
        total = self.absmax.numel() * self.absmax.element_size() + self.code.numel() * self.code.element_size()
        if self.offset is not None:
            total += self.offset.numel() * self.offset.element_size()
        if self.state2 is not None:
            total += self.state2.nbytes()
        return total
