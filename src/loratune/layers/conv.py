"""LoRA on `nn.Conv1d` / `nn.Conv2d`.

A is a conv with the base's kernel, stride, padding and dilation mapping in -> R channels; B is a
1x1 conv R -> out. The merged update is the composition of the two kernels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedFeatureError
from .base import LoraLayer, adapter_device, init_plain, refuse_beyond_plain


class LoraConv(LoraLayer):
    """A frozen 1-d or 2-d convolution plus low-rank adapters."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise UnsupportedFeatureError(
                f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.ndim = 1 if isinstance(base_layer, nn.Conv1d) else 2

    def update_layer(self, adapter_name: str, *, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights, use_rslora: bool, use_dora: bool) -> None:
        refuse_beyond_plain("convolutions", use_dora=use_dora, init_lora_weights=init_lora_weights)
        base = self.base_layer
        conv = nn.Conv1d if self.ndim == 1 else nn.Conv2d
        device = adapter_device(base)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self._set_dropout(adapter_name, lora_dropout)
        # A must pad like the base (e.g. padding_mode="reflect"), or merged != unmerged at the borders.
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         base.dilation, bias=False, padding_mode=base.padding_mode,
                                         device=device)
        self.lora_B[adapter_name] = conv(r, self.out_features, 1, 1, bias=False, device=device)
        init_plain(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, init_lora_weights, r)

    def delta_weight(self, adapter_name: str) -> Tensor:
        A = self.lora_A[adapter_name].weight.float()  # (R, in, *k)
        B = self.lora_B[adapter_name].weight.float()  # (out, R, *1)
        conv = F.conv1d if self.ndim == 1 else F.conv2d
        # Composing B after A is a conv of A's kernel (in as batch) with B: (in, out, *k) -> swap.
        delta = conv(A.transpose(0, 1), B).transpose(0, 1)  # (out, in, *k)
        return delta * self.scaling[adapter_name]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return self.routed_delta(x, y, self._adapter_delta)

    def _adapter_delta(self, x: Tensor, adapter_name: str) -> Tensor:
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        h = self.lora_dropout[adapter_name](x.to(lora_A.weight.dtype))
        return lora_B(lora_A(h)) * self.scaling[adapter_name]

    def _describe(self) -> str:
        return f"Conv{self.ndim}d({self.in_features} -> {self.out_features})"
