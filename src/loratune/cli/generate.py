"""`loratune generate`: one completion from the base model or an adapter, greedy or sampled.

Also home of the model flags shared by `chat`, `eval` and `merge` (`add_model_arguments`,
`quant_overrides`), so the four verbs spell them the same way.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def add_model_arguments(parser: argparse.ArgumentParser, *, adapter_required: bool = False,
                        dtypes: tuple[str, ...] = ("auto", "bfloat16", "float32", "float16"),
                        dtype_help: str = "dtype of the base model (default: auto = bf16 where supported)",
                        ) -> None:
    """--model_name_or_path, --adapter, --dtype and the quantization flags."""
    parser.add_argument("--model_name_or_path", metavar="M",
                        help="base model: local HF directory, hub id or preset:NAME "
                             "(default: the adapter's base_model_name_or_path)")
    parser.add_argument("--adapter", metavar="DIR", required=adapter_required,
                        help="adapter directory (PEFT format)"
                             + ("" if adapter_required else "; omit for the base model"))
    parser.add_argument("--dtype", default=dtypes[0], choices=list(dtypes), help=dtype_help)
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)")
    group = parser.add_argument_group("quantized base (default: as in the adapter's train_config.yaml)")
    group.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                       help="quantize the base to 4 bits (QLoRA)")
    group.add_argument("--load_in_8bit", action=argparse.BooleanOptionalAction, default=None,
                       help="quantize the base to 8 bits")
    group.add_argument("--bnb_4bit_quant_type", choices=["nf4", "fp4"], default=None, help="4-bit data type")
    group.add_argument("--bnb_4bit_compute_dtype", choices=["auto", "bfloat16", "float16", "float32"],
                       default=None,
                       help="dtype of the 4-bit matmuls")
    group.add_argument("--bnb_4bit_use_double_quant", action=argparse.BooleanOptionalAction, default=None,
                       help="quantize the 4-bit scales too")


def quant_overrides(args) -> dict:
    """The quantization flags the user gave (None = not given)."""
    keys = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
            "bnb_4bit_use_double_quant")
    return {k: getattr(args, k, None) for k in keys}


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int = 64) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                        help=f"tokens to generate at most (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")


def settings_from_args(args):
    from loratune.tools.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)


def load_from_args(args):
    from loratune.tools.load_trained import load_model

    return load_model(args.model_name_or_path, args.adapter, dtype=args.dtype, quant=quant_overrides(args),
                      device=args.device)


def describe(loaded) -> str:
    """One line saying what runs: base, adapter, quantization."""
    what = f"{loaded.base_name}"
    if loaded.quantized:
        what += f" ({loaded.quantized})"
    if loaded.adapter_dir:
        what += f" + adapter {loaded.adapter_dir}"
    return what


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "generate", help="Generate text with the base model or an adapter.",
        description="Generate a continuation of --prompt with the base model or an adapter. Greedy by "
                    "default; --temperature > 0 samples (reproducibly with --seed).",
        allow_abbrev=False,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the tokenizer's chat template")
    add_sampling_arguments(parser)
    return parser


def run(args) -> int:
    """Print the generated text (only the new text) to stdout as it is generated."""
    from loratune.errors import LoratuneError
    from loratune.tools.generation import chat_ids, check_utf8, generate_text, prompt_ids

    try:
        settings = settings_from_args(args)
        check_utf8(args.prompt, "--prompt")  # before the (slow) model load
        loaded = load_from_args(args)
        tok = loaded.tokenizer
        if args.chat:
            ids = chat_ids(tok, [{"role": "user", "content": args.prompt}])
        else:
            ids = prompt_ids(tok, args.prompt)
        print(f"# {describe(loaded)}", file=sys.stderr)
        generate_text(loaded.model, tok, ids, settings,
                      on_text=lambda piece: print(piece, end="", flush=True))
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print()
    return 0
