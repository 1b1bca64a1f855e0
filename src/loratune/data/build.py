"""`build_datasets`: from a DataConfig and a tokenizer to tokenized train/eval examples plus stats.

An example is `{"input_ids": list[int], "labels": list[int]}` with UNSHIFTED labels (IGNORE_INDEX
where no loss is taken). Bad rows never vanish silently: they either stop the build with one
`DataError` listing up to MAX_LISTED_PROBLEMS of them by file and line, or, with `skip_bad_rows`,
are dropped and counted in `DataStats.skipped`. Examples whose trained tokens were all cut off by
truncation carry no signal; they are dropped and counted in `DataStats.dropped_untrained`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from loratune.data.config import DataConfig
from loratune.data.formats import (
    ANSWER_FORMATS,
    Columns,
    RowError,
    detect_format,
    first_turn_keys,
    is_templated,
    prompt_and_answer,
    row_segments,
)
from loratune.data.sources import RawRows, Row, read_dataset, read_file
from loratune.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    SpecialTokens,
    encode_pretokenized,
    encode_prompt,
    encode_segments,
)
from loratune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 10
ENCODE_CHUNK = 512  # rows per tokenizer call: batched calls are much faster than one per row
Example = dict[str, list[int]]


@dataclass(frozen=True)
class DataStats:
    """What happened to one split's rows on the way to examples."""

    source: str
    format: str
    rows: int  # rows read, bad ones included
    examples: int  # examples kept
    skipped: int  # bad rows dropped because skip_bad_rows is set
    truncated: int  # examples cut to max_seq_length (kept)
    dropped_untrained: int  # examples with no trained token left after truncation
    tokens: int
    trained_tokens: int
    lengths: list[int] = field(repr=False)  # token count of each kept example

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def length_quantiles(self) -> dict[str, int]:
        """min / p50 / p90 / p99 / max of the example lengths in tokens (all 0 when empty)."""
        ordered = sorted(self.lengths) or [0]
        pick = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
        return {k: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for k, q in pick.items()}


@dataclass(frozen=True)
class PromptAnswer:
    """One row as a question with one right answer (see `formats.prompt_and_answer`)."""

    where: str  # "eval.jsonl line 3"
    prompt: str  # the text the model saw before the answer in training
    answer: str
    question: str  # the row's own words for what is asked (for tables; `prompt` may be a whole template)
    prompt_ids: list[int] = field(repr=False)  # `prompt` tokenized as training tokenizes it (BOS rule)


@dataclass
class DatasetBundle:
    """Tokenized examples for training and (optionally) evaluation, with their stats."""

    train: list[Example]
    eval: list[Example] | None
    stats: DataStats
    eval_stats: DataStats | None = None
    wheres: list[str] = field(default_factory=list, repr=False)  # "train.jsonl line 3" per train example
    eval_wheres: list[str] = field(default_factory=list, repr=False)
    eval_answers: list[PromptAnswer] | None = None  # the eval rows as prompts and answers, when asked for


def build_datasets(cfg: DataConfig, tokenizer, seed: int = 0, *, eval_answers: bool = False) -> DatasetBundle:
    """Read, validate and tokenize the train (and eval) data described by `cfg`.

    `seed` only matters for `eval_samples` (which training rows are held out). With `eval_answers`
    the eval rows are also kept as prompts and answers (`answer_rows`), for exact-match evaluation.

    Raises:
        ConfigError: no data source, a missing file, an undetectable format, no chat template; with
            `eval_answers`, no eval data or eval rows without a separate answer (plain text).
        DataError: malformed rows (listed by file and line) when skip_bad_rows is off, or no
            usable row at all.
    """
    train_raw, eval_raw = read_sources(cfg, seed)
    if eval_answers and eval_raw is None:
        raise ConfigError("exact-match evaluation needs eval data: set eval_file, eval_split or eval_samples")
    train, stats, wheres = tokenize_rows(train_raw, cfg, tokenizer)
    if eval_raw is None:
        return DatasetBundle(train, None, stats, wheres=wheres)
    evals, eval_stats, eval_wheres = tokenize_rows(eval_raw, cfg, tokenizer)
    answers = answer_rows(eval_raw, cfg, tokenizer) if eval_answers else None
    return DatasetBundle(train, evals, stats, eval_stats, wheres=wheres, eval_wheres=eval_wheres,
                         eval_answers=answers)


