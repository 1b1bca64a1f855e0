"""`loratune data preview CONFIG.yaml [--key value ...] [-n N] [--color]`: see what training will see.

Prints a few examples with the trained tokens marked, the share of trained tokens, the length
distribution and how many rows were truncated. Reads the same config keys as `loratune train`
(only the model's tokenizer and the data keys matter).
"""

from __future__ import annotations

import argparse
import sys

from loratune.cli.train import EXIT_USAGE, add_key_options, load_config_from_args, take_over_parsing

EXTRA_FLAGS = {"-n": ("num_examples", True), "--num_examples": ("num_examples", True),
               "--color": ("color", False)}


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `data` and its `preview` sub-command."""
    parser = sub.add_parser("data", help="Inspect how training data is rendered, masked and packed.")
    actions = parser.add_subparsers(dest="data_command", metavar="COMMAND")
    preview = actions.add_parser(
        "preview", help="print examples with trained tokens marked, and length/truncation stats",
        description="Tokenize the training data exactly as `loratune train` would and show the result. "
                    "Trained tokens are shown [[like this]] (or in color with --color).",
        usage="loratune data preview [CONFIG.yaml] [--key value ...] [-n N] [--color]",
        allow_abbrev=False,
    )
    preview.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="training config (optional)")
    preview.add_argument("-n", "--num_examples", type=int, default=3, help="examples to show (default: 3)")
    preview.add_argument("--color", action="store_true", help="mark trained tokens with color")
    add_key_options(preview)
    take_over_parsing(preview, EXTRA_FLAGS)
    return parser


def run(args) -> int:
    """Print the preview report; bad config or data -> message and exit code 2."""
    from loratune.data import preview
    from loratune.errors import LoratuneError
    from loratune.tools.loading import load_tokenizer
    from loratune.train.build import base_source

    if getattr(args, "data_command", None) != "preview":
        print("usage: loratune data preview CONFIG.yaml [--key value ...] [-n N]", file=sys.stderr)
        return EXIT_USAGE
    extra = getattr(args, "extra", {})
    try:
        n = int(extra.get("num_examples", 3))  # "-n" last, with no value, is ""
    except ValueError:
        print(f"error: -n expects an integer, got {extra.get('num_examples')!r}", file=sys.stderr)
        return EXIT_USAGE
    if n < 1:
        print(f"error: -n must be >= 1 (examples to show), got {n}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config_from_args(args)
        tokenizer = load_tokenizer(base_source(cfg))
        report = preview(cfg.data, tokenizer, n, seed=cfg.loop.seed)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(report.to_text(color="color" in extra))
    return 0
