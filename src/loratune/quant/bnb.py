"""BnbLinear4bit: a 4-bit layer backed by bitsandbytes' CUDA kernels (used only when importable).

bitsandbytes is optional: this module imports without it and `bnb_available()` says whether the
backend can be used (package importable and CUDA present). The codes are the same NF4/FP4 blockwise
format as nf4.py (block 64, optional double quantization), so the two backends agree to rounding.
The quantization state lives in a bitsandbytes `QuantState` next to the packed buffer; `.to()`
moves it along, but the layer only runs on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedFeatureError
from .storage import check_weight

try:  # optional dependency
    import bitsandbytes as _bnb
except ImportError:  # pragma: no cover - depends on the environment
    _bnb = None

BLOCKSIZE = 64


def bnb_available() -> bool:
    """Return True when bitsandbytes imports and a CUDA device is present."""
    return _bnb is not None and torch.cuda.is_available()


def _require_bnb() -> None:
    if not bnb_available():
        why = "bitsandbytes is not installed" if _bnb is None else "no CUDA device is available"
        raise UnsupportedFeatureError(f"the bitsandbytes backend cannot be used: {why}; use backend='torch'")


class BnbLinear4bit(nn.Module):
    """A frozen linear layer stored by bitsandbytes as 4-bit NF4/FP4 codes; same contract as Linear4bit."""

    is_quantized = True
    bits = 4

    def __init__(self, qweight: Tensor, quant_state, in_features: int, out_features: int, bias, *,
                 quant_type: str, compute_dtype: torch.dtype, double_quant: bool):
        super().__init__()
        _require_bnb()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.compute_dtype, self.double_quant = quant_type, compute_dtype, double_quant
        self.register_buffer("qweight", qweight)
        self.quant_state = quant_state
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", compute_dtype=torch.bfloat16,
                    double_quant: bool = False, name: str = "") -> BnbLinear4bit:
        """Quantize a CUDA nn.Linear with bitsandbytes; the bias is kept as is."""
        _require_bnb()
        weight = linear.weight.detach()
        check_weight(weight, name)
        if not weight.is_cuda:
            raise UnsupportedFeatureError(f"{name or 'layer'}: the bitsandbytes backend needs CUDA weights")
        qweight, state = _bnb.functional.quantize_4bit(
            weight.to(compute_dtype).contiguous(), blocksize=BLOCKSIZE,
            compress_statistics=double_quant, quant_type=quant_type)
        return cls(qweight, state, linear.in_features, linear.out_features, linear.bias,
                   quant_type=quant_type, compute_dtype=compute_dtype, double_quant=double_quant)

    @property
    def num_weight_elements(self) -> int:
        """Values of the weight this layer stands for (out * in), for parameter counts."""
        return self.in_features * self.out_features

    def quantized_nbytes(self) -> int:
        """Bytes of the packed codes and the (possibly nested) absmax, bias excluded."""
        total = self.qweight.numel() * self.qweight.element_size()
        state = self.quant_state
        total += state.absmax.numel() * state.absmax.element_size()
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += nested.absmax.numel() * nested.absmax.element_size()
        return total

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the full weight (out, in) in dtype (default compute_dtype)."""
        weight = _bnb.functional.dequantize_4bit(self.qweight, self.quant_state)
        return weight.view(self.out_features, self.in_features).to(dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _bnb.matmul_4bit(x.to(self.compute_dtype), self.qweight.t(), quant_state=self.quant_state)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.quant_state.to(self.qweight.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}, backend=bitsandbytes")