def answer_rows(raw: RawRows, cfg: DataConfig, tokenizer) -> list[PromptAnswer]:
    """Every row of one source as a prompt and its expected answer; raise or skip bad rows as the
    config says (`skip_bad_rows`), like `tokenize_rows`.

    Raises:
        ConfigError: the rows' format has no separate answer (text, input_ids), or no chat template.
        DataError: rows with a missing or malformed prompt/answer field, named by file and line.
    """
    columns = set().union(*(r.record.keys() for r in raw.rows)) if raw.rows else set()
    try:
        cols = (detect_format(columns, cfg, first_turn_keys(r.record for r in raw.rows)) if raw.rows
                else Columns("prompt_completion", {}))
    except ConfigError as exc:
        raise ConfigError(f"{raw.name}: {exc}") from None
    if cols.format not in ANSWER_FORMATS:
        raise ConfigError(f"{raw.name}: its rows are {cols.format!r} (columns {sorted(columns)}), which "
                          "have no separate answer to score; exact match needs prompt + completion, "
                          "messages, conversations or instruction + output rows")
    special = SpecialTokens.of(tokenizer)
    problems, out = list(raw.problems), []
    for row in raw.rows:
        try:
            prompt, answer, question = prompt_and_answer(row.record, cols, tokenizer)
            ids = encode_prompt(prompt, tokenizer, special, templated=is_templated(row.record, cols))
            if not ids:
                raise RowError("the prompt is empty (and this tokenizer adds no BOS), so there is nothing "
                               "to generate from")
        except RowError as exc:
            problems.append(f"{row.where}: {exc}")
            continue
        out.append(PromptAnswer(row.where, prompt, answer, question, ids))
    _check_problems(raw.name, problems, len(raw.rows) + len(raw.problems), cfg.skip_bad_rows)
    if not out:
        raise DataError(f"{raw.name}: no rows to score")
    return out


def check_vocab(bundle: DatasetBundle, vocab_size: int) -> None:
    """Raise DataError naming the rows whose token ids or labels are outside [0, vocab_size).

    Pre-tokenized rows ("input_ids") can hold any id, and text tokenized by a tokenizer with more
    tokens than the model's embedding (added tokens, a mismatched tokenizer) can too; the model only
    knows its size once loaded, so every row is checked then (one max per row). Past it, the
    embedding fails deep inside the forward (on GPU with a device-side assert) and a label past it
    has no logit to train.
    """
    problems = []
    for examples, wheres in ((bundle.train, bundle.wheres), (bundle.eval or [], bundle.eval_wheres)):
        for i, ex in enumerate(examples):
            top = max(max(ex["input_ids"]), max(ex["labels"]))
            if top >= vocab_size:
                where = wheres[i] if i < len(wheres) else f"example {i}"
                problems.append(f"{where}: token id {top} is outside the model's vocabulary of {vocab_size}")
    if problems:
        raise DataError(f"{len(problems)} row(s) have token ids the model does not have:\n"
                        + _listed(problems))


def read_sources(cfg: DataConfig, seed: int = 0) -> tuple[RawRows, RawRows | None]:
    """Read the raw train rows and eval rows (None without eval data), holding out `eval_samples`."""
    if not cfg.has_source:
        raise ConfigError("no training data: set train_file (a .jsonl/.json/.csv/.parquet file) "
                          "or dataset_name")
    train_raw, eval_raw = _read_train(cfg), _read_eval(cfg)
    if cfg.eval_samples:
        train_raw, eval_raw = _hold_out(train_raw, cfg.eval_samples, seed)
    return train_raw, eval_raw


def _read_train(cfg: DataConfig) -> RawRows:
    if cfg.train_file:
        return read_file(cfg.train_file, field_name="train_file")
    return read_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split)


def _read_eval(cfg: DataConfig) -> RawRows | None:
    if cfg.eval_file:
        return read_file(cfg.eval_file, field_name="eval_file")
    if cfg.eval_split:
        return read_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.eval_split)
    return None


def _hold_out(raw: RawRows, n: int, seed: int) -> tuple[RawRows, RawRows]:
    if n >= len(raw.rows):
        raise ConfigError(f"eval_samples is {n} but {raw.name} has only {len(raw.rows)} rows")
    order = list(range(len(raw.rows)))
    random.Random(f"loratune-eval:{seed}").shuffle(order)
    held = set(order[:n])
    keep = [r for i, r in enumerate(raw.rows) if i not in held]
    evals = [r for i, r in enumerate(raw.rows) if i in held]
    return RawRows(raw.name, keep, raw.problems), RawRows(f"{raw.name} (held out)", evals, [])


