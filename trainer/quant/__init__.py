"""Quantized base weights for QLoRA: NF4 via torchao's NF4Tensor (CPU and CUDA, no custom kernels)."""
from kubetune.trainer.quant.nf4 import (
    dequantize, is_nf4, nf4_layout_shards, quantize_base, tensor_nbytes, to_nf4, weight_nbytes,
)

__all__ = ["dequantize", "is_nf4", "nf4_layout_shards", "quantize_base", "tensor_nbytes", "to_nf4", "weight_nbytes"]
