"""Linear4bit: a frozen nn.Linear stored as 4-bit codes (NF4 or FP4), pure PyTorch, CPU and CUDA.

No bitsandbytes here (see bnb.py); the arithmetic is blockwise.py, the matmul is tiled.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import blockwise as bw
from .layer import TiledQuantizedLinear
from .storage import check_weight
from .tiled import row_multiple_for_blocks

# byte b holds the code indices (b >> 4, b & 15): one lookup of b yields both dequantized values
_NIBBLE_PAIRS = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 15], dim=1)   # (256, 2)


class Linear4bit(TiledQuantizedLinear):
    """A frozen linear layer whose weight is 4-bit codes: W ≈ code[q] * absmax, one absmax per 64 values.

    Over the flattened (out, in) weight, value i is `code[q[i]] * absmax[i // 64]` with `code` the
    16 NF4 (or FP4) values in [-1, 1]; two codes per byte. With `double_quant` the absmax values are
    themselves 8-bit codes of the dynamic map with one fp32 scale per 256 plus their mean (as
    bitsandbytes), 4.13 instead of 4.5 bits per weight. Storage is buffers; `forward` dequantizes a
    tile of output rows at a time in `compute_dtype`. LoRA wraps it like an nn.Linear and never
    merges into it (`is_quantized`).
    """

    bits = 4
    blocksize = bw.BLOCKSIZE_4BIT
    repr_fields = ("quant_type", "double_quant", "compute_dtype")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = False, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device)
        self.quant_type, self.double_quant = quant_type, double_quant
        nblocks = max(1, math.ceil(in_features * out_features / self.blocksize))
        u8 = dict(dtype=torch.uint8, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("qweight", torch.zeros(nblocks * self.blocksize // 2, **u8))   # packed codes
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(nblocks, **u8))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(nblocks / bw.BLOCKSIZE_ABSMAX), **f32))
            self.register_buffer("absmax_offset", torch.zeros((), **f32))
        else:
            self.register_buffer("absmax", torch.zeros(nblocks, **f32))
        self.init_tables(device)

    def init_tables(self, device=None) -> None:
        """(Re)compute the lookup tables (code values, nibble pairs), which are not saved with the layer."""
        device = device if device is not None else self.qweight.device
        tables = {"code": bw.code_tensor(bw.CODES_4BIT[self.quant_type], device),
                  "nibble_pairs": _NIBBLE_PAIRS.to(device)}
        if self.double_quant:
            tables["absmax_code"] = bw.code_tensor(bw.dynamic_map_8bit(), device)
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", compute_dtype=torch.bfloat16,
                    double_quant: bool = False, name: str = "") -> Linear4bit:
        """Quantize an nn.Linear (on its own device); the bias is kept as is, not copied.

        A layer on the meta device gives an empty layer of the right shapes (to be filled by loading).
        """
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=False, quant_type=quant_type,
                    compute_dtype=compute_dtype, double_quant=double_quant, device=weight.device)
        if weight.is_meta:
            layer.bias = linear.bias
            return layer
        check_weight(weight, name)
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

    def row_multiple(self) -> int:
        return row_multiple_for_blocks(self.in_features, self.blocksize)
