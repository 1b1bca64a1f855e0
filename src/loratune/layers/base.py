"""`LoraLayer`: what every injected layer shares (adapter bookkeeping, routing, merging).

An injected layer wraps the original module as `base_layer`, so unloading is putting it back.
Adapter weights live in `AdapterModuleDict`/`AdapterParameterDict`s keyed by adapter name, and
every adapter parameter name starts with `lora_`: that prefix is the only contract for freezing
and saving. Torch module names cannot hold ".", so an adapter "sql.v2" is stored under the key
"sql:v2" (`module_key`); the dicts translate, so code indexes them by the adapter name.
Subclasses implement `update_layer`, `delta_weight` and `forward`.

Mixed batches: `LoraModel` sets `batch_groups` (a list of `(adapter_name, row_index)` pairs) on
every layer for the duration of one call and always clears it afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..adapter_names import BASE_ADAPTER
from ..base_layers import is_quantized
from ..config import lora_scaling
from ..errors import MergeError, UnsupportedFeatureError

PLAIN_INITS = (True, False, "gaussian")  # inits that draw A and B without reading the base weight


@torch.no_grad()
def init_plain(A: Tensor, B: Tensor, method, r: int) -> None:
    """PEFT's plain inits of a Linear/Conv adapter: True = kaiming A, zero B (the adapter starts as a
    no-op); "gaussian" = N(0, 1/r) A, zero B; False = kaiming A and B (a random, non-zero adapter)."""
    if method == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if method is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


def adapter_device(base_layer: nn.Module) -> torch.device:
    """Where a new adapter's weights go: the base layer's device, or the CPU when the base is on the
    meta device (a skeleton whose weights load later, as in sharded training). Adapter weights are
    thus always drawn at injection, and a seed gives the same adapter however the base is loaded."""
    first = next(iter([*base_layer.parameters(), *base_layer.buffers()]))
    return torch.device("cpu") if first.device.type == "meta" else first.device


def module_key(adapter_name: str) -> str:
    """The key of an adapter's weights inside a layer: its name with "." as ":".

    ":" is no adapter-name character, so the mapping is one-to-one (and leaves keys unchanged).
    """
    return adapter_name.replace(".", ":")


def _adapter_name(key: str) -> str:
    return key.replace(":", ".")


class AdapterModuleDict(nn.ModuleDict):
    """An nn.ModuleDict indexed by adapter name; it holds each module under `module_key(name)`."""

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(module_key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(module_key(name), module)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(module_key(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(module_key(name))

    def __iter__(self) -> Iterator[str]:
        return (_adapter_name(key) for key in super().__iter__())

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(_adapter_name(key), module) for key, module in super().items()]


class AdapterParameterDict(nn.ParameterDict):
    """An nn.ParameterDict indexed by adapter name; its parameters are named `module_key(name)`."""

    def _key_to_attr(self, key: str) -> str:
        return module_key(super()._key_to_attr(key))


def refuse_beyond_plain(kind: str, *, use_dora: bool, init_lora_weights) -> None:
    """Raise UnsupportedFeatureError for what only Linear layers support (DoRA, base-derived inits)."""
    if use_dora:
        raise UnsupportedFeatureError(f"use_dora is supported on Linear layers only, not on {kind}")
    if init_lora_weights not in PLAIN_INITS:
        raise UnsupportedFeatureError(f"init_lora_weights={init_lora_weights!r} is not supported on {kind}")


class LoraLayer(nn.Module):
    """A frozen `base_layer` plus any number of named low-rank adapters."""

    adapter_param_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                           "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = AdapterModuleDict()
        self.lora_B = AdapterModuleDict()
        self.lora_dropout = AdapterModuleDict()
        self.lora_magnitude_vector = AdapterModuleDict()  # DoRA: adapter -> DoraMagnitude
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.batch_groups: list[tuple[str, Tensor]] | None = None

    # ----- bookkeeping ---------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _set_dropout(self, adapter_name: str, p: float) -> None:
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def _set_scaling(self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Return this layer's parameters of one adapter, keyed by their PEFT-style name.

        Keys are relative to this layer with the adapter name removed, e.g. "lora_A.weight".
        """
        out, key = {}, module_key(adapter_name)
        for name, param in self.named_parameters():
            parts = name.split(".")
            if parts[0] in self.adapter_param_names and len(parts) >= 2 and parts[1] == key:
                out[".".join([parts[0], *parts[2:]])] = param
        return out

    def set_active(self, adapter_names: list[str], trainable: bool) -> None:
        """Activate these adapters (their sum is applied); only they get gradients if trainable."""
        self.active_adapters = [n for n in adapter_names if n in self.r]
        for name in self.r:
            for param in self.adapter_parameters(name).values():
                param.requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter's weights; unmerges nothing (the caller unmerges first)."""
        if adapter_name in self.merged_adapters:
            raise MergeError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it first")
        for attr in self.adapter_param_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        for attr in ("r", "lora_alpha", "scaling"):
            getattr(self, attr).pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ----- forward routing -----------------------------------------------------------------------

    def routed_delta(self, x: Tensor, y: Tensor, delta_fn) -> Tensor:
        """Add each active adapter's `delta_fn(x, name)` to y, or per row group in a mixed batch.

        x: (B, ...) layer input, y: (B, ...) base output. Rows of a mixed batch are grouped per
        adapter, so each adapter runs once on its rows (a segment product, not a loop per row).
        """
        if self.disable_adapters:
            return y
        if self.batch_groups is None:  # as PEFT: summed in the deltas' dtype, rounded once
            out = y
            for name in self.active_adapters:
                if name not in self.merged_adapters:
                    out = out + delta_fn(x, name)
            return out.to(y.dtype)
        y = y.clone()
        for name, rows in self.batch_groups:
            if name == BASE_ADAPTER or name not in self.r:
                continue
            rows = _expand_rows(rows, x.shape[0], self.batch_groups)
            y.index_add_(0, rows, delta_fn(x.index_select(0, rows), name).to(y.dtype))
        return y

    # ----- merging -------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> Tensor:
        """Return scaling * B @ A in fp32, shaped and oriented like `base_layer.weight`."""
        raise NotImplementedError

    def merge(self, adapter_names: list[str], *, safe_merge: bool = False) -> None:
        """Add the given adapters' updates into the base weight: fp32 math, one cast back.

        Raises:
            MergeError: with safe_merge, the result holds NaN/Inf; nothing is written then.
        """
        names = self._mergeable(adapter_names)
        if not names:
            return
        weight = self._merge_target()
        merged = self._merged_fp32(names)
        if safe_merge:
            self._check_finite(merged, names)
        weight.data.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)

    def check_finite_merge(self, adapter_names: list[str]) -> None:
        """Raise MergeError if merging these adapters would put NaN/Inf into the base weight."""
        names = self._mergeable(adapter_names)
        if names:
            self._check_finite(self._merged_fp32(names), names)

    def _mergeable(self, adapter_names: list[str]) -> list[str]:
        return [n for n in adapter_names if n in self.r and n not in self.merged_adapters]

    def _merged_fp32(self, names: list[str]) -> Tensor:
        weight = self._merge_target().detach().float()
        for name in names:
            weight = self.merged_weight(name, weight)
        return weight

    def _check_finite(self, merged: Tensor, names: list[str]) -> None:
        if not torch.isfinite(merged).all():
            raise MergeError(f"merging adapter(s) {names} would write NaN/Inf into {self._describe()}; "
                             "base left unchanged")

    def unmerge(self) -> None:
        """Subtract every merged adapter's update from the base weight, most recent first."""
        weight = self._merge_target()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data.copy_(self.unmerged_weight(name, weight.detach().float()).to(weight.dtype))

    def merged_weight(self, adapter_name: str, weight: Tensor) -> Tensor:
        """W + delta for one adapter; DoRA layers override this."""
        return weight + self.delta_weight(adapter_name).to(weight.device)

    def unmerged_weight(self, adapter_name: str, weight: Tensor) -> Tensor:
        return weight - self.delta_weight(adapter_name).to(weight.device)

    def _merge_target(self) -> nn.Parameter:
        if is_quantized(self.base_layer):
            raise MergeError(
                f"cannot merge into the quantized weights of {self._describe()}; "
                "dequantize the base first (loratune.quant.dequantize_model)"
            )
        return self.base_layer.weight

    def _describe(self) -> str:
        return type(self.base_layer).__name__


def _expand_rows(rows: Tensor, batch: int, groups) -> Tensor:
    """Map row indices of the caller's batch onto a batch expanded k times by generate().

    Beam search and num_return_sequences repeat each row k times consecutively
    (repeat_interleave), so caller row i owns expanded rows i*k .. i*k + k - 1.
    """
    n_rows = sum(len(r) for _, r in groups)
    if batch == n_rows:
        return rows
    if batch % n_rows:
        raise ValueError(f"adapter_names has {n_rows} entries but the batch has {batch} rows")
    k = batch // n_rows
    return (rows[:, None] * k + torch.arange(k, device=rows.device)).reshape(-1)
