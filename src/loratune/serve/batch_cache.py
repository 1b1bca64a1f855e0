"""The KV cache of the running batch, kept left-padded so rows of any length decode together.

New rows are prefilled together, right-padded: under causal attention a real token never sees the
padding after it, so its keys/values are those of a run alone. They then join the batch: each row's
keys/values are cut to its own length and padded on the left with zeros to the batch length L (or the
batch is padded to the newcomer's length), and `mask` marks the real positions. Padded positions are
masked out of attention, so each row attends to exactly its own tokens; position ids are tracked per
row by the engine. Rows leave by index; columns that are padding in every remaining row are trimmed.

Invariant: every cache layer holds keys/values of shape (N, H, L, D) and `mask` is (N, L).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache


class BatchCache:
    """Keys/values and attention mask of the running batch."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # (N, L) long, 1 = real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add_rows(self, new_cache: DynamicCache, rows: list[tuple[int, int]]) -> None:
        """Append freshly prefilled rows, given as (row of new_cache, its length before right padding)."""
        check_cache(new_cache)
        length = max(max(n for _, n in rows), self.length)
        keys = [[] for _ in new_cache.layers]
        values = [[] for _ in new_cache.layers]
        for li, (layer, new) in enumerate(zip(self.cache.layers if self.cache else new_cache.layers,
                                              new_cache.layers)):
            if self.cache is not None:
                keys[li].append(_pad_left(layer.keys, length))
                values[li].append(_pad_left(layer.values, length))
            for i, n in rows:  # drop the right padding, pad on the left instead
                keys[li].append(_pad_left(new.keys[i : i + 1, :, :n], length))
                values[li].append(_pad_left(new.values[i : i + 1, :, :n], length))
        masks = [_pad_left(self.mask, length, dim=1)] if self.cache is not None else []
        device = new_cache.layers[0].keys.device
        masks += [_pad_left(torch.ones(1, n, dtype=torch.long, device=device), length, dim=1)
                  for _, n in rows]
        if self.cache is None:
            self.cache = new_cache
        for layer, k, v in zip(self.cache.layers, keys, values):
            layer.keys, layer.values = torch.cat(k), torch.cat(v)
        self.mask = torch.cat(masks)

    def step_mask(self) -> Tensor:
        """Return the attention mask (N, L + 1) for a decode step, and keep it as the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def keep_rows(self, indices: list[int]) -> None:
        """Keep only these rows (in this order) and trim columns that are padding in all of them."""
        if not indices:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).long().argmax())  # first column some row uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def check_cache(cache: DynamicCache) -> None:
    """Refuse cache layouts the batch cannot pad and merge (sliding windows, quantized caches)."""
    for layer in cache.layers:
        if type(layer).__name__ != "DynamicLayer" or layer.keys is None or layer.keys.dim() != 4:
            raise NotImplementedError(
                f"cache layer {type(layer).__name__} is not supported by the server's batch cache; "
                "models with sliding-window or hybrid caches cannot be served yet"
            )


def _pad_left(t: Tensor, length: int, dim: int = 2) -> Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
