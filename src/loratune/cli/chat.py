"""`loratune chat`: talk to the base model or an adapter through the tokenizer's chat template.

Reads one user message per line from stdin (so it can be scripted: `printf 'hi\\n/exit\\n' |
loratune chat ...`). The whole conversation is the context of each answer. `/reset` forgets the
history, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import io
import sys

from loratune.cli.generate import EXIT_USAGE, add_model_arguments, add_sampling_arguments, describe

RESET, EXIT = "/reset", "/exit"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "chat", help="Chat interactively with the base model or an adapter.",
        description=f"Chat with the base model or an adapter. One message per line; {RESET} clears the "
                    f"history, {EXIT} or end of input quits.",
        allow_abbrev=False,
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt put before the conversation")
    add_sampling_arguments(parser, max_new_tokens=256)  # answers run longer than one completion
    return parser


def run(args) -> int:
    from loratune.cli.generate import load_from_args, settings_from_args
    from loratune.errors import LoratuneError
    from loratune.tools.generation import ChatSession, chat_ids, check_utf8

    try:
        settings = settings_from_args(args)
        if args.system is not None:
            check_utf8(args.system, "--system")
        check_stdin()  # before the (slow) model load
        loaded = load_from_args(args)
        # no template: fail before the loop
        chat_ids(loaded.tokenizer, [{"role": "user", "content": "probe"}])
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(sys.stdin, io.TextIOWrapper):
        # A line that is not UTF-8 is reported like any other bad line, not a UnicodeDecodeError.
        sys.stdin.reconfigure(errors="surrogateescape")
    session = ChatSession(loaded.model, loaded.tokenizer, settings, system=args.system)
    interactive = sys.stdin.isatty()
    print(f"Chatting with {describe(loaded)}. {RESET} clears the history, {EXIT} quits.")
    try:
        converse(session, interactive)
    except KeyboardInterrupt:  # Ctrl-C leaves quietly, like /exit
        print()
    return 0


def check_stdin() -> None:
    """Refuse a closed stdin (`loratune chat <&-` leaves sys.stdin None): there is nothing to read.

    Raises:
        ConfigError: saying how to give the messages.
    """
    from loratune.errors import ConfigError

    if sys.stdin is None or sys.stdin.closed:
        raise ConfigError("stdin is closed; chat reads one message per line from stdin: run it in a "
                          "terminal or pipe the messages in")


def converse(session, interactive: bool) -> None:
    """Read lines until /exit or end of input; answer each, handling /reset."""
    from loratune.errors import LoratuneError
    from loratune.tools.generation import check_utf8

    number = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            return
        number += 1
        try:
            check_utf8(line, f"input line {number}")
        except LoratuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text == EXIT:
            return
        if text == RESET:
            session.reset()
            print("(history cleared)")
            continue
        print("assistant> ", end="", flush=True)
        try:
            session.reply(text, on_text=lambda piece: print(piece, end="", flush=True))
        except LoratuneError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        print(flush=True)
