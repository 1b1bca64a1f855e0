"""Deterministic batch plans and collation, padded or packed padding-free.

`plan_batches` decides which examples go into each micro-batch from (seed, epoch) alone, so a
resumed run, or another rank, computes the same plan without any saved state but its position.

`collate` builds the tensors:
  padded  input_ids / labels / attention_mask, each (B, T), right-padded to the longest example.
  packed  input_ids / labels / position_ids, each (1, N): the examples laid end to end, position_ids
          restarting at 0 for each example and no attention_mask. Transformers detects the restarts
          (`masking_utils.find_packed_sequence_indices`) and makes attention block-diagonal
          (checked for sdpa and eager), as long as the model is called with `use_cache=False`:
          with a cache object the detection is skipped and attention crosses examples. Every example's first
          label is IGNORE_INDEX, so no loss term crosses an example boundary either.
          tests/test_data_batching.py checks both against per-example runs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch
from torch import Tensor

from loratune.data.tokenize import IGNORE_INDEX

# Changes whenever the same inputs would give another plan, so that `plan_id` changes with it
# (2: packed micro-batches hold batch_size examples whatever their tokens; ranks are padded, not cut).
PLAN_VERSION = 2


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """Return this rank's micro-batches as lists of example indices, shuffled by (seed, epoch).

    `batch_size` examples per micro-batch (the last one may be smaller), packed or not: packing only
    removes padding, and a packed micro-batch too large for memory is cut by `split_by_tokens` into
    passes that accumulate into the same optimizer step, so the examples of each step, and the number
    of steps, never depend on packing or on the token budget. With several ranks, micro-batch k of the
    global plan goes to rank k % world_size; a rank left without one in the last round gets an empty
    micro-batch (the trainer runs it as a pass weighed zero), so all ranks get the same count, no
    example is dropped, and micro-batches (r*W .. r*W+W-1) together are the global batch a single
    process with W times the batch size would see, the last one included.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad plan: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    order = list(range(len(lengths)))
    random.Random(f"loratune-batches:{seed}:{epoch}").shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    return mine + [[]] * (-(-len(batches) // world_size) - len(mine))


def plan_id(lengths: Sequence[int], batch_size: int, seed: int) -> str:
    """A short digest of everything `plan_batches` depends on: the same id, the same plan every epoch.

    Stored in checkpoints, so a resumed run can tell that its data position now points into another
    plan (other data, another batch size or seed, or a version that plans differently).
    """
    text = f"{PLAN_VERSION}:{batch_size}:{seed}:{','.join(map(str, lengths))}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def split_by_tokens(indices: list[int], lengths: Sequence[int], max_seq_length: int,
                    token_budget: int) -> list[list[int]]:
    """Cut one packed micro-batch into consecutive pieces of at most `token_budget` tokens (lengths
    capped at `max_seq_length`, as `collate` cuts them); an example longer than the budget goes alone.
    0 means no budget: one piece."""
    if not token_budget:
        return [list(indices)]
    pieces, current, used = [], [], 0
    for i in indices:
        n = min(lengths[i], max_seq_length)
        if current and used + n > token_budget:
            pieces.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        pieces.append(current)
    return pieces


def collate(
    examples: Sequence[dict], *, packing: bool, pad_token_id: int, max_seq_length: int | None = None
) -> dict[str, Tensor]:
    """Stack examples into model inputs (see the module docstring for the two layouts).

    Examples longer than `max_seq_length` (when given) are cut to it.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id "
                         "(loratune.tools.loading.load_tokenizer always sets one)")
    seqs = [_as_lists(ex, max_seq_length) for ex in examples]
    if packing:
        return _collate_packed(seqs)
    return _collate_padded(seqs, pad_token_id)


def _as_lists(ex: dict, max_len: int | None) -> tuple[list[int], list[int]]:
    ids, labels = list(ex["input_ids"]), list(ex["labels"])
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    labels[0] = IGNORE_INDEX  # never predict an example's first token from whatever came before
    return ids, labels


def _collate_packed(seqs: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    ids = [t for s, _ in seqs for t in s]
    labels = [t for _, lab in seqs for t in lab]
    positions = [p for s, _ in seqs for p in range(len(s))]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
        "labels": torch.tensor([labels], dtype=torch.long),  # (1, N)
        "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N), 0 at each example start
    }


def _collate_padded(seqs: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    width = max(len(s) for s, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (s, lab) in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s)
        labels[row, : len(s)] = torch.tensor(lab)
        attention_mask[row, : len(s)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