def tokenize_rows(raw: RawRows, cfg: DataConfig, tokenizer) -> tuple[list[Example], DataStats, list[str]]:
    """Tokenize every row of one source; raise or skip bad rows as the config says.

    Returns the examples, their stats, and where each kept example came from ("train.jsonl line 3").
    """
    columns = set().union(*(r.record.keys() for r in raw.rows)) if raw.rows else set()
    try:
        cols = (detect_format(columns, cfg, first_turn_keys(r.record for r in raw.rows)) if raw.rows
                else Columns(cfg.dataset_format, {}))
    except ConfigError as exc:
        raise ConfigError(f"{raw.name}: {exc}") from None
    problems = list(raw.problems)
    encoded: list[tuple[str, Encoded]] = []
    special = SpecialTokens.of(tokenizer)
    for start in range(0, len(raw.rows), ENCODE_CHUNK):
        chunk = raw.rows[start : start + ENCODE_CHUNK]
        encoded += _encode_chunk(chunk, cols, cfg, tokenizer, special, problems)
    n_rows = len(raw.rows) + len(raw.problems)
    _check_problems(raw.name, problems, n_rows, cfg.skip_bad_rows)
    examples, wheres, lengths, truncated, dropped, dropped_cut, trained = [], [], [], 0, 0, 0, 0
    for where, enc in encoded:
        n_trained = sum(lab != IGNORE_INDEX for lab in enc.labels)
        truncated += enc.truncated
        if n_trained == 0:
            dropped += 1
            dropped_cut += enc.truncated
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
        wheres.append(where)
        lengths.append(len(enc.input_ids))
        trained += n_trained
    if not examples:
        reasons = []
        if dropped_cut:
            reasons.append(f"{dropped_cut} lost every trained token to max_seq_length={cfg.max_seq_length}")
        if dropped > dropped_cut:  # e.g. one token (the first is never trained), or labels all IGNORE_INDEX
            reasons.append(f"{dropped - dropped_cut} had no token to train on, "
                           f"e.g. {_first_untrained(encoded)}")
        raise DataError(f"{raw.name}: no usable example out of {n_rows} rows"
                        + (f" ({'; '.join(reasons)})" if reasons else ""))
    stats = DataStats(raw.name, cols.format, n_rows, len(examples), len(problems), truncated, dropped,
                      sum(lengths), trained, lengths)
    _log(stats)
    return examples, stats, wheres


def _first_untrained(encoded: list[tuple[str, Encoded]]) -> str:
    """Where the first example with no trained token that was not truncated came from, and its size."""
    where, enc = next((w, e) for w, e in encoded if not e.truncated
                      and all(lab == IGNORE_INDEX for lab in e.labels))
    return f"{where} ({len(enc.input_ids)} token(s), none trained; an example's first token never is)"


def _encode_chunk(rows: list[Row], cols: Columns, cfg: DataConfig, tokenizer, special,
                  problems: list[str]) -> list[tuple[str, Encoded]]:
    """Encode the good rows of a chunk as (where, Encoded); append the bad ones to `problems`."""
    if cols.format == "tokenized":
        out = []
        for row in rows:
            try:
                out.append((row.where, encode_pretokenized(row.record, max_seq_length=cfg.max_seq_length)))
            except RowError as exc:
                problems.append(f"{row.where}: {exc}")
        return out
    wheres, segments = [], []
    for row in rows:
        try:
            segments.append(row_segments(row.record, cols, tokenizer,
                                         completion_only=cfg.completion_only_loss))
            wheres.append(row.where)
        except RowError as exc:
            problems.append(f"{row.where}: {exc}")
    if not segments:
        return []
    encoded = encode_segments(segments, tokenizer, special, completion_only=cfg.completion_only_loss,
                              max_seq_length=cfg.max_seq_length)
    return list(zip(wheres, encoded))


def _check_problems(name: str, problems: list[str], n_rows: int, skip: bool) -> None:
    if not problems:
        return
    if skip and len(problems) < n_rows:
        listed = "; ".join(problems[:3])
        logger.warning("%s: skipped %d bad row(s) of %d (skip_bad_rows): %s%s", name, len(problems), n_rows,
                       listed, " ..." if len(problems) > 3 else "")
        return
    if len(problems) == 1:
        hint = ("the only row is bad" if skip
                else "fix the row, or skip bad rows with skip_bad_rows: true or --skip_bad_rows")
        raise DataError(f"{problems[0]} ({hint})")
    hint = ("every row is bad" if skip
            else "fix them, or skip them with skip_bad_rows: true or --skip_bad_rows")
    raise DataError(f"{name}: {len(problems)} bad rows ({hint}):\n" + _listed(problems))


def _listed(problems: list[str]) -> str:
    """The first MAX_LISTED_PROBLEMS problems, one per line, and how many more there are."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return "\n".join(f"  - {p}" for p in shown) + more


def _log(stats: DataStats) -> None:
    q = stats.length_quantiles()
    logger.info("%s: %d examples (%s) from %d rows, %d skipped, %d truncated, %d dropped with no trained "
                "token, %.0f%% of %d tokens trained, length p50 %d max %d", stats.source, stats.examples,
                stats.format, stats.rows, stats.skipped, stats.truncated, stats.dropped_untrained,
                100 * stats.trained_share, stats.tokens, q["p50"], q["max"])
