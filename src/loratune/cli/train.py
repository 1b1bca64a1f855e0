"""`loratune train [CONFIG.yaml] [--key value ...]`: fine-tune an adapter and say where it went.

Every config key is also a flag (`--learning_rate 1e-4`, `--packing false`,
`--target_modules q_proj v_proj`); flags override the file. Flags are parsed here rather than by
argparse so that unknown keys get the same close-match hints as unknown YAML keys, and every
problem (flags, file and values) is reported together with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import typing

from loratune.cli.main import EXIT_INTERRUPTED

EXIT_USAGE = 2
EXIT_DIVERGED = 1
ALIASES = {"resume": "resume_from_checkpoint"}  # `--resume` = `--resume_from_checkpoint true`


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `train`; its --help lists every key with type, default and meaning."""
    parser = sub.add_parser(
        "train", help="Fine-tune a LoRA adapter from a YAML config and/or --key value flags.",
        description="Fine-tune a LoRA adapter. Every key can be set in CONFIG.yaml or as --key value "
                    "(flags win). Outputs: the adapter (PEFT format), train_config.yaml, metrics.jsonl, "
                    "loss.png and checkpoint-<step>/ folders in output_dir.",
        usage="loratune train [CONFIG.yaml] [--key value ...]",
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML file of flat keys (optional)")
    add_key_options(parser)
    take_over_parsing(parser)
    return parser


def add_key_options(parser: argparse.ArgumentParser) -> None:
    """Document every config key as an option (grouped by section) for --help."""
    from loratune.train.config import describe_keys

    for section, rows in describe_keys():
        group = parser.add_argument_group(f"{section} keys")
        for key, type_name, default, text in rows:
            group.add_argument(f"--{key}", metavar=type_name.upper(), help=f"{text} (default: {default})",
                               default=argparse.SUPPRESS)


def take_over_parsing(parser: argparse.ArgumentParser,
                      extra_flags: dict[str, tuple[str, bool]] | None = None) -> None:
    """Make `parser` hand its raw arguments to `split_args` (argparse still serves -h/--help).

    The sub-command parser is called by its parent through `parse_known_args`, so replacing that
    method on this one instance is enough.
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if "-h" in args or "--help" in args:
            return original(args, namespace)
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.config, namespace.overrides, namespace.flag_problems, namespace.extra = split_args(
            args, extra_flags or {})
        return namespace, []

    parser.parse_known_args = parse_known_args


def split_args(args: list[str],
               extra_flags: dict[str, tuple[str, bool]]) -> tuple[str | None, dict, list[str], dict]:
    """Split raw arguments into (config path, {key: raw value}, problems, {extra name: value}).

    `--key value`, `--key=value`, a bare boolean `--key` (true) or `--no-key` (false), and list keys
    taking several values (`--target_modules q_proj v_proj`). Unknown keys become problems with close
    matches.
    `extra_flags` maps verb-specific flags to (name, takes a value).
    """
    from loratune.train.config import KEY_ALIASES, key_owners, unknown_key_message

    owners = key_owners()
    config, overrides, problems, extra = None, {}, [], {}
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or _is_number(token):
            if config is None:
                config = token
            else:
                problems.append(f"unexpected argument {token!r} (only one CONFIG.yaml is allowed)")
            continue
        flag, _, inline = token.partition("=")
        if flag.startswith("--") and flag not in extra_flags:
            flag = "--" + flag[2:].replace("-", "_")  # --learning-rate is --learning_rate
        key = ALIASES.get(flag.lstrip("-"), flag.lstrip("-"))
        key = KEY_ALIASES.get(key, key)  # TRL's names: --max_length is --max_seq_length
        if flag in extra_flags:
            name, takes_value = extra_flags[flag]
            if takes_value and not inline and i < len(args):
                inline, i = args[i], i + 1
            extra[name] = inline if takes_value else True
            continue
        negated = _negated_bool(key, owners)
        if negated is not None:  # --no-packing / --no_packing: packing=false, takes no value
            if inline:
                problems.append(f"{token.partition('=')[0]} takes no value (it sets {negated} to false), "
                                f"got {inline!r}")
            else:
                overrides[negated] = False
            continue
        values = [inline] if inline else []
        while not inline and i < len(args) and (not args[i].startswith("-") or _is_number(args[i])):
            values.append(args[i])
            i += 1
            if not _takes_list(owners.get(key)):
                break
        if key not in owners:
            problems.append(unknown_key_message(key, owners, as_flag=True))
        elif not values:
            if _is_bool(owners[key]):
                overrides[key] = True
            else:
                problems.append(f"--{key} needs a value")
        else:
            overrides[key] = values if len(values) > 1 else values[0]
    return config, overrides, problems, extra


def _negated_bool(key: str, owners: dict) -> str | None:
    """Return KEY for `no_KEY` when KEY is a boolean key (and `no_KEY` is not a key itself)."""
    name = key.removeprefix("no_")
    if name != key and key not in owners and name in owners and _is_bool(owners[name]):
        return name
    return None


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _field_type(owner):
    from loratune.train.config import SECTIONS, field_types

    section, f = owner
    return field_types(SECTIONS[section])[f.name]


def _takes_list(owner) -> bool:
    if owner is None:
        return False
    tp = _field_type(owner)
    parts = typing.get_args(tp) if typing.get_origin(tp) not in (list, tuple) else (tp,)
    return any(typing.get_origin(p) in (list, tuple) for p in parts)


def _is_bool(owner) -> bool:
    tp = _field_type(owner)
    return tp is bool or bool in typing.get_args(tp)


def load_config_from_args(args):
    """Build the TrainConfig from CONFIG.yaml and flags; raise one ConfigError with every problem.

    Each problem names where the bad value came from: `--key` for a flag, the file for a YAML key.
    """
    from loratune.errors import ConfigError
    from loratune.train.config import build_config, canonical_keys, read_yaml

    problems = list(args.flag_problems)
    raw: dict = {}
    if args.config is not None:
        try:
            raw = read_yaml(args.config)
        except ConfigError as exc:
            problems.append(str(exc))  # names the file already
    try:
        cfg = build_config({**canonical_keys(raw), **args.overrides})
    except ConfigError as exc:
        problems.extend(_blame(p, args.overrides, args.config) for p in exc.problems)
        cfg = None
    if problems:
        raise ConfigError(problems)
    return cfg


def _blame(problem: str, overrides: dict, config: str | None) -> str:
    """Prefix a problem with its origin: "r must be > 0" -> "--r must be > 0" or "base.yaml: r must be > 0".
    """
    key = re.match(r"\w+", problem)
    if key and key.group() in overrides:
        return f"--{problem}"
    return f"{config}: {problem}" if config is not None else problem


def run(args) -> int:
    """Train, then print where the adapter, metrics and plot are and a before/after generation."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from loratune.errors import LoratuneError, TrainingDivergedError
    from loratune.train.api import run as train_run
    from loratune.train.distributed import launch_ranks

    rank = 0
    try:
        rank = launch_ranks()[0]  # RANK=x or a RANK left from another job: named, not a traceback
        if rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        cfg = load_config_from_args(args)
        with logging_redirect_tqdm():
            result = train_run(cfg)
    except TrainingDivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the loop took over Ctrl-C, or a second Ctrl-C
        print("\nAborted (no checkpoint written by this interrupt).", file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank == 0:
        print_summary(result)
    return EXIT_INTERRUPTED if result.interrupted else 0


def print_summary(result) -> None:
    """Tell the user what happened and where everything is."""
    if result.interrupted:
        print(f"\nInterrupted at step {result.step}/{result.total_steps}. "
              f"Checkpoint: {result.last_checkpoint}")
        print("Resume with: loratune train <same config> --resume_from_checkpoint true")
        return
    loss = ""
    if result.first_loss is not None:
        loss = f"; loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    evals = f", eval loss {result.eval_loss:.3f}" if result.eval_loss is not None else ""
    if result.eval_exact_match is not None:
        evals += f", eval exact match {result.eval_exact_match:.1%}"
    print(f"\nTrained {_steps_done(result)} in {result.runtime_s:.0f}s{loss}{evals}")
    print(f"Adapter:  {result.adapter_dir}  (PEFT format: adapter_config.json + adapter_model.safetensors)")
    print(f"Config:   {result.config_path}")
    print(f"Metrics:  {result.metrics_path}")
    if result.peak_rss_mib:
        per_rank = " per rank" if len(result.peak_rss_mib) > 1 else ""
        print(f"Memory:   peak RSS {', '.join(f'{m:,.0f}' for m in result.peak_rss_mib)} MiB{per_rank}")
    if result.plot_path:
        print(f"Plot:     {result.plot_path}")
    if result.sample:
        print(f"\nPrompt:   {result.sample['prompt']!r}")
        print(f"Before:   {result.sample['before']!r}")
        print(f"After:    {result.sample['after']!r}")


def _steps_done(result) -> str:
    """"8 steps", or for a resumed run "steps 4-8 (resumed from checkpoint-3)"."""
    if not result.resumed_from:
        return f"{result.step} steps"
    name = os.path.basename(os.path.normpath(result.resumed_from))
    if result.step <= result.start_step:
        return f"no further steps (resumed from {name} at step {result.start_step})"
    return f"steps {result.start_step + 1}-{result.step} (resumed from {name})"
