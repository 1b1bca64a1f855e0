"""Blockwise codebook quantization: the pure PyTorch reference every quantized layer uses.

A flat tensor is cut into blocks of `blocksize` values; each block is scaled by its absolute
maximum (`absmax`) into [-1, 1] and every value is replaced by the index of the nearest entry of a
small sorted-or-not codebook (16 entries for NF4/FP4, 256 for the 8-bit dynamic map). Dequantizing
is `code[index] * absmax`. The invariant a reader must know: for every value,
`|x - dequantize(quantize(x))| <= max_half_gap(code) * absmax(block)` (up to float rounding),
because the chosen entry is a nearest one.

Codebooks and the nibble order (first value in the high nibble) follow bitsandbytes, so a layer
quantized here holds the same codes bitsandbytes would store:
https://github.com/bitsandbytes-foundation/bitsandbytes/blob/main/bitsandbytes/functional.py
No nn.Module lives here; see nf4.py and int8.py for the layers.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# NF4 (QLoRA paper, https://arxiv.org/abs/2305.14314): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero. Values as hard-coded in bitsandbytes' csrc/kernels.cu.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (e2m1 with its own index order), normalised by the largest magnitude (12).
FP4_CODE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
CODES_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}

BLOCKSIZE_4BIT = 64       # values per absmax scale of the 4-bit weights
BLOCKSIZE_ABSMAX = 256    # absmax values per fp32 scale when double-quantizing
_CHUNK_BLOCKS = 1 << 16   # blocks quantized at once: bounds fp32 temporaries to ~16 MiB per 64-block


@functools.cache
def dynamic_map_8bit() -> tuple[float, ...]:
    """Return bitsandbytes' signed 8-bit dynamic map (256 sorted values in [-1, 1]).

    Seven decades 1e-6..1 with 2**i evenly spaced fraction values in decade i, mirrored, plus 0
    and 1: fine resolution near zero, ~0.7% steps near 1. Used for the double-quantized absmax.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return tuple(sorted(data))


def code_tensor(code: tuple[float, ...], device=None) -> Tensor:
    """Return a codebook as an fp32 tensor."""
    return torch.tensor(code, dtype=torch.float32, device=device)


def max_half_gap(code: Tensor) -> float:
    """Return half the widest gap between neighbouring code values: the worst normalised error."""
    values = code.float().sort().values
    return float((values[1:] - values[:-1]).max()) / 2.0


def nearest_code(x: Tensor, code: Tensor) -> Tensor:
    """Return, for every value of x (already in [-1, 1]), the index of a nearest code entry (uint8)."""
    values, order = code.float().sort()
    mids = (values[1:] + values[:-1]) / 2.0     # decision boundaries between neighbours
    pos = torch.searchsorted(mids, x.contiguous())
    return order[pos].to(torch.uint8)


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Quantize a tensor in blocks of `blocksize` values, scaling each by its absmax.

    Returns (indices, absmax): indices (nblocks * blocksize,) uint8, padded with the index of the
    code value nearest zero; absmax (nblocks,) fp32. Works in chunks so fp32 temporaries stay small.
    """
    flat = x.detach().reshape(-1)
    nblocks = max(1, math.ceil(flat.numel() / blocksize))
    indices = torch.empty(nblocks * blocksize, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    code = code.to(flat.device)
    tiny = torch.finfo(torch.float32).tiny
    for b0 in range(0, nblocks, _CHUNK_BLOCKS):
        b1 = min(nblocks, b0 + _CHUNK_BLOCKS)
        chunk = flat[b0 * blocksize: b1 * blocksize].float()
        if chunk.numel() < (b1 - b0) * blocksize:   # last block: pad with zeros
            chunk = torch.nn.functional.pad(chunk, (0, (b1 - b0) * blocksize - chunk.numel()))
        blocks = chunk.view(b1 - b0, blocksize)
        scale = blocks.abs().amax(dim=1)
        absmax[b0:b1] = scale
        normed = blocks / scale.clamp_min(tiny)[:, None]   # an all-zero block stays zero
        indices[b0 * blocksize: b1 * blocksize] = nearest_code(normed, code).view(-1)
    return indices, absmax


def dequantize_blockwise(indices: Tensor, absmax: Tensor, code: Tensor, dtype=torch.float32) -> Tensor:
    """Return `code[indices] * absmax` per block, flat (nblocks * blocksize,), in dtype."""
    blocksize = indices.numel() // absmax.numel()
    values = code.to(indices.device, torch.float32)[indices.long()].view(-1, blocksize)
    return (values * absmax.float()[:, None]).view(-1).to(dtype)


def pack_nibbles(indices: Tensor) -> Tensor:
    """Pack pairs of 4-bit indices into bytes, first index in the high nibble (bitsandbytes order)."""
    pairs = indices.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of pack_nibbles: (n,) uint8 bytes -> (2n,) uint8 indices."""
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)


def quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double-quantize fp32 absmax values as bitsandbytes does: subtract the mean, then 8-bit blockwise.

    Returns (absmax_q (n,) uint8, absmax_scale (ceil(n / 256),) fp32, absmax_offset () fp32).
    """
    offset = absmax.float().mean()
    q, scale = quantize_blockwise(absmax.float() - offset, code_tensor(dynamic_map_8bit()), BLOCKSIZE_ABSMAX)
    return q[: absmax.numel()].contiguous(), scale, offset


def dequantize_absmax(absmax_q: Tensor, absmax_scale: Tensor, absmax_offset: Tensor, code: Tensor) -> Tensor:
    """Inverse of quantize_absmax: (n,) fp32 absmax values."""
    n = absmax_q.numel()
    padded = torch.nn.functional.pad(absmax_q, (0, absmax_scale.numel() * BLOCKSIZE_ABSMAX - n))
    values = code.float()[padded.long()].view(-1, BLOCKSIZE_ABSMAX) * absmax_scale.float()[:, None]
    return values.view(-1)[:n] + absmax_offset.float()
