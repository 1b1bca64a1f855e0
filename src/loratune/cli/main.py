"""`loratune VERB ...`: dispatch to one module per verb.

Each verb module exposes `add_parser(subparsers)` (registers its sub-command) and
`run(args) -> int` (the exit code). Modules are imported lazily so `loratune --help` stays fast
and a missing optional extra (e.g. `serve`) only affects its own verb.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys

VERBS = {
    "train": "Fine-tune a LoRA adapter from a YAML config and/or --key value flags.",
    "data": "Inspect how training data is rendered, masked and packed.",
    "generate": "Generate text with the base model or an adapter.",
    "chat": "Chat interactively with the base model or an adapter.",
    "eval": "Loss and perplexity on a data file, base vs adapter.",
    "merge": "Merge an adapter into its base and write a standard HF model directory.",
    "export": "Export an adapter as GGUF for llama.cpp and Ollama.",
    "inspect": "Show an adapter's ranks, targets and size, and whether vLLM/LoRAX/llama.cpp accept it.",
    "serve": "Serve one base model and many adapters behind an OpenAI-compatible API.",
}
# The shell's codes for a process ended by a signal, 128 + its number: Ctrl-C, and a reader that left.
EXIT_INTERRUPTED = 128 + 2  # SIGINT
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


def _load_verb(name: str):
    return importlib.import_module(f"loratune.cli.{name}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Build the top-level parser; only the verb named in argv is imported."""
    parser = argparse.ArgumentParser(prog="loratune", description="LoRA fine-tuning, PEFT-compatible.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for verb, help_text in VERBS.items():
        if verb == chosen:
            _load_verb(verb).add_parser(sub)
        else:
            sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def either_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Rewrite long options to the spelling their verb declares, so `--max_model_len` and
    `--max-model-len` both work (vLLM writes dashes, Transformers underscores); help shows one."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    sub = next((a.choices[verb] for a in parser._actions  # argparse has no public accessor
                if isinstance(a, argparse._SubParsersAction) and verb in a.choices), None)
    if sub is None:
        return argv
    known = {o for action in sub._actions for o in action.option_strings if o.startswith("--")}
    out = []
    for i, token in enumerate(argv):
        if token == "--":  # everything after it is positional
            return out + argv[i:]
        flag, eq, value = token.partition("=")
        if flag.startswith("--") and flag not in known:
            flag = next((f for f in _spellings(flag[2:]) if f in known), flag)
        out.append(flag + eq + value)
    return out


def _spellings(body: str) -> list[str]:
    """`--` + body with dashes, with underscores, and with argparse's `--no-` prefix kept."""
    found = [body.replace("_", "-"), body.replace("-", "_")]
    if body[:3] in ("no-", "no_"):
        found += ["no-" + body[3:].replace("_", "-"), "no-" + body[3:].replace("-", "_")]
    return ["--" + b for b in found]


def main(argv: list[str] | None = None) -> int:
    """Run one verb and return its exit code (2 for usage and input errors)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the verb's libraries import, loading or generating
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(either_spelling(parser, argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verb is None:
        parser.print_help()
        return 2
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Generated text, paths and prompts may hold characters an ASCII or Latin-1 terminal cannot
        # show: escape them (as Python does on stderr) instead of failing with UnicodeEncodeError.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return int(_load_verb(args.verb).run(args) or 0)
    except BrokenPipeError:  # stdout closed early, as by `loratune generate ... | head -c 20`
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at interpreter exit does not fail once more.

    https://docs.python.org/3/library/signal.html#note-on-sigpipe
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests), or already closed
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
