"""One rule per kind of base layer: GPT-2's Conv1D and the quantized-layer contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from factories import tiny_model
from loratune.base_layers import QuantizedBaseLayer, is_conv1d, is_linear_like, is_quantized
from loratune.errors import UnsupportedFeatureError
from loratune.layers import LoraLinear, build_lora_layer
from loratune.quant import Linear4bit, Linear8bit, quantize_model, quantized_layers
from loratune.serve.lora_rows import layer_features, linear_shapes


class LookalikeConv1D(nn.Module):
    """Named and shaped like GPT-2's Conv1D, but not Transformers' class."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


LookalikeConv1D.__name__ = "Conv1D"


def test_conv1d_is_transformers_class_only():
    assert is_conv1d(Conv1D(6, 4)) and is_linear_like(Conv1D(6, 4))
    assert not is_conv1d(nn.Linear(4, 6)) and not is_conv1d(LookalikeConv1D(6, 4))


def test_lora_layers_quantizer_and_server_agree_on_conv1d():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in=32, out=96)
    assert build_lora_layer(c_attn, "c_attn").fan_in_fan_out
    assert layer_features(c_attn) == (32, 96)
    assert linear_shapes(model)["transformer.h.0.attn.c_attn"] == (32, 96)
    quantize_model(model, bits=8, skip_modules=("lm_head",))
    assert all(layer.from_conv1d for _, layer in quantized_layers(model))


def test_a_conv1d_lookalike_is_no_linear_map_anywhere():
    holder = nn.Sequential(LookalikeConv1D(6, 4))
    assert layer_features(holder[0]) is None and linear_shapes(holder) == {}
    with pytest.raises(UnsupportedFeatureError, match="Conv1D"):
        build_lora_layer(holder[0], "0")
    quantize_model(holder, bits=8)
    assert quantized_layers(holder) == []


@pytest.mark.parametrize("layer", [
    Linear4bit.from_linear(nn.Linear(64, 8)), Linear8bit.from_linear(nn.Linear(64, 8)),
], ids=["nf4", "int8"])
def test_quantized_layers_follow_the_contract(layer):
    assert is_quantized(layer) and is_linear_like(layer) and isinstance(layer, QuantizedBaseLayer)
    assert layer.dequantize(torch.float32).shape == (8, 64) and layer.num_weight_elements == 8 * 64
    assert isinstance(LoraLinear(layer), LoraLinear)


def test_is_quantized_needs_a_module_marked_true():
    class Marked(nn.Linear):
        is_quantized = "yes"  # truthy, but not the contract's True

    class NotAModule:
        is_quantized = True

    assert not is_quantized(nn.Linear(2, 2)) and not is_quantized(Marked(2, 2))
    assert not is_quantized(NotAModule())
