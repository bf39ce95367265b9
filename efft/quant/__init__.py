"""efft.quant: quantized base weights (NF4 / FP4 / int8), bitsandbytes-compatible."""
from .state import QuantState

__all__ = ["QuantState"]
