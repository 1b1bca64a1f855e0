"""Linear8bit: a frozen nn.Linear stored as int8 with one absmax scale per output row (weight-only).

Pure PyTorch, CPU and CUDA; the matmul is tiled.py. Activations stay in compute_dtype: this is
weight-only storage, not LLM.int8() outlier decomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .storage import check_weight, move_keeping_dtypes, storage_nbytes
from .tiled import TILE_ELEMENTS, plan_tiles, quantized_forward

INT8_MAX = 127


class Linear8bit(nn.Module):
    """A frozen linear layer with an int8 weight: W[o, i] ≈ q[o, i] * scale[o], scale = absmax(W[o]) / 127.

    Rounding to nearest bounds the error of every value by scale[o] / 2 = absmax(W[o]) / 254.
    Storage is buffers (`qweight` int8 (out, in), `scale` fp32 (out,)); `forward` dequantizes a
    tile of output rows at a time in `compute_dtype`. LoRA wraps it like an nn.Linear and never
    merges into it (`is_quantized`).
    """

    is_quantized = True
    bits = 8
    quant_type = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.tile_elements = TILE_ELEMENTS
        self._tiles: tuple[int, tuple[tuple[int, int], ...]] = (0, ())
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype=torch.bfloat16, name: str = "") -> Linear8bit:
        """Quantize an nn.Linear (on its own device); the bias is kept as is, not copied."""
        weight = linear.weight.detach()
        check_weight(weight, name)
        layer = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                    device=weight.device)
        for r0, r1 in layer.tiles():   # row tiles keep the fp32 temporaries small
            rows = weight[r0:r1].float()
            scale = rows.abs().amax(dim=1) / INT8_MAX
            q = torch.round(rows / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
            layer.qweight[r0:r1] = q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            layer.scale[r0:r1] = scale
        layer.bias = linear.bias
        return layer

    @property
    def num_weight_elements(self) -> int:
        """Values of the weight this layer stands for (out * in), for parameter counts."""
        return self.in_features * self.out_features

    def quantized_nbytes(self) -> int:
        """Bytes of quantized storage (int8 weight and scales), bias excluded."""
        return storage_nbytes(self)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> Tensor:
        """Return weight rows r0..r1 as (r1 - r0, in) in dtype (default compute_dtype), rounded once."""
        rows = torch.mul(self.qweight[r0:r1], self.scale[r0:r1, None])   # int8 * fp32 -> fp32, one pass
        return rows.to(dtype or self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the full weight (out, in) in dtype (default compute_dtype)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def tiles(self) -> tuple[tuple[int, int], ...]:
        """Output-row tiles forward and backward dequantize one at a time."""
        if self._tiles[0] != self.tile_elements:   # planned once per tile size
            self._tiles = (self.tile_elements, plan_tiles(self.out_features, self.in_features,
                                                          tile_elements=self.tile_elements))
        return self._tiles[1]

    def forward(self, x: Tensor) -> Tensor:
        return quantized_forward(self, x)

    def _apply(self, fn, recurse=True):
        return move_keeping_dtypes(self, fn, lambda f: super(Linear8bit, self)._apply(f, recurse))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type=int8, compute_dtype={self.compute_dtype}")
