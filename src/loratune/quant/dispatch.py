"""quantize_model / dequantize_model: swap a model's linear layers for quantized ones and back.

The dispatcher picks one backend per layer: bitsandbytes' kernels (bnb.py) for 4-bit layers whose
weights are on CUDA when bitsandbytes is importable, else the pure PyTorch layers (nf4.py, int8.py),
which run anywhere. Both change the model in place and return it. GPT-2 style `Conv1D` layers are
quantized too (their weight is stored transposed) and come back as `Conv1D` when dequantized.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..base_layers import is_conv1d, is_quantized
from ..dtypes import parse_dtype
from ..errors import ConfigError, UnsupportedFeatureError
from ..layers import owned_by_adapter
from .bnb import BnbLinear4bit, bnb_available
from .int8 import Linear8bit
from .nf4 import Linear4bit

logger = logging.getLogger(__name__)

QUANT_TYPES_4BIT = ("nf4", "fp4")
BACKENDS = ("auto", "torch", "bitsandbytes")


def parse_compute_dtype(value, field: str = "compute_dtype") -> torch.dtype:
    """Turn a torch dtype or a name ('bfloat16', 'torch.float16', 'bf16') into a float dtype."""
    return parse_dtype(value, field)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return (name, layer) for every quantized linear layer of the model."""
    return [(name, m) for name, m in model.named_modules() if is_quantized(m)]


def _skipped(name: str, skip_modules) -> bool:
    if owned_by_adapter(name):   # trainable copies stay
        return True
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip_modules)


def _targets(model: nn.Module, skip_modules) -> list[tuple[nn.Module, str, str, nn.Module]]:
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (type(child) is nn.Linear or is_conv1d(child)) and not _skipped(name, skip_modules):
                found.append((parent, child_name, name, child))
    return found


def _as_linear(module: nn.Module) -> nn.Module | SimpleNamespace:
    if not is_conv1d(module):
        return module
    weight = module.weight   # Conv1D computes x @ W + b with W (in, out)
    return SimpleNamespace(weight=weight.t(), bias=module.bias, in_features=weight.shape[0],
                           out_features=weight.shape[1])


def _validate(bits, quant_type, backend, *, double_quant=False, int8_compute=False, skip_modules=()) -> tuple:
    """Collect every bad argument into one ConfigError; return skip_modules as a tuple of names."""
    problems = []
    if bits not in (4, 8):
        problems.append(f"bits: {bits!r} is not supported; expected 4 (NF4/FP4) or 8 (int8)")
    if bits == 4 and quant_type not in QUANT_TYPES_4BIT:
        problems.append(f"quant_type: {quant_type!r} is not a 4-bit type; expected one of {QUANT_TYPES_4BIT}")
    if backend not in BACKENDS:
        problems.append(f"backend: {backend!r} is not one of {BACKENDS}")
    for name, value in (("double_quant", double_quant), ("int8_compute", int8_compute)):
        if not isinstance(value, (bool, np.bool_)):  # a string such as "false" would be truthy
            problems.append(f"{name}: expected True or False, got {value!r}")
    if isinstance(int8_compute, (bool, np.bool_)) and int8_compute and bits == 4:
        problems.append("int8_compute: multiplies an 8-bit base in int8; it needs bits=8, got bits=4")
    if isinstance(skip_modules, str):  # one name, as in PEFT, not its characters
        skip_modules = (skip_modules,)
    if not isinstance(skip_modules, (list, tuple, set, frozenset)) or \
            not all(isinstance(s, str) for s in skip_modules):
        problems.append(f"skip_modules: expected a list of module names, got {skip_modules!r}")
    if problems:
        raise ConfigError(problems)
    return tuple(skip_modules)


def _quantize_layer(linear, *, bits, quant_type, compute_dtype, double_quant, backend, name,
                    int8_compute=False, smooth=None, codes=None) -> nn.Module:
    on_cuda = linear.weight.is_cuda
    if backend == "bitsandbytes" or (backend == "auto" and bits == 4 and on_cuda and bnb_available()):
        if bits != 4:
            raise UnsupportedFeatureError("the bitsandbytes backend is wired for 4-bit layers only; "
                                          "8-bit uses backend='torch' on any device")
        return BnbLinear4bit.from_linear(linear, quant_type=quant_type, compute_dtype=compute_dtype,
                                         double_quant=double_quant, name=name)
    if bits == 4:
        return Linear4bit.from_linear(linear, quant_type=quant_type, compute_dtype=compute_dtype,
                                      double_quant=double_quant, name=name)
    return Linear8bit.from_linear(linear, compute_dtype=compute_dtype, name=name, int8_compute=int8_compute,
                                  smooth=smooth, codes=codes)


