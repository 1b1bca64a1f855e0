"""Turn text segments into `input_ids` and UNSHIFTED `labels` (HF convention: label[t] is token t).

Rules, in order, for one example:
  1. The segments are joined into one text and tokenized once without special tokens; a token is
     trained when its characters overlap a trained segment (a completion, or every segment when
     `completion_only` is off). Slow tokenizers (no offsets) tokenize segment by segment instead.
  2. BOS is put in front only when the tokenizer normally adds one, the text does not already
     start with it, and the text is not a chat template's: a template writes BOS itself when the
     model wants one (as `apply_chat_template(tokenize=True)`, TRL and inference servers have it).
     Never two BOS.
  3. EOS is appended and trained when the example ends with a completion whose text does not
     already end with the EOS token (e.g. ChatML templates end every turn with it).
  4. Examples longer than `max_seq_length` keep their first `max_seq_length` tokens (counted).
  5. label[0] is always IGNORE_INDEX: in a packed row the first token of an example would
     otherwise be "predicted" from the previous example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loratune.data.formats import RowError, Segment

IGNORE_INDEX = -100
# What TRL reads from pre-tokenized rows to choose the trained tokens, when there are no labels.
MASK_COLUMNS = ("assistant_masks", "completion_mask")


@dataclass(frozen=True)
class SpecialTokens:
    """What a tokenizer does about BOS/EOS, probed once."""

    bos_id: int | None
    eos_id: int | None
    eos_token: str | None
    adds_bos: bool

    @classmethod
    def of(cls, tokenizer) -> SpecialTokens:
        bos_id = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = bos_id is not None and probe[:1] == [bos_id]
        return cls(bos_id, tokenizer.eos_token_id, tokenizer.eos_token, adds_bos)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_segments(
    examples: list[list[Segment]], tokenizer, special: SpecialTokens, *, completion_only: bool,
    max_seq_length: int,
) -> list[Encoded]:
    """Tokenize a batch of examples (each a list of segments) into ids and labels."""
    if getattr(tokenizer, "is_fast", False):
        flagged = _flags_from_offsets(examples, tokenizer, completion_only)
    else:
        flagged = [_flags_by_segment(segs, tokenizer, completion_only) for segs in examples]
    out = []
    for segs, (ids, trained) in zip(examples, flagged):
        ids, trained = _add_bos_eos(ids, trained, segs, special, completion_only)
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
        out.append(_finish(ids, labels, max_seq_length))
    return out


def encode_prompt(text: str, tokenizer, special: SpecialTokens, *, templated: bool = False) -> list[int]:
    """Token ids of a prompt on its own, with training's BOS rule (rule 2) and no EOS: what the model
    is given when it has to produce the completion itself. `templated`: a chat template's text."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids, _ = _add_bos_eos(ids, [False] * len(ids), [Segment(text, False, templated)], special, True)
    return ids


def _flags_from_offsets(examples, tokenizer, completion_only) -> list[tuple[list[int], list[bool]]]:
    texts = ["".join(s.text for s in segs) for segs in examples]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    result = []
    for segs, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"]):
        spans, pos = [], 0  # char ranges [start, end) of trained segments, in order
        for s in segs:
            if s.is_completion or not completion_only:
                spans.append((pos, pos + len(s.text)))
            pos += len(s.text)
        trained, k = [], 0
        for start, end in offsets:
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            trained.append(end > start and k < len(spans) and spans[k][0] < end)
        result.append((list(ids), trained))
    return result


def _flags_by_segment(segs, tokenizer, completion_only) -> tuple[list[int], list[bool]]:
    ids, trained = [], []
    for s in segs:
        part = tokenizer(s.text, add_special_tokens=False)["input_ids"]
        ids += part
        trained += [s.is_completion or not completion_only] * len(part)
    return ids, trained


def _add_bos_eos(ids, trained, segs, special: SpecialTokens, completion_only):
    if special.bos_id is not None:
        while ids[:2] == [special.bos_id, special.bos_id]:  # the text itself had BOS twice
            ids, trained = ids[1:], trained[1:]
        templated = any(s.templated for s in segs)
        if special.adds_bos and ids[:1] != [special.bos_id] and not templated:
            ids, trained = [special.bos_id] + ids, [False] + trained
    last = next((s for s in reversed(segs) if s.text.strip()), None)
    ends_with_completion = last is not None and last.is_completion
    if (special.eos_id is not None and ends_with_completion
            and not last.text.rstrip().endswith(special.eos_token)):
        ids, trained = ids + [special.eos_id], trained + [True]
    return ids, trained


def _finish(ids: list[int], labels: list[int], max_seq_length: int) -> Encoded:
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if labels:
        labels[0] = IGNORE_INDEX
    return Encoded(ids, labels, truncated)


def encode_pretokenized(record: dict[str, Any], *, max_seq_length: int) -> Encoded:
    """Validate a row that already has `input_ids` (and maybe `labels`, or TRL's `assistant_masks` /
    `completion_mask`: 1 for a trained token); use them as given.

    Raises:
        RowError: missing/empty input_ids, non-integer or negative ids, labels of another length or
            negative labels other than IGNORE_INDEX. (Ids at or above the model's vocabulary are
            caught by `check_vocab` once the model is known.)
    """
    ids = record.get("input_ids")
    if ids is None:
        raise RowError("missing field 'input_ids'")
    ids = _int_list(ids, "input_ids")
    if not ids:
        raise RowError("field 'input_ids' is empty")
    if any(i < 0 for i in ids):
        raise RowError("field 'input_ids' has negative token ids")
    labels = record.get("labels")
    mask_name = next((k for k in MASK_COLUMNS if record.get(k) is not None), None)
    if labels is None and mask_name is not None:  # TRL's masks: 1 = trained
        mask = _int_list(record[mask_name], mask_name)
        if len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
            raise RowError(f"{mask_name!r} must hold one 0 or 1 per input id ({len(ids)}), got {len(mask)} "
                           "values" + ("" if len(mask) != len(ids) else " that are not all 0 or 1"))
        labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    labels = list(ids) if labels is None else _int_list(labels, "labels")
    if any(t < 0 and t != IGNORE_INDEX for t in labels):
        raise RowError(f"field 'labels' has negative values other than {IGNORE_INDEX} (the ignore index)")
    if len(labels) != len(ids):
        raise RowError(f"'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
    return _finish(ids, labels, max_seq_length)


def _int_list(value: Any, name: str) -> list[int]:
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RowError(f"field {name!r} must be a list of integers")
    return value
