"""TiledQuantizedLinear: what the pure PyTorch quantized layers (nf4.py, int8.py) share.

A subclass registers its storage as buffers and implements `dequantize_rows(r0, r1, dtype)`; this
class gives it the rest of the `QuantizedBaseLayer` contract (loratune.base_layers): the tiled
forward of tiled.py, `dequantize`, sizes, and device moves that never cast the fp32 scales.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .storage import move_keeping_dtypes, storage_nbytes
from .tiled import TILE_ELEMENTS, plan_tiles, quantized_forward


class TiledQuantizedLinear(nn.Module):
    """A frozen linear layer stored quantized; `forward` dequantizes a tile of output rows at a time.

    The bias, if any, stays a frozen parameter in full precision.
    """

    is_quantized = True
    repr_fields: tuple[str, ...] = ("quant_type", "compute_dtype")

    def __init__(self, in_features: int, out_features: int, bias: bool, *, compute_dtype: torch.dtype,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.tile_elements = TILE_ELEMENTS
        self._tiles: tuple[int, tuple[tuple[int, int], ...]] = (0, ())
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def num_weight_elements(self) -> int:
        """Values of the weight this layer stands for (out * in), for parameter counts."""
        return self.in_features * self.out_features

    def quantized_nbytes(self) -> int:
        """Bytes of quantized storage (codes and scales), bias excluded."""
        return storage_nbytes(self)

    def init_tables(self, device=None) -> None:
        """(Re)compute lookup tables that are not saved with the layer (none here; nf4.py has some)."""

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> Tensor:
        """Return weight rows r0..r1 as (r1 - r0, in) in dtype (default compute_dtype)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the full weight (out, in) in dtype (default compute_dtype)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def row_multiple(self) -> int:
        """The row count every tile is a multiple of (a tile must start on a storage block)."""
        return 1

    def tiles(self) -> tuple[tuple[int, int], ...]:
        """Output-row tiles forward and backward dequantize one at a time."""
        if self._tiles[0] != self.tile_elements:   # planned once per tile size
            self._tiles = (self.tile_elements, plan_tiles(self.out_features, self.in_features,
                                                          row_multiple=self.row_multiple(),
                                                          tile_elements=self.tile_elements))
        return self._tiles[1]

    def forward(self, x: Tensor) -> Tensor:
        return quantized_forward(self, x)

    def _apply(self, fn, recurse=True):
        return move_keeping_dtypes(self, fn, lambda f: super(TiledQuantizedLinear, self)._apply(f, recurse))

    def extra_repr(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.repr_fields)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {fields}")
