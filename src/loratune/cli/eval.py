"""`loratune eval`: loss and perplexity, or exact-match accuracy, on a data file, base and adapter.

The file is read, rendered and masked as training data is, so the numbers are comparable with the
trainer's eval_loss. `--metric exact_match` decodes an answer greedily for every row with a prompt
and an expected answer and counts the exact ones (`loratune.tools.evaluation.exact_match`), the
trainer's eval_exact_match. `--json` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys

from loratune.cli.generate import EXIT_USAGE, add_model_arguments, describe

METRICS = ("loss", "exact_match")
ANSWER_MARGIN = 16  # loratune.tools.evaluation.ANSWER_MARGIN, which --help must not import torch for
SHOWN_ROWS = 5  # rows of the exact_match answer table


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "eval", help="Loss and perplexity, or exact-match accuracy, on a data file, base vs adapter.",
        description="Mean loss per trained token and perplexity on --eval_file (any training data "
                    "format), or with --metric exact_match the share of rows whose greedy answer equals "
                    "the expected one, for the base model and, with --adapter, the adapter side by side.",
        allow_abbrev=False,
    )
    add_model_arguments(parser)
    parser.add_argument("--eval_file", required=True, metavar="F",
                        help=".jsonl, .json, .csv or .parquet file")
    parser.add_argument("--metric", choices=METRICS, default="loss",
                        help="loss: loss and perplexity on the trained tokens (default); exact_match: greedy "
                             "answers to prompt/completion or messages rows scored against the expected "
                             "completion / last assistant turn")
    parser.add_argument("--max_new_tokens", type=int, default=None, metavar="N",
                        help="exact_match: tokens generated per answer at most (default: the longest "
                             f"expected answer in tokens + {ANSWER_MARGIN})")
    parser.add_argument("--max_seq_length", type=int, default=1024,
                        help="truncate examples to this many tokens (default: 1024)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="examples (exact_match: rows decoded together) per forward pass (default: 8)")
    parser.add_argument("--completion_only_loss", action=argparse.BooleanOptionalAction, default=True,
                        help="score only completion / assistant tokens (default: on)")
    parser.add_argument("--skip_bad_rows", action=argparse.BooleanOptionalAction, default=False,
                        help="skip malformed rows (and report how many) instead of stopping, as in training "
                             "(default: off)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    return parser


def run(args) -> int:
    from loratune.cli.generate import load_from_args
    from loratune.data import DataConfig
    from loratune.errors import LoratuneError
    from loratune.tools.evaluation import evaluate_base_and_adapter, load_eval_examples, model_vocab_size

    if args.metric == "exact_match":
        return run_exact_match(args)
    try:
        check_arguments(args)
        data_config = DataConfig(max_seq_length=args.max_seq_length, packing=False,
                                 completion_only_loss=args.completion_only_loss,
                                 skip_bad_rows=args.skip_bad_rows)
        loaded = load_from_args(args)
        examples, stats = load_eval_examples(args.eval_file, loaded.tokenizer, data_config,
                                             vocab_size=model_vocab_size(loaded.model))
        results = evaluate_base_and_adapter(loaded.model, examples,
                                            pad_token_id=loaded.tokenizer.pad_token_id,
                                            batch_size=args.batch_size)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({
            "eval_file": args.eval_file, "model": loaded.base_name, "adapter": loaded.adapter_dir,
            "quantized": loaded.quantized, "format": stats.format, "truncated": stats.truncated,
            "skipped": stats.skipped,
            **{name: r.to_dict() for name, r in results.items()},
        }, indent=2))
        return 0
    print(f"{describe(loaded)} on {args.eval_file}: {stats.examples} examples ({stats.format}), "
          f"{results['base'].tokens} scored tokens"
          + (f", {stats.truncated} truncated" if stats.truncated else "")
          + (f", {stats.skipped} bad rows skipped" if stats.skipped else ""))
    print(format_table(results))
    return 0


def check_arguments(args) -> None:
    """Refuse --batch_size or --max_new_tokens below 1 and an empty --eval_file, all at once.

    Raises:
        ConfigError: naming each flag and its value.
    """
    from loratune.errors import ConfigError

    problems = [f"--batch_size must be >= 1, got {args.batch_size}"] if args.batch_size < 1 else []
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not args.eval_file:
        problems.append("--eval_file is empty; name a .jsonl, .json, .csv or .parquet file")
    if problems:
        raise ConfigError(problems)


def format_table(results: dict) -> str:
    """A fixed-width table: one row per model, loss and perplexity; a delta row when both exist."""
    lines = [f"{'model':<10}{'loss':>10}{'perplexity':>14}", "-" * 34]
    for name, r in results.items():
        lines.append(f"{name:<10}{r.loss:>10.4f}{r.perplexity:>14.3f}")
    if "adapter" in results:
        d = results["adapter"].loss - results["base"].loss
        ratio = results["adapter"].perplexity / results["base"].perplexity
        lines.append(f"{'delta':<10}{d:>+10.4f}{ratio:>13.3f}x")
    return "\n".join(lines)


def run_exact_match(args) -> int:
    """Score greedy answers, base and adapter, and print accuracy and a few rows (or --json)."""
    from loratune.cli.generate import load_from_args
    from loratune.data import DataConfig
    from loratune.errors import LoratuneError
    from loratune.tools.evaluation import (
        default_max_new_tokens,
        exact_match_base_and_adapter,
        load_answer_rows,
    )

    try:
        check_arguments(args)
        loaded = load_from_args(args)
        data_config = DataConfig(skip_bad_rows=args.skip_bad_rows)
        rows = load_answer_rows(args.eval_file, loaded.tokenizer, data_config)
        max_new = args.max_new_tokens or default_max_new_tokens(loaded.tokenizer, rows)
        results = exact_match_base_and_adapter(loaded.model, loaded.tokenizer, rows, max_new_tokens=max_new,
                                               batch_size=args.batch_size)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    base, adapter = results["base"], results.get("adapter")
    if args.json:
        print(json.dumps({
            "eval_file": args.eval_file, "model": loaded.base_name, "adapter_dir": loaded.adapter_dir,
            "quantized": loaded.quantized, "metric": "exact_match", "n": base.n, "max_new_tokens": max_new,
            "base": base.to_dict(), "adapter": adapter.to_dict() if adapter else None,
            "rows": [answer_row(i, base, adapter) for i in range(base.n)],
        }, indent=2))
        return 0
    print(f"{describe(loaded)} on {args.eval_file}: {base.n} rows, greedy answers of up to {max_new} tokens")
    after = f" -> adapter {_share(adapter)}" if adapter else ""
    print(f"exact match: base {_share(base)}{after}")
    print(format_answers(base, adapter, SHOWN_ROWS))
    return 0


def answer_row(i: int, base, adapter) -> dict:
    """Row i of the --json output: where it is, prompt, expected, each model's answer and verdict."""
    b = base.records[i]
    row = {"where": b.where, "prompt": b.prompt, "question": b.question, "expected": b.expected,
           "base_answer": b.answer, "base_correct": b.correct}
    if adapter is not None:
        row |= {"adapter_answer": adapter.records[i].answer, "adapter_correct": adapter.records[i].correct}
    return row


