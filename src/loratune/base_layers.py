"""The frozen modules LoRA treats as a linear map, each told apart by one rule.

- `nn.Linear`;
- GPT-2's `Conv1D` (Transformers), which stores its weight as (in, out): `is_conv1d`;
- quantized linear layers (quant/), which follow the `QuantizedBaseLayer` contract: `is_quantized`.
The LoRA layers, the quantizer and the server all ask these functions, never the attributes.
Not here: the LoRA wrappers themselves (layers/) and the quantized layers (quant/).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


@runtime_checkable
class QuantizedBaseLayer(Protocol):
    """A frozen linear layer whose weight exists only quantized; LoRA wraps it like an nn.Linear.

    The contract, which every backend in quant/ follows:
    - `is_quantized = True` (a class attribute) marks the layer;
    - `in_features`, `out_features` and `forward(x)` as nn.Linear: (..., in) -> (..., out);
    - `dequantize(dtype=None)` returns the weight the layer computes with as (out, in), in `dtype`
      (default: its compute dtype); `num_weight_elements` is out * in, for parameter counts;
    - the weight is never a parameter, so it is never trained, and nothing merges into it
      (`MergeError`); `quant.dequantize_model` puts plain layers back first.
    """

    is_quantized: bool
    in_features: int
    out_features: int

    @property
    def num_weight_elements(self) -> int: ...

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor: ...

    def forward(self, x: Tensor) -> Tensor: ...


def is_quantized(module: object) -> bool:
    """Return True for a module following the `QuantizedBaseLayer` contract (`is_quantized = True`)."""
    return isinstance(module, nn.Module) and getattr(module, "is_quantized", False) is True


def is_conv1d(module: object) -> bool:
    """Return True for GPT-2's `Conv1D`: y = x @ W + b with W stored as (in, out)."""
    return isinstance(module, Conv1D)


def is_linear_like(module: object) -> bool:
    """Return True for modules LoRA treats as a linear map: Linear, Conv1D, quantized linears."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)
