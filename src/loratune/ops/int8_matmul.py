"""A frozen int8 weight used in int8 matmuls, forward and input gradient (`base_compute: int8`).

The weight is quantized once, per output row (quant/int8.py: W[o, i] ~ q[o, i] * s_w[o]). Each
call quantizes the activations per row in the same way (x[t, i] ~ p[t, i] * s_x[t]), multiplies
the int8 codes with `torch._int_mm` (int32 accumulation: exact) and scales the result:

    y[t, o] = s_x[t] * s_w[o] * sum_i p[t, i] q[o, i]

Backward needs only the input gradient (the weight is frozen): g' = g * s_w is quantized per row
the same way and dx = s_g' * (p_g' @ q). Nothing of x is kept for backward, only the weight. The
gradient is rounded stochastically (up or down, with the probabilities that make each code right
on average): rounded to nearest, its errors are the same at every step and add up in the adapter;
measured on SmolLM2 (20 steps, three seeds, Zen 5 capped at AVX2), stochastic rounding took the
eval-loss cost of int8 from +1.5% to +0.8% (docs/performance.md).

Rounding each activation to one of 255 levels of its row's absmax gives a relative error of about
0.4% per value, which mostly averages out in the sums; outlier channels make it worse, which the
optional per-channel `smooth` factors (quant/smoothing.py) counter: x is divided by them and the
stored weight was multiplied by them. The few channels that stay far above the rest even so (the
down_proj input of SmolLM2) are taken out of the int8 product: their factor is inf (x / inf = 0,
and their int8 weight columns are 0), and a float product of those k columns adds them back
(`outliers`: k = 32 of 1536 channels adds 2% to a layer's FLOPs), as LLM.int8() does. The cost on
training is measured in docs/performance.md.

CPUs with int8 dot products run these matmuls faster than fp32: 9-10x with AVX512-VNNI (Zen 5),
2.2x with AVX2 alone (the same Zen 5 with oneDNN capped at AVX2; 2048^3, 2 threads). Without
VNNI, oneDNN multiplies through `vpmaddubsw`, which saturates a pair
of products at int16 unless the weight codes stay within 64; `int8_weight_levels()` says how many
levels the weights may use on this CPU (127 or 63) and quant/int8.py rounds them to that.

A row quantization costs three passes over the row (`quantize_rows`); q/k/v (and gate/up) read the
same input, which `int8_forward` quantizes once. `int8_linear_reference` computes the same numbers
with float matmuls of the dequantized codes, for tests.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

from loratune.dtypes import cpu_has_flag, onednn_isa_cap

INT8_MAX = 127
# (index (k,) int64, columns (out, k) fp32): input channels of an int8 layer computed in float.
Outliers = tuple[Tensor, Tensor]


# oneDNN's instruction-set caps that leave out int8 dot products (VNNI).
_ISA_CAPS_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
# Weight levels where int8 products go through AVX2's vpmaddubsw: it adds two u8 x s8 products into
# a saturating int16, and oneDNN shifts the signed activations to u8 (0..255), so a pair stays exact
# only while |weight| <= 64 (2 x 255 x 64 = 32640 < 32767). Measured: with weights up to 127,
# torch._int_mm returns wrong sums on such a CPU; up to 64 it is exact.
SATURATION_SAFE_LEVELS = 63


@functools.lru_cache(maxsize=1)
def int8_weight_levels() -> int:
    """127 where the CPU multiplies int8 with VNNI (AVX512-VNNI, AVX-VNNI, AMX-INT8: exact int32 sums),
    else SATURATION_SAFE_LEVELS: weights for `base_compute: int8` are rounded to 7 bits there."""
    vnni = (onednn_isa_cap() not in _ISA_CAPS_WITHOUT_VNNI
            and cpu_has_flag("avx512_vnni", "avx_vnni", "amx_int8"))
    return INT8_MAX if vnni else SATURATION_SAFE_LEVELS


def quantize_rows(x: Tensor, levels: int = INT8_MAX) -> tuple[Tensor, Tensor]:
    """(codes int8 (m, k), scale fp32 (m,)) with x[t] ~ codes[t] * scale[t], |codes| <= levels; an
    all-zero row gets scale 0.

    The row absmax comes from the row max and min (no |x| temporary; `vector_norm(x, inf)` measured
    20x slower on CPU), then one fp32 temporary is divided, rounded in place and cast.
    |x / scale| <= levels up to one rounding, so no clamp is needed.
    """
    return _quantize_scratch(x.float(), levels, owned=False)


def _quantize_scratch(x: Tensor, levels: int = INT8_MAX, *, owned: bool = True,
                      stochastic: bool = False) -> tuple[Tensor, Tensor]:
    """quantize_rows of an fp32 (m, k) x; `owned`: x is the caller's temporary, rounded in place
    (one full-size temporary fewer). `stochastic`: rounded up or down at random (`_DITHER`), so
    that each code is x / scale on average; otherwise to nearest."""
    scale = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_()).div_(levels)
    divisor = scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    scaled = x.div_(divisor) if owned else torch.div(x, divisor)
    if stochastic:
        codes = scaled.add_(_DITHER.uniform(scaled.shape)).floor_().clamp_(-levels, levels)
    else:
        codes = scaled.round_()
    return codes.to(torch.int8), scale


def quantize_gradient_rows(x: Tensor, levels: int = INT8_MAX) -> tuple[Tensor, Tensor]:
    """quantize_rows of an fp32 (m, k) gradient, rounded stochastically (each code is right on
    average) and in place: x is the caller's temporary."""
    return _quantize_scratch(x, levels, stochastic=True)