def _share(result) -> str:
    return f"{100 * result.accuracy:.1f}% ({result.correct}/{result.n})"


def format_answers(base, adapter, n: int) -> str:
    """The first `n` rows as a fixed-width table: question, base answer, adapter answer, expected."""
    heads = ["question", "base"] + (["adapter"] if adapter else []) + ["expected"]
    lines = ["  ".join(f"{h:<24}" for h in heads).rstrip()]
    for i in range(min(n, base.n)):
        rec = base.records[i]
        cells = [_last_paragraph(rec.question), _mark(rec.answer, rec.correct)]
        if adapter is not None:
            cells.append(_mark(adapter.records[i].answer, adapter.records[i].correct))
        cells.append(rec.expected)
        lines.append("  ".join(f"{_cell(c):<24}" for c in cells).rstrip())
    if base.n > n:
        lines.append(f"... {base.n - n} more rows (--json lists them all)")
    return "\n".join(lines)


def _last_paragraph(question: str) -> str:
    """What differs between rows: an instruction shared by every row comes first, the input last."""
    paragraphs = [p for p in question.split("\n\n") if p.strip()]
    return paragraphs[-1] if paragraphs else question


def _mark(answer: str, correct: bool) -> str:
    return ("= " if correct else "x ") + answer


def _cell(text: str, width: int = 24) -> str:
    """One line of at most `width` characters (newlines shown as spaces, a long text cut with "...")."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."
