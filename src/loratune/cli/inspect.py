"""`loratune inspect ADAPTER`: ranks, targets, size, and whether vLLM, LoRAX and llama.cpp serve it.

Reads only the adapter's files (no base model is loaded). `--json` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from loratune.cli.generate import EXIT_USAGE


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "inspect",
        help="Show an adapter's ranks, targets and size, and whether vLLM/LoRAX/llama.cpp accept it.",
        description="Describe an adapter directory (PEFT format) and say whether vLLM, LoRAX and "
                    "llama.cpp (after `loratune export --format gguf`) will load it, with the reasons "
                    "when they will not.",
        allow_abbrev=False,
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    return parser


def run(args) -> int:
    from loratune.errors import LoratuneError
    from loratune.tools.acceptance import check_all
    from loratune.tools.inspection import summarize_adapter

    try:
        summary = summarize_adapter(args.adapter)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verdicts = check_all(summary)
    if args.json:
        data = summary.to_dict()
        data["servers"] = {v.server: v.to_dict() for v in verdicts}
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(format_summary(summary, verdicts))
    return 0


def format_summary(s, verdicts) -> str:
    from loratune.tools.inspection import human_size

    c = s.config
    ranks = ", ".join(f"r={r} x{n}" for r, n in s.ranks.items())
    lines = [
        f"Adapter:     {s.path}",
        f"Base model:  {c.base_model_name_or_path or '(not recorded)'}",
        f"Rank:        r={c.r}, lora_alpha={c.lora_alpha}" + (" (rsLoRA)" if c.use_rslora else "")
        + (" + DoRA" if c.use_dora else ""),
        f"Ranks:       {ranks or '(no LoRA tensors)'}",
    ]
    if c.rank_pattern:
        lines.append(f"rank_pattern: {json.dumps(c.rank_pattern)}")
        lines += [f"  {m.path}: r={m.r}" for m in s.modules if m.r != c.r]
    if c.alpha_pattern:
        lines.append(f"alpha_pattern: {json.dumps(c.alpha_pattern)}")
    lines += [
        f"Targets:     {', '.join(s.target_names)} ({len(s.modules)} modules)",
        f"Parameters:  {s.num_parameters:,}",
        f"Size:        {human_size(s.size_bytes)} on disk",
        f"Dtype:       {', '.join(f'{d} ({n} tensors)' for d, n in s.dtypes.items())}",
    ]
    if c.modules_to_save:
        lines.append(f"Also saved:  {', '.join(c.modules_to_save)} (modules_to_save)")
    if c.bias != "none":
        lines.append(f"Bias:        {c.bias}")
    lines.append("")
    for v in verdicts:
        lines.append(f"{v.server + ':':<7} {'ACCEPTED' if v.accepted else 'REJECTED'}"
                     + (" (after loratune export --format gguf)" if v.server == "llama.cpp" else ""))
        lines += [f"  - {r}" for r in v.reasons]
        lines += [f"  note: {n}" for n in v.notes]
    return "\n".join(lines)
