"""`loratune export ADAPTER --format gguf`: a GGUF LoRA adapter for llama.cpp and Ollama.

Writes OUT/adapter.gguf (byte for byte what llama.cpp's convert_lora_to_gguf.py writes), the base as
OUT/base.gguf when it is not a GGUF file already, and OUT/Modelfile; prints the llama.cpp commands.
For vLLM and LoRAX no export is needed: they read the PEFT adapter directory as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from loratune.cli.generate import EXIT_USAGE

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "export", help="Export an adapter as GGUF for llama.cpp and Ollama.",
        description="Write a PEFT adapter as a GGUF LoRA adapter for llama.cpp (--lora) and Ollama "
                    "(ADAPTER), with an Ollama Modelfile, and print the llama.cpp command line.",
        allow_abbrev=False,
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory (PEFT format)")
    parser.add_argument("--format", required=True, choices=["gguf"], help="output format")
    parser.add_argument("--outtype", default="f32", choices=list(OUTTYPES),
                        help="tensor type of the adapter (default: f32, as llama.cpp's converter)")
    parser.add_argument("--base", metavar="M", default=None,
                        help="base model: a .gguf file, a HF directory, hub id or preset:NAME "
                             "(default: the adapter's base_model_name_or_path)")
    parser.add_argument("-o", "--output_dir", metavar="OUT", default=None,
                        help="new directory for the files (default: ADAPTER-gguf beside the adapter)")
    return parser


def run(args) -> int:
    from loratune.errors import LoratuneError
    from loratune.tools.gguf_export import export_adapter_gguf

    quiet_gguf_writer()
    output_dir = args.output_dir if args.output_dir is not None else default_output_dir(args.adapter)
    try:
        result = export_adapter_gguf(args.adapter, output_dir, outtype=args.outtype, base=args.base)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print_result(result)
    return 0


def default_output_dir(adapter: str) -> str:
    """ADAPTER-gguf beside the adapter, also for `.` or `out/` (not `.-gguf` inside it)."""
    return os.path.abspath(adapter) + "-gguf"


def quiet_gguf_writer() -> None:
    """The gguf package logs every file it writes at INFO; the summary printed here says it once."""
    logging.getLogger("gguf").setLevel(logging.WARNING)


def print_result(result) -> None:
    """The files, the Modelfile's template status and the commands to run them."""
    print(f"Wrote {result.output_dir}: {', '.join(result.files)}")
    if result.template.template is None:
        print(f"note: Modelfile has no TEMPLATE: {result.template.reason}")
    print(f"Ollama:    ollama create NAME -f {result.output_dir}/Modelfile && ollama run NAME")
    for command in result.commands:
        print(f"llama.cpp: {command}")
