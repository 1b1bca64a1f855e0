"""Injected layers: LoRA wrappers around frozen base modules, and full copies for modules_to_save."""

from __future__ import annotations

from torch import nn

from ..adapter_names import BASE_ADAPTER
from ..base_layers import is_linear_like
from ..errors import UnsupportedFeatureError
from .base import LoraLayer, module_key
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import DoraMagnitude, LoraLinear
from .modules_to_save import ModulesToSave

__all__ = [
    "BASE_ADAPTER", "DoraMagnitude", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear",
    "ModulesToSave", "build_lora_layer", "inside_wrapper", "is_linear_like", "module_key", "owned_by_adapter",
]

# Names the wrappers give their parts: adapter-owned ones (lora_A, lora_embedding_B, lora_dropout,
# lora_magnitude_vector, modules_to_save copies) and the frozen originals they hold.
_ORIGINALS = ("base_layer", "original_module")


def _adapter_part(part: str) -> bool:
    return part.startswith("lora_") or part == "modules_to_save"


def owned_by_adapter(name: str) -> bool:
    """True for a parameter or module name inside an adapter's own weights (saved with the adapter)."""
    return any(_adapter_part(p) for p in name.split("."))


def inside_wrapper(name: str) -> bool:
    """True for any part of an injected wrapper (its adapters or the original it holds): never a target."""
    return any(_adapter_part(p) or p in _ORIGINALS for p in name.split("."))


def build_lora_layer(module: nn.Module, name: str) -> LoraLayer:
    """Wrap a base module in the matching LoRA layer.

    Raises:
        UnsupportedFeatureError: the module type cannot carry LoRA; the module is named.
    """
    if is_linear_like(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(module)
    raise UnsupportedFeatureError(
        f"target module {name!r} is a {type(module).__name__}; LoRA supports nn.Linear, Conv1D, "
        "nn.Embedding, nn.Conv1d, nn.Conv2d and quantized linear layers"
    )
