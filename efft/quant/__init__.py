"""efft.quant: quantized base weights (NF4 / FP4 / int8), bitsandbytes-compatible.

Only torch is needed to import this package; peft, safetensors and transformers are imported by
the functions that use them.
"""
from .formats import (
    create_dynamic_map,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_int8_rowwise,
    quantize_4bit,
    quantize_blockwise,
    quantize_int8_rowwise,
)
from .state import QuantState

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise",
    "create_dynamic_map", "quantize_int8_rowwise", "dequantize_int8_rowwise",
]
