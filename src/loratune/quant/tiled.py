"""y = x @ W.T for a weight that only exists quantized, dequantized a tile of output rows at a time.

`tiled_linear(x, dequantize_rows, tiles)` is the one matmul every pure PyTorch quantized layer
uses. Forward and backward each dequantize one tile of rows, use it, and drop it, so no full
compute-dtype copy of a large weight stays alive and autograd saves nothing but the packed storage
(the weight is frozen, so only dL/dx is computed). `reference_linear` is the obvious version next
to it (one full dequantize); tests compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Values per dequantized tile: 1 Mi values = 2 MiB in bf16. Small enough to stay in cache-sized
# chunks for big layers, large enough that each tile is still an efficient matmul.
TILE_ELEMENTS = 1 << 20

RowsFn = Callable[[int, int], Tensor]   # (r0, r1) -> (r1 - r0, in) weight rows in compute dtype


def plan_tiles(out_features: int, in_features: int, *, row_multiple: int = 1,
               tile_elements: int = TILE_ELEMENTS) -> tuple[tuple[int, int], ...]:
    """Split output rows into tiles of about tile_elements values, each a multiple of row_multiple rows."""
    rows = max(1, tile_elements // max(1, in_features)) // row_multiple * row_multiple
    rows = max(rows, row_multiple)
    return tuple((r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows))


def row_multiple_for_blocks(in_features: int, blocksize: int) -> int:
    """Return the smallest row count whose values fill whole quantization blocks."""
    return blocksize // math.gcd(in_features, blocksize)


def _forward_tiles(x: Tensor, dequantize_rows: RowsFn, tiles, out_features: int) -> Tensor:
    if len(tiles) == 1:
        return x @ dequantize_rows(0, out_features).t()
    y = x.new_empty(x.shape[0], out_features)                        # (N, out)
    for r0, r1 in tiles:
        torch.mm(x, dequantize_rows(r0, r1).t(), out=y[:, r0:r1])    # strided write, no copy
    return y


def _backward_tiles(grad_y: Tensor, dequantize_rows: RowsFn, tiles, out_features: int) -> Tensor:
    if len(tiles) == 1:
        return grad_y @ dequantize_rows(0, out_features)
    # dL/dx sums over output rows, i.e. over tiles: accumulate in fp32, not in bf16.
    grad_x = None
    for r0, r1 in tiles:
        part = (grad_y[:, r0:r1] @ dequantize_rows(r0, r1)).float()   # (N, in)
        grad_x = part if grad_x is None else grad_x.add_(part)
    return grad_x.to(grad_y.dtype)


class _TiledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dequantize_rows: RowsFn, tiles, out_features: int) -> Tensor:
        ctx.dequantize_rows, ctx.tiles, ctx.out_features = dequantize_rows, tiles, out_features
        return _forward_tiles(x, dequantize_rows, tiles, out_features)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_x = _backward_tiles(grad_y.contiguous(), ctx.dequantize_rows, ctx.tiles, ctx.out_features)
        return grad_x, None, None, None


def tiled_linear(x: Tensor, dequantize_rows: RowsFn, tiles, out_features: int) -> Tensor:
    """Return x @ W.T for x (N, in) in compute dtype, W given tile by tile by dequantize_rows."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _forward_tiles(x, dequantize_rows, tiles, out_features)
    return _TiledLinear.apply(x, dequantize_rows, tiles, out_features)


def reference_linear(x: Tensor, weight: Tensor) -> Tensor:
    """The obvious version: one full weight (out, in), one matmul."""
    return x @ weight.t()


def quantized_forward(layer, x: Tensor) -> Tensor:
    """y = x W^T + b for a quantized linear layer, W dequantized one tile of rows at a time.

    `layer` has in_features, out_features, compute_dtype, bias, dequantize_rows and tiles().
    """
    x2 = x.reshape(-1, layer.in_features).to(layer.compute_dtype)                   # (N, in)
    y = tiled_linear(x2, layer.dequantize_rows, layer.tiles(), layer.out_features)  # (N, out)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)
