"""Per-row LoRA for serving: one base matmul for the whole batch, each row with its own adapter.

`RowLoraLinear` wraps a frozen linear layer (nn.Linear, GPT-2 `Conv1D`, or a quantized module with
`in_features`/`out_features`) and holds the weights of every loaded adapter that targets it. Before a
forward the engine calls `set_rows(model, adapter_ids)` with one adapter id per batch row (None = base);
each layer then gathers its rows' `lora_A`/`lora_B` into stacked tensors once, so a decode step costs
one base matmul plus two batched matmuls, however many distinct adapters share the batch (the
"gathered" form of S-LoRA/Punica, https://arxiv.org/abs/2311.03285):

    y[n] = base(x[n]) + scaling[n] * (x[n] @ A[n].T) @ B[n].T      A[n]: (R, in), B[n]: (out, R)

Adapter weights stay in float32 under a bf16/fp16 base and the sum `base + update` is rounded
to the base's dtype once, which is PEFT's arithmetic (its adapters are upcast to float32), so
greedy tokens match PEFT's in bf16 too. Rows whose adapter does not target a layer, and base rows,
get zero weights. Ranks differ between
adapters, so a plan pads every row to the largest rank in the batch with zeros, which adds exact zeros.
`reference_row_lora` computes the same thing row by row, the obvious way; a test compares them.

Only the engine thread calls into these modules (set_rows, add/remove adapters, forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratune.base_layers import is_conv1d, is_quantized
from loratune.inject import set_submodule


@dataclass(frozen=True)
class RowAdapterWeights:
    """One adapter's update for one layer: A (R, in), B (out, R), and its scaling."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float


class RowLoraLinear(nn.Module):
    """A frozen layer plus a per-row low-rank update; base rows compute exactly what base_layer does."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.adapters: dict[int, RowAdapterWeights] = {}
        self._plan: tuple[Tensor, Tensor, Tensor] | None = None  # A (N, in, R), B (N, R, out), s (N, 1, 1)

    def add_adapter(self, adapter_id: int, weights: RowAdapterWeights) -> None:
        self.adapters[adapter_id] = weights

    def remove_adapter(self, adapter_id: int) -> None:
        self.adapters.pop(adapter_id, None)

    def plan_rows(self, adapter_ids: tuple[int | None, ...]) -> set[int]:
        """Gather the rows' weights into stacked tensors used by every forward until the next plan.

        Returns the rows whose weights could not be planned (e.g. a scaling the dtype cannot hold);
        they get zero weights, so they compute the base model and never disturb the other rows.
        """
        rows = [self.adapters.get(a) if a is not None else None for a in adapter_ids]
        if all(w is None for w in rows):
            self._plan = None
            return set()
        rank = max(w.lora_A.shape[0] for w in rows if w is not None)
        ref = next(w for w in rows if w is not None).lora_A
        n = len(rows)
        a = ref.new_zeros(n, self.in_features, rank)   # (N, in, R)
        b = ref.new_zeros(n, rank, self.out_features)  # (N, R, out)
        s = ref.new_zeros(n, 1, 1)
        failed = set()
        for i, w in enumerate(rows):
            if w is None:
                continue
            r = w.lora_A.shape[0]
            try:
                s[i] = w.scaling
                if not bool(torch.isfinite(s[i]).all()):
                    raise ValueError(f"scaling {w.scaling!r} is not finite in {s.dtype}")
                a[i, :, :r] = w.lora_A.T
                b[i, :r, :] = w.lora_B.T
            except (RuntimeError, ValueError, OverflowError):
                a[i].zero_(), b[i].zero_(), s[i].zero_()
                failed.add(i)
        self._plan = (a, b, s)
        return failed

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)                     # (N, T, out)
        if self._plan is None:
            return y
        a, b, s = self._plan
        if x.dim() != 3 or x.shape[0] != a.shape[0]:
            raise RuntimeError(f"RowLoraLinear planned for {a.shape[0]} rows, got input {tuple(x.shape)}")
        h = torch.bmm(x.to(a.dtype), a)            # (N, T, R)
        # Summed in the adapter's dtype, then rounded once, as PEFT does (base rows: y exactly).
        return (y.to(a.dtype) + torch.bmm(h, b) * s).to(y.dtype)


def reference_row_lora(layer: RowLoraLinear, x: Tensor, adapter_ids: list[int | None]) -> Tensor:
    """Compute RowLoraLinear's output one row at a time with plain matmuls (the reference)."""
    out = []
    for i, adapter_id in enumerate(adapter_ids):
        row = x[i : i + 1]
        y = layer.base_layer(row)
        w = layer.adapters.get(adapter_id) if adapter_id is not None else None
        if w is not None:
            update = row.to(w.lora_A.dtype) @ w.lora_A.T @ w.lora_B.T * w.scaling
            y = (y.to(w.lora_A.dtype) + update).to(y.dtype)
        out.append(y)
    return torch.cat(out)


def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """Return (in_features, out_features) of a linear-like module, or None if it is not one."""
    if isinstance(module, RowLoraLinear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Linear) or is_quantized(module):
        return int(module.in_features), int(module.out_features)
    if is_conv1d(module):
        in_features, out_features = module.weight.shape  # GPT-2 Conv1D stores (in, out)
        return int(in_features), int(out_features)
    return None


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Map every linear-like module name of the model to its (in_features, out_features)."""
    shapes = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer"):
            continue  # the layer inside a RowLoraLinear, reported under the wrapper's name
        feats = layer_features(module)
        if feats is not None:
            shapes[name] = feats
    return shapes


def ensure_row_lora(model: nn.Module, name: str) -> RowLoraLinear:
    """Return the RowLoraLinear at `name`, wrapping the plain layer there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, RowLoraLinear):
        return module
    feats = layer_features(module)
    if feats is None:
        raise ValueError(f"module {name!r} is a {type(module).__name__}, not a linear layer")
    wrapped = RowLoraLinear(module, *feats)
    set_submodule(model, name, wrapped)
    return wrapped


def set_rows(model: nn.Module, adapter_ids: tuple[int | None, ...]) -> set[int]:
    """Plan every RowLoraLinear of the model for a batch with these per-row adapter ids.

    Returns the rows that some layer could not plan (see `RowLoraLinear.plan_rows`).
    """
    failed: set[int] = set()
    for module in model.modules():
        if isinstance(module, RowLoraLinear):
            failed |= module.plan_rows(adapter_ids)
    return failed
