"""`loratune eval`: loss and perplexity on a data file, base model and adapter side by side.

The file is read, rendered and masked as training data is, so the numbers are comparable with the
trainer's eval_loss. `--json` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys

from loratune.cli.generate import EXIT_USAGE, add_model_arguments, describe


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "eval", help="Loss and perplexity on a data file, base vs adapter.",
        description="Mean loss per trained token and perplexity on --eval_file (any training data "
                    "format), for the base model and, with --adapter, the adapter side by side.",
        allow_abbrev=False,
    )
    add_model_arguments(parser)
    parser.add_argument("--eval_file", required=True, metavar="F",
                        help=".jsonl, .json, .csv or .parquet file")
    parser.add_argument("--max_seq_length", type=int, default=1024,
                        help="truncate examples to this many tokens (default: 1024)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per forward pass (default: 8)")
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
    from loratune.errors import ConfigError, LoratuneError
    from loratune.tools.evaluation import evaluate_base_and_adapter, load_eval_examples, model_vocab_size

    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
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
