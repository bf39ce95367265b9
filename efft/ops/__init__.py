"""efft.ops: Triton kernels with plain-torch references and impl="auto"|"triton"|"torch" dispatch.

Importing this package never imports triton; kernels are loaded on first use.
"""
from .dequant_matmul import (DequantMatmul, dequant_matmul, dequant_matmul_backward_input_reference,
                             dequant_matmul_reference)
from .sparse import (sparse_dequant_input_grad, sparse_dequant_input_grad_reference, sparse_input_grad,
                     sparse_input_grad_reference, sparse_weight_grad, sparse_weight_grad_reference)

__all__ = [
    "DequantMatmul", "dequant_matmul", "dequant_matmul_reference", "dequant_matmul_backward_input_reference",
    "sparse_weight_grad", "sparse_input_grad", "sparse_dequant_input_grad",
    "sparse_weight_grad_reference", "sparse_input_grad_reference", "sparse_dequant_input_grad_reference",
]
