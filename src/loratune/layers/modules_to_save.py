"""`ModulesToSave`: a module trained in full (e.g. a classifier head), one copy per adapter.

The original stays untouched as `original_module`; each adapter gets a trainable deep copy in
`modules_to_save[adapter_name]` (an AdapterModuleDict), which PEFT's file format stores under
the module's own name.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base import AdapterModuleDict, _expand_rows


class ModulesToSave(nn.Module):
    """Route calls to the active adapter's copy of a module, or to the original."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = AdapterModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.batch_groups: list[tuple[str, Tensor]] | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def update_layer(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for param in copy_.parameters():
            param.data = param.data.clone()  # never share storage with the (maybe tied) original
        self.modules_to_save[adapter_name] = copy_

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].named_parameters())

    def set_active(self, adapter_names: list[str], trainable: bool) -> None:
        self.active_adapters = [n for n in adapter_names if n in self.modules_to_save]
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def _current(self) -> nn.Module:
        if self.disable_adapters or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, x: Tensor, *args, **kwargs):
        if self.batch_groups is None or self.disable_adapters:
            return self._current()(x, *args, **kwargs)
        out = None
        for name, rows in self.batch_groups:
            # BASE_ADAPTER rows, and adapters without a copy of this module, use the original
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            rows = _expand_rows(rows, x.shape[0], self.batch_groups)
            part = module(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
            out.index_copy_(0, rows, part)
        return out
