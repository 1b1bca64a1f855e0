"""LoRA on linear maps: `nn.Linear`, Transformers' `Conv1D` and quantized linear layers.

y = base(x) + scaling * B(A(dropout(x))), A: (R, in), B: (out, R).
With DoRA: y = (m / ||W + s B A||_row) * (W + s B A) x + b, where the norm is detached
(DoRA paper §4.3) so it is treated as a constant in backward, as PEFT does.
GPT-2's `Conv1D` stores W as (in, out) ("fan_in_fan_out"); every weight-space quantity here is
computed as (out, in) and transposed only at the point it touches the stored weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base_layers import is_conv1d, is_quantized
from ..errors import UnsupportedFeatureError
from ..ops import fast_paths_enabled
from ..ops.lora_linear import lora_linear
from .base import PLAIN_INITS, LoraLayer, adapter_device, init_plain
from .init import init_from_base


class DoraMagnitude(nn.Module):
    """The DoRA magnitude vector m (out,), stored as `weight` like PEFT's DoraLinearLayer."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(LoraLayer):
    """A frozen linear map (Linear, Conv1D or quantized) plus low-rank adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._dora_merge_norm: dict[str, Tensor] = {}

    @property
    def fan_in_fan_out(self) -> bool:
        """The base stores W as (in, out) (Conv1D); follows base_layer if it is swapped
        (e.g. a quantized layer dequantized back to Conv1D)."""
        return is_conv1d(self.base_layer)

    def update_layer(self, adapter_name: str, *, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights, use_rslora: bool, use_dora: bool) -> None:
        """Create (or replace) one adapter's A, B (fp32, on the base layer's device)."""
        device = adapter_device(self.base_layer)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self._set_dropout(adapter_name, lora_dropout)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if use_dora:
            magnitude = self._dora_norm(adapter_name, self.base_weight().detach().float())
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights in PLAIN_INITS:
            init_plain(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, init_lora_weights,
                       self.r[adapter_name])
            return
        # "pissa", "pissa_niter_N", "olora": A, B from the base weight, which they rewrite
        if is_quantized(self.base_layer):
            raise UnsupportedFeatureError(
                f"init_lora_weights={init_lora_weights!r} needs an unquantized base")
        init_from_base(self, adapter_name, init_lora_weights)

    # ----- weights -------------------------------------------------------------------------------

    def base_weight(self) -> Tensor:
        """The frozen weight as (out, in) (a view for Conv1D; dequantized for quantized bases)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantize()
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self, adapter_name: str) -> Tensor:
        delta = self._delta_out_in(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def _delta_out_in(self, adapter_name: str) -> Tensor:
        """scaling * B @ A as (out, in), fp32."""
        A = self.lora_A[adapter_name].weight.float()
        B = self.lora_B[adapter_name].weight.float()
        return (B @ A) * self.scaling[adapter_name]

    def _dora_norm(self, adapter_name: str, weight_out_in: Tensor) -> Tensor:
        """||W + s B A|| per output row (out,), fp32."""
        return (weight_out_in + self._delta_out_in(adapter_name)).norm(p=2, dim=1)

    def merge(self, adapter_names: list[str], *, safe_merge: bool = False) -> None:
        # DoRA's unmerge needs the row norm n = ||W + sBA|| from before the merge (the merged
        # weight only reveals m); keep it per adapter until unmerge.
        for name in adapter_names:
            if name in self.lora_magnitude_vector and name not in self.merged_adapters:
                self._dora_merge_norm[name] = self._dora_norm(name, self.base_weight().detach().float())
        super().merge(adapter_names, safe_merge=safe_merge)

    def merged_weight(self, adapter_name: str, weight: Tensor) -> Tensor:
        if adapter_name not in self.lora_magnitude_vector:
            return super().merged_weight(adapter_name, weight)
        w = weight.T if self.fan_in_fan_out else weight  # (out, in)
        combined = w + self._delta_out_in(adapter_name)
        scale = self.lora_magnitude_vector[adapter_name].weight.float() / combined.norm(p=2, dim=1)
        merged = scale[:, None] * combined
        return merged.T if self.fan_in_fan_out else merged

    def unmerged_weight(self, adapter_name: str, weight: Tensor) -> Tensor:
        if adapter_name not in self.lora_magnitude_vector:
            return super().unmerged_weight(adapter_name, weight)
        w = weight.T if self.fan_in_fan_out else weight  # (out, in) = (m / n) * (W + sBA)
        m = self.lora_magnitude_vector[adapter_name].weight.float()
        n = self._dora_merge_norm.pop(adapter_name)
        original = w * (n / m)[:, None] - self._delta_out_in(adapter_name)
        return original.T if self.fan_in_fan_out else original

    # ----- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter_name = self._fused_adapter(args, kwargs)
        if adapter_name is not None:
            return self._fused_forward(x, adapter_name)
        y = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        return self.routed_delta(x, y, self._adapter_delta)

    def _fused_adapter(self, args, kwargs) -> str | None:
        """The one adapter the fused op can compute alone, or None to take the reference path.

        The fused op (loratune.ops.lora_linear) covers the training hot path: a plain Linear or
        Conv1D base (or a Linear8bit computing in int8), exactly one active unmerged non-DoRA
        adapter, no mixed-batch routing.
        Inside `loratune.ops.reference_paths()` the layer always takes its reference path.
        """
        if not fast_paths_enabled() or args or kwargs or self.disable_adapters \
                or self.batch_groups is not None:
            return None
        if len(self.active_adapters) != 1 or self.merged_adapters or self.lora_magnitude_vector:
            return None
        base = self.base_layer
        int8 = getattr(base, "computes_in_int8", False)  # Linear8bit with base_compute: int8
        if not (isinstance(base, nn.Linear) or is_conv1d(base) or int8) \
                or base._forward_hooks or base._forward_pre_hooks:
            return None
        return self.active_adapters[0]

    def _fused_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        dropout = self.lora_dropout[adapter_name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.training else None
        base = self.base_layer
        int8 = getattr(base, "computes_in_int8", False)
        return lora_linear(
            x, base.qweight if int8 else base.weight, base.bias, self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight, self.scaling[adapter_name],
            fan_in_fan_out=self.fan_in_fan_out, x_lora=x_lora,
            weight_scale=base.scale if int8 else None, weight_smooth=base.smooth if int8 else None,
            weight_outliers=base.outliers if int8 else None,
        )

    def _adapter_delta(self, x: Tensor, adapter_name: str) -> Tensor:
        """The adapter's additive contribution for input rows x (B', T, in) -> (B', T, out)."""
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        scaling = self.scaling[adapter_name]
        h = self.lora_dropout[adapter_name](x.to(lora_A.weight.dtype))
        lora_out = lora_B(lora_A(h)) * scaling  # (B', T, out)
        if adapter_name not in self.lora_magnitude_vector:
            return lora_out
        # DoRA: (m/n - 1) * W x_d + (m/n) * s B A x_d, with n = ||W + sBA|| detached.
        weight = self.base_weight()
        with torch.no_grad():  # n is a constant for backward (as in PEFT): build no graph for it
            n = self._dora_norm(adapter_name, weight.float())
        mag_scale = self.lora_magnitude_vector[adapter_name].weight / n  # (out,)
        base_no_bias = F.linear(h.to(weight.dtype), weight).to(h.dtype)
        return (mag_scale - 1) * base_no_bias + mag_scale * lora_out

    def _describe(self) -> str:
        return f"{type(self.base_layer).__name__}({self.in_features} -> {self.out_features})"
