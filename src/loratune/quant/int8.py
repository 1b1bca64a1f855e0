"""Linear8bit: a frozen nn.Linear stored as int8 with one absmax scale per output row (weight-only).

Pure PyTorch, CPU and CUDA; the matmul is tiled.py. Activations stay in compute_dtype: this is
weight-only storage. With `int8_compute` (the trainer's `base_compute: int8`, CPU) the activations
are quantized too and the matmuls run in int8 (loratune.ops.int8_matmul), all but a few outlier
input channels, which stay in float as in LLM.int8().
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratune.ops.int8_matmul import INT8_MAX, Outliers, int8_linear, int8_weight_levels, quantize_rows

from .layer import TiledQuantizedLinear
from .smoothing import weight_factors
from .storage import check_weight


class Linear8bit(TiledQuantizedLinear):
    """A frozen linear layer with an int8 weight: W[o, i] ≈ q[o, i] * scale[o], scale = absmax(W[o]) / 127.

    Rounding to nearest bounds the error of every value by scale[o] / 2 = absmax(W[o]) / 254.
    Storage is buffers (`qweight` int8 (out, in), `scale` fp32 (out,)); `forward` dequantizes a
    tile of output rows at a time in `compute_dtype`. LoRA wraps it like an nn.Linear and never
    merges into it (`is_quantized`).
    """

    bits = 8
    quant_type = "int8"
    int8_compute = False  # set per layer: activations quantized too, int8 matmuls (module docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device)
        self.register_buffer("qweight",
                             torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        # int8_compute with activation smoothing: the stored weight is W * smooth[None, :] and the input
        # is divided by smooth (quant/smoothing.py); None when not smoothed. Channels whose factor is inf
        # are computed in float instead: their index and their weight columns (out, k), else None.
        self.register_buffer("smooth", None)
        self.register_buffer("outlier_index", None)
        self.register_buffer("outlier_weight", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype=torch.bfloat16, name: str = "",
                    int8_compute: bool = False, smooth: Tensor | None = None,
                    codes: tuple[Tensor, Tensor] | None = None) -> Linear8bit:
        """Quantize an nn.Linear (on its own device); the bias is kept as is, not copied.

        int8_compute: the layer will compute in int8 (`base_compute: int8`); its weight is then
        rounded to the levels this CPU's int8 products keep exact (`int8_weight_levels`: 127, or 63
        without VNNI). smooth (in,), with int8_compute: per-input-channel factors moved from the
        activations into the weight before rounding (quant/smoothing.py); layers that read the same
        input share the one tensor. A layer on the meta device gives an empty layer of the right
        shapes (to be filled by loading). An inf in smooth marks an outlier channel: it is left out of
        the int8 weight and kept as a float column (`outliers`). codes, with int8_compute: the
        (codes, scale) of the weight so smoothed, rounded already (quant/gptq.py); else it is rounded
        to nearest here.
        """
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                    device=weight.device)
        layer.int8_compute = int8_compute
        levels = int8_weight_levels() if int8_compute else INT8_MAX
        factor = None
        if int8_compute and smooth is not None:
            layer.smooth = smooth
            outlier = torch.isinf(smooth)
            factor = weight_factors(smooth)  # an outlier's int8 column is 0
            if outlier.any():
                layer.outlier_index = outlier.nonzero().flatten().to(weight.device)
                layer.outlier_weight = weight[:, layer.outlier_index].float()
        if weight.is_meta:
            layer.bias = linear.bias
            return layer
        check_weight(weight, name)
        if int8_compute and codes is not None:
            layer.qweight.copy_(codes[0])
            layer.scale.copy_(codes[1])
            layer.bias = linear.bias
            return layer
        for r0, r1 in layer.tiles():   # row tiles keep the fp32 temporaries small
            rows = weight[r0:r1] if factor is None else weight[r0:r1].float() * factor
            layer.qweight[r0:r1], layer.scale[r0:r1] = quantize_rows(rows, levels)
        layer.bias = linear.bias
        return layer

    @property
    def computes_in_int8(self) -> bool:
        """int8_compute on a CPU-resident layer: its products run in int8 (elsewhere it dequantizes)."""
        return self.int8_compute and self.qweight.device.type == "cpu"

    @property
    def outliers(self) -> Outliers | None:
        """(index, float weight columns) of the input channels computed in float, or None."""
        return None if self.outlier_index is None else (self.outlier_index, self.outlier_weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.computes_in_int8:
            return int8_linear(x, self.qweight, self.scale, self.bias, self.smooth, self.outliers)
        return super().forward(x)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> Tensor:
        """Return weight rows r0..r1 as (r1 - r0, in) in dtype (default compute_dtype), rounded once."""
        rows = torch.mul(self.qweight[r0:r1], self.scale[r0:r1, None])   # int8 * fp32 -> fp32, one pass
        if self.smooth is not None:
            rows = rows.div_(self.smooth)  # 0 in the outlier channels (inf factors)
        if self.outlier_index is not None:
            rows[:, self.outlier_index] = self.outlier_weight[r0:r1]
        return rows.to(dtype or self.compute_dtype)


HEAD_CODES = "int8_grad_codes"  # attribute of the LM head that `attach_head_codes` sets


@torch.no_grad()
def attach_head_codes(model: nn.Module) -> bool:
    """Give the LM head of a `base_compute: int8` model 8-bit codes of its weight, one scale per
    row, as a plain attribute `HEAD_CODES` (codes (V, D) int8, scale (V,)): the trainer's loss then
    computes the hidden rows' gradient through the head in int8 (ops.cross_entropy, where the
    weight is the operand that may keep 8 bits on every CPU). The head's forward, and so the
    loss, stays in float: int8 logits moved SmolLM2's by up to 1.7 even with smoothing. Returns
    False when the model has no plain nn.Linear head on the CPU.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return False
    setattr(head, HEAD_CODES, quantize_rows(head.weight, INT8_MAX))
    return True
