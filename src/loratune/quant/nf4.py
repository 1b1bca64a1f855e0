"""Linear4bit: a frozen nn.Linear stored as 4-bit codes (NF4 or FP4), pure PyTorch, CPU and CUDA.

No bitsandbytes here (see bnb.py); the arithmetic is blockwise.py, the matmul is tiled.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import blockwise as bw
from .storage import check_weight, move_keeping_dtypes, storage_nbytes
from .tiled import TILE_ELEMENTS, plan_tiles, quantized_forward, row_multiple_for_blocks

# byte b holds the code indices (b >> 4, b & 15): one lookup of b yields both dequantized values
_NIBBLE_PAIRS = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 15], dim=1)   # (256, 2)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is 4-bit codes: W ≈ code[q] * absmax, one absmax per 64 values.

    Over the flattened (out, in) weight, value i is `code[q[i]] * absmax[i // 64]` with `code` the
    16 NF4 (or FP4) values in [-1, 1]; two codes per byte. With `double_quant` the absmax values are
    themselves 8-bit codes of the dynamic map with one fp32 scale per 256 plus their mean (as
    bitsandbytes), 4.13 instead of 4.5 bits per weight. Storage is buffers; `forward` dequantizes a
    tile of output rows at a time in `compute_dtype`. LoRA wraps it like an nn.Linear and never
    merges into it (`is_quantized`).
    """

    is_quantized = True
    bits = 4
    blocksize = bw.BLOCKSIZE_4BIT

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.compute_dtype, self.double_quant = quant_type, compute_dtype, double_quant
        self.tile_elements = TILE_ELEMENTS
        self._tiles: tuple[int, tuple[tuple[int, int], ...]] = (0, ())
        nblocks = max(1, math.ceil(in_features * out_features / self.blocksize))
        u8 = dict(dtype=torch.uint8, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("qweight", torch.zeros(nblocks * self.blocksize // 2, **u8))   # packed codes
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(nblocks, **u8))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(nblocks / bw.BLOCKSIZE_ABSMAX), **f32))
            self.register_buffer("absmax_offset", torch.zeros((), **f32))
            self.register_buffer("absmax_code", bw.code_tensor(bw.dynamic_map_8bit(), device), persistent=False)
        else:
            self.register_buffer("absmax", torch.zeros(nblocks, **f32))
        self.register_buffer("code", bw.code_tensor(bw.CODES_4BIT[quant_type], device), persistent=False)
        self.register_buffer("nibble_pairs", _NIBBLE_PAIRS.to(device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", compute_dtype=torch.bfloat16,
                    double_quant: bool = False, name: str = "") -> Linear4bit:
        """Quantize an nn.Linear (on its own device); the bias is kept as is, not copied."""
        weight = linear.weight.detach()
        check_weight(weight, name)
        layer = cls(linear.in_features, linear.out_features, bias=False, quant_type=quant_type,
                    compute_dtype=compute_dtype, double_quant=double_quant, device=weight.device)
        indices, absmax = bw.quantize_blockwise(weight, layer.code, cls.blocksize)
        layer.qweight.copy_(bw.pack_nibbles(indices))
        if double_quant:
            absmax_q, scale, offset = bw.quantize_absmax(absmax)
            layer.absmax_q.copy_(absmax_q)
            layer.absmax_scale.copy_(scale)
            layer.absmax_offset.copy_(offset)
        else:
            layer.absmax.copy_(absmax)
        layer.bias = linear.bias
        return layer

    @property
    def num_weight_elements(self) -> int:
        """Values of the weight this layer stands for (out * in), for parameter counts."""
        return self.in_features * self.out_features

    def quantized_nbytes(self) -> int:
        """Bytes of quantized storage (codes and scales), bias excluded."""
        return storage_nbytes(self)

    def _absmax_blocks(self, b0: int, b1: int) -> Tensor:
        """fp32 absmax of weight blocks b0..b1 (dequantizing only the 256-groups they touch)."""
        if not self.double_quant:
            return self.absmax[b0:b1]
        g0, g1 = b0 // bw.BLOCKSIZE_ABSMAX, math.ceil(b1 / bw.BLOCKSIZE_ABSMAX)
        q = self.absmax_q[g0 * bw.BLOCKSIZE_ABSMAX: b1]
        values = bw.dequantize_absmax(q, self.absmax_scale[g0:g1], self.absmax_offset, self.absmax_code)
        return values[b0 - g0 * bw.BLOCKSIZE_ABSMAX:]

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> Tensor:
        """Return weight rows r0..r1 as (r1 - r0, in) in dtype (default compute_dtype).

        r0 * in must fall on a block boundary (tiles from plan_tiles do). Computed in fp32 and
        rounded once to dtype, as bitsandbytes does.
        """
        dtype = dtype or self.compute_dtype
        n0, n1 = r0 * self.in_features, r1 * self.in_features
        assert n0 % self.blocksize == 0, "tile must start on a quantization block"
        b0, b1 = n0 // self.blocksize, math.ceil(n1 / self.blocksize)
        packed = self.qweight[b0 * self.blocksize // 2: b1 * self.blocksize // 2]
        # Gather both values of a byte at once, as one 8-byte item from a 1-D table: several times
        # faster on CPU than gathering (256, 2) rows.
        pairs = self.code[self.nibble_pairs].view(torch.int64).view(-1)              # (256,) 2 x fp32
        values = torch.index_select(pairs, 0, packed.int()).view(torch.float32).view(b1 - b0, self.blocksize)
        values.mul_(self._absmax_blocks(b0, b1)[:, None])
        return values.view(-1)[: n1 - n0].view(r1 - r0, self.in_features).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the full weight (out, in) in dtype (default compute_dtype)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def tiles(self) -> tuple[tuple[int, int], ...]:
        """Output-row tiles forward and backward dequantize one at a time."""
        if self._tiles[0] != self.tile_elements:   # planned once per tile size
            multiple = row_multiple_for_blocks(self.in_features, self.blocksize)
            self._tiles = (self.tile_elements, plan_tiles(self.out_features, self.in_features,
                                                          row_multiple=multiple, tile_elements=self.tile_elements))
        return self._tiles[1]

    def forward(self, x: Tensor) -> Tensor:
        return quantized_forward(self, x)

    def _apply(self, fn, recurse=True):
        return move_keeping_dtypes(self, fn, lambda f: super(Linear4bit, self)._apply(f, recurse))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