@torch.no_grad()
def quantize_model(model: nn.Module, *, bits: int, quant_type: str = "nf4", compute_dtype=torch.bfloat16,
                   double_quant: bool = False, skip_modules=("lm_head",), backend: str = "auto",
                   int8_compute: bool = False, smooth: dict[str, torch.Tensor] | None = None,
                   codes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Replace every nn.Linear (and Conv1D) child not in skip_modules by a quantized layer, in place.

    bits=4 stores NF4 or FP4 codes (`quant_type`, `double_quant` as bitsandbytes' `bnb_4bit_*`);
    bits=8 stores int8 with per-row scales (quant_type and double_quant are ignored). A
    skip_modules entry matches a module name exactly, as a dotted suffix, or as one name component
    (a single string is one name).
    int8_compute (bits=8, CPU): the layers also round their inputs to int8 and multiply in int8
    (`base_compute: int8`; quant/int8.py); `smooth` maps module names to their activation smoothing
    factors (quant/smoothing.py), `codes` to their weights' rounding where it was done already
    (quant/gptq.py).
    Layers inside LoRA adapters (`lora_*`, `modules_to_save`) are never quantized. Quantizing an
    already-wrapped LoraModel quantizes its base layers. Returns the model.

    Raises:
        ConfigError: bad bits / quant_type / compute_dtype / backend / skip_modules, a double_quant or
            int8_compute that is not a bool, int8_compute with bits=4, or NaN/Inf in a weight.
        UnsupportedFeatureError: backend='bitsandbytes' without bitsandbytes and CUDA.
    """
    skip_modules = _validate(bits, quant_type, backend, double_quant=double_quant, int8_compute=int8_compute,
                             skip_modules=skip_modules)
    compute_dtype = parse_compute_dtype(compute_dtype)
    done: dict[int, nn.Module] = {}   # a module shared by two parents is quantized once
    nbytes_before = nbytes_after = 0
    targets = _targets(model, skip_modules)
    targets.reverse()
    while targets:   # pop as we go so each full-precision weight is freed once replaced
        parent, child_name, name, child = targets.pop()
        if id(child) not in done:
            quantized = _quantize_layer(_as_linear(child), bits=bits, quant_type=quant_type,
                                        compute_dtype=compute_dtype, double_quant=double_quant,
                                        backend=backend, name=name, int8_compute=int8_compute,
                                        smooth=(smooth or {}).get(name), codes=(codes or {}).get(name))
            quantized.from_conv1d = is_conv1d(child)
            nbytes_before += child.weight.numel() * child.weight.element_size()
            nbytes_after += quantized.quantized_nbytes()
            done[id(child)] = quantized
        setattr(parent, child_name, done[id(child)])
        del parent, child
    if not done:
        logger.warning("quantize_model: no nn.Linear layer to quantize (skip_modules=%s)", list(skip_modules))
    else:
        logger.info("quantized %d linear layers to %s: %.1f MiB -> %.1f MiB", len(done),
                    f"{bits}-bit {quant_type if bits == 4 else 'int8'}", nbytes_before / 2**20,
                    nbytes_after / 2**20)
    return model


def _restore(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    weight = layer.dequantize(dtype)   # (out, in)
    bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype),
                                                      requires_grad=layer.bias.requires_grad)
    if getattr(layer, "from_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        plain = Conv1D(layer.out_features, layer.in_features).to(device=weight.device, dtype=dtype)
        plain.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, device="meta")
        plain.weight = nn.Parameter(weight, requires_grad=False)
    plain.bias = bias
    return plain


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype=torch.bfloat16) -> nn.Module:
    """Replace every quantized layer by a plain nn.Linear (or Conv1D) holding its dequantized weight.

    In place; returns the model. The weights are what the quantized layers computed with, so an
    adapter trained on the quantized base can then be merged (`merge_and_unload`) into them. Works
    on a bare model (then load the adapter) or on a LoraModel whose base layers are quantized.
    """
    dtype = parse_compute_dtype(dtype, "dtype")
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_quantized(child):
                if id(child) not in done:
                    done[id(child)] = _restore(child, dtype)
                setattr(parent, child_name, done[id(child)])  # a LoRA layer's orientation follows it
    logger.info("dequantized %d layers to %s", len(done), dtype)
    return model