class _Dither:
    """Uniform [0, 1) numbers for stochastic rounding, read from a fixed table at random offsets.

    Drawing fresh numbers costs 3 ms per million on CPU, about 12% of a training step over its
    gradients; reading them from a large table at one random offset cost 5% (memory traffic; both
    on Scenario A, Zen 5 capped at AVX2, 2 threads). An
    (m, k) block instead reads row i from table[start + i * stride :], with a random start and a
    random stride: the table stays in cache, and every value is still uniform at each call, so the
    rounding is right on average. The table is made of chunks each seeded by its place, so its
    contents never depend on how large it has grown, and start and stride come from torch's default
    generator, which the trainer keys per micro-batch: a resumed run, or a run after others in the
    same process, draws the same.
    """

    CHUNK = 1 << 16
    MAX_STRIDE = 251

    def __init__(self):
        self.table = torch.empty(0)

    def uniform(self, shape: torch.Size) -> Tensor:
        m, k = (1, shape[0]) if len(shape) == 1 else (shape[:-1].numel(), shape[-1])
        # Both draws are independent of how large the table has grown, so they depend only on the
        # generator's state, never on what this process ran before.
        stride = int(torch.randint(1, self.MAX_STRIDE + 1, ()))
        start = int(torch.randint(0, self.CHUNK, ()))
        end = start + k + (m - 1) * stride
        while self.table.numel() < end:
            chunk = self.table.numel() // self.CHUNK
            more = torch.rand(self.CHUNK, generator=torch.Generator().manual_seed(chunk))
            self.table = torch.cat([self.table, more])
        return self.table.as_strided((m, k), (stride, 1), start).view(shape)


_DITHER = _Dither()


