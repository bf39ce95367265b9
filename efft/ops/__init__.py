"""efft.ops: Triton kernels with plain-torch references and impl="auto"|"triton"|"torch" dispatch.

Importing this package never imports triton; kernels are loaded on first use.
"""
from .dequant_matmul import DequantMatmul, dequant_matmul, dequant_matmul_reference

__all__ = ["DequantMatmul", "dequant_matmul", "dequant_matmul_reference"]
