"""Quantized frozen bases for QLoRA: NF4/FP4 and int8 linear layers, on CPU and CUDA.

`quantize_model(model, bits=4)` swaps linear layers for quantized ones in place; the LoRA core
wraps any layer following the `QuantizedBaseLayer` contract (loratune.base_layers) like an
nn.Linear and never merges into it;
`dequantize_model(model)` puts plain layers back (before `merge_and_unload`). One file per backend:
nf4.py (4-bit, pure PyTorch), int8.py (8-bit, pure PyTorch), bnb.py (bitsandbytes on CUDA, optional),
dispatch.py picks between them; layer.py is what the two pure PyTorch layers share, blockwise.py
the arithmetic, tiled.py the tiled matmul. For `base_compute: int8`, smoothing.py moves activation
outliers into the weights and gptq.py rounds the weights against the calibration rows.
"""

from ..base_layers import QuantizedBaseLayer, is_quantized
from .bnb import BnbLinear4bit, bnb_available
from .dispatch import dequantize_model, parse_compute_dtype, quantize_model, quantized_layers
from .int8 import Linear8bit
from .nf4 import Linear4bit

__all__ = [
    "BnbLinear4bit",
    "Linear4bit",
    "Linear8bit",
    "QuantizedBaseLayer",
    "bnb_available",
    "dequantize_model",
    "is_quantized",
    "parse_compute_dtype",
    "quantize_model",
    "quantized_layers",
]