class _SharedInput:
    """The codes of the last input quantized in forward, kept while that tensor lives unchanged.

    q/k/v (and gate/up) read the same normed rows: their forwards quantize them once, not three
    times. The entry holds a weak reference to the input and its version counter, so an input
    that is freed, replaced or modified in place is quantized again.
    """

    def __init__(self):
        self.ref, self.version, self.smooth, self.codes = None, -1, None, None

    def quantize(self, x: Tensor, smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """quantize_rows of x's rows (x (..., k)) divided by `smooth` (k,) if given, reusing the last
        result for the same x and the same smooth tensor."""
        if (self.ref is not None and self.ref() is x and x._version == self.version
                and self.smooth is smooth):
            return self.codes
        rows = x.reshape(-1, x.shape[-1])
        self.codes = (quantize_rows(rows) if smooth is None
                      else _quantize_scratch(rows.float() * smooth.reciprocal()))
        self.ref, self.version, self.smooth = weakref.ref(x), x._version, smooth
        return self.codes


_SHARED = _SharedInput()


def _scaled_product(codes: Tensor, codes_scale: Tensor, qweight: Tensor,
                    weight_scale: Tensor | None) -> Tensor:
    """fp32 (m, n) = codes_scale[:, None] * (codes @ qweight) (* weight_scale[None, :]); exact int32 sums."""
    y = torch.mul(torch._int_mm(codes, qweight), codes_scale[:, None])  # int32 * fp32 -> fp32, one pass
    return y.mul_(weight_scale[None, :]) if weight_scale is not None else y


def int8_forward(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                 smooth: Tensor | None = None, outliers: Outliers | None = None) -> Tensor:
    """fp32 (m, out) = x (..., in) as m rows @ W.T (+ bias), W = qweight * scale[:, None] (/ smooth[None, :]),
    x (* 1 / smooth) rounded per row to int8 (once for consecutive calls on the same x: `_SharedInput`).
    `outliers` (index (k,), columns (out, k) fp32): input channels computed in float (module docstring);
    their smooth factor is inf, so the int8 product leaves them out."""
    codes, x_scale = _SHARED.quantize(x, smooth)
    y = _scaled_product(codes, x_scale, qweight.t(), scale)
    if outliers is not None:
        index, columns = outliers
        y.addmm_(x.reshape(-1, x.shape[-1])[:, index].float(), columns.t())
    return y.add_(bias.float()) if bias is not None else y


def int8_input_grad(grad2: Tensor, qweight: Tensor, scale: Tensor, smooth: Tensor | None = None,
                    outliers: Outliers | None = None) -> Tensor:
    """fp32 (m, in) = grad2 (m, out) @ W for int8_forward's W: s_w is folded into the gradient, which is
    then rounded per row to int8; the columns are divided by `smooth` after the product, and the
    outlier channels' columns come from a float product."""
    grad2 = grad2.float()  # a no-op for the fp32 gradients of an AVX2 CPU
    codes, g_scale = quantize_gradient_rows(grad2 * scale[None, :])  # a new temporary
    dx = _scaled_product(codes, g_scale, qweight, None)
    if smooth is not None:
        dx.div_(smooth[None, :])  # 0 in the outlier channels (inf factors)
    if outliers is not None:
        index, columns = outliers
        dx.index_copy_(1, index, grad2 @ columns)
    return dx


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                smooth: Tensor | None, outliers: Outliers | None) -> Tensor:
        shape = x.shape
        y = int8_forward(x, qweight, scale, bias, smooth, outliers)
        ctx.save_for_backward(qweight, scale, smooth, *(outliers or (None, None)))
        ctx.x_dtype = x.dtype
        return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        qweight, scale, smooth, index, columns = ctx.saved_tensors
        shape = grad.shape
        dx = int8_input_grad(grad.reshape(-1, shape[-1]), qweight, scale, smooth,
                             None if index is None else (index, columns))
        return dx.to(ctx.x_dtype).reshape(*shape[:-1], qweight.shape[1]), None, None, None, None, None


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                smooth: Tensor | None = None, outliers: Outliers | None = None) -> Tensor:
    """x (..., in) @ W.T (+ bias) for W = qweight * scale[:, None] (/ smooth[None, :]) plus the outlier
    channels' float columns, computed in int8 (module docstring)."""
    return _Int8Linear.apply(x, qweight, scale, bias, smooth, outliers)


def int8_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                          smooth: Tensor | None = None, outliers: Outliers | None = None) -> Tensor:
    """The same numbers from float matmuls of the dequantized codes (differentiable in x)."""

    class _Reference(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            shape = x.shape
            rows = x.reshape(-1, shape[-1]).float()
            codes, x_scale = quantize_rows(rows if smooth is None else rows / smooth)
            y = (codes.double() @ qweight.double().t()) * x_scale.double()[:, None] * scale.double()[None, :]
            if outliers is not None:
                y = y + rows[:, outliers[0]].double() @ outliers[1].double().t()
            y = y.float() + (bias.float() if bias is not None else 0)
            ctx.x_dtype = x.dtype
            return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            shape = grad.shape
            rows = grad.reshape(-1, shape[-1]).float() * scale[None, :]
            codes, g_scale = _quantize_scratch(rows, stochastic=True)
            dx = (codes.double() @ qweight.double()) * g_scale.double()[:, None]
            dx = dx if smooth is None else dx / smooth.double()
            if outliers is not None:
                dx[:, outliers[0]] = grad.reshape(-1, shape[-1]).double() @ outliers[1].double()
            return dx.float().to(ctx.x_dtype).reshape(*shape[:-1], qweight.shape[1])

    return _Reference.apply(x)
