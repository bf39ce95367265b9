"""efft.quant: quantized base weights (NF4 / FP4 / int8), bitsandbytes-compatible.

Only torch is needed to import this package; peft, safetensors, accelerate and transformers are
imported by the functions that use them (``efft.quant.peft`` and ``efft.quant.peqa`` are imported
explicitly).
"""
from .convert import quantize_from_checkpoint, quantize_model
from .formats import (
    create_dynamic_map,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_int8_rowwise,
    quantize_4bit,
    quantize_blockwise,
    quantize_int8_rowwise,
)
from .io import QuantCheckpointError, load_quantized, save_quantized
from .linear import QuantLinear
from .recipe import prepare
from .state import QuantState

__all__ = [
    "QuantState", "QuantLinear", "quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise",
    "create_dynamic_map", "quantize_int8_rowwise", "dequantize_int8_rowwise", "quantize_model",
    "quantize_from_checkpoint", "save_quantized", "load_quantized", "QuantCheckpointError", "prepare",
]
