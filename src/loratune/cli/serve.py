"""`loratune serve`: one base model and many adapters behind an OpenAI-compatible HTTP API.

    loratune serve --model_name_or_path preset:tiny-llama --adapter sql=out/sql --adapter chat=out/chat \
        --adapter-root adapters/ --api-key KEY --port 8000

Bad flags, a missing model or an adapter that does not fit the base exit with code 2 and one message.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve", help="Serve one base model and many adapters behind an OpenAI-compatible API.",
        description="OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions, vLLM's "
                    "/v1/load_lora_adapter and /v1/unload_lora_adapter, /health, /metrics, playground at /). "
                    "The request's `model` picks the adapter; the base model's name means no adapter.",
    )
    parser.add_argument("--model_name_or_path", "--model", default=None,
                        help="base model: preset:NAME, a local HF directory, a .gguf file or a hub id "
                             "(default: the first --adapter's base_model_name_or_path)")
    parser.add_argument("--served-model-name", default=None,
                        help="name of the base model in requests and /v1/models "
                             "(default: --model_name_or_path)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load the adapter in DIR as model NAME at startup (repeatable)")
    parser.add_argument("--adapter-root", action="extend", nargs="+", default=[], metavar="DIR",
                        help="directories /v1/load_lora_adapter may load from (one or more, repeatable; "
                             "none = runtime loading disabled)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="accepted bearer key for /v1/* "
                             "(repeatable; default: $LORATUNE_API_KEY; none = open)")
    parser.add_argument("--max-loaded", type=int, default=32,
                        help="most adapters loaded at once (default: 32)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together (default: 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a batch slot before 429 (default: 64)")
    parser.add_argument("--max-request-tokens", type=int, default=None,
                        help="largest prompt + max_tokens per request; above is 413 (default: the context)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="connections at once; over it requests get 503 (default: 512)")
    parser.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="close a connection whose request headers take longer (default: 10)")
    parser.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="answer 408 when the next chunk of a request body takes longer (default: 30)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's max_position_embeddings)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the engine (default: torch's choice)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="base model dtype (default: auto = bf16 where supported)")
    quant = parser.add_argument_group("quantized base (QLoRA adapters)")
    quant.add_argument("--load-in-4bit", action="store_true", help="quantize the frozen base to 4 bits")
    quant.add_argument("--load-in-8bit", action="store_true", help="quantize the frozen base to 8 bits")
    quant.add_argument("--bnb-4bit-quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit data type")
    quant.add_argument("--bnb-4bit-compute-dtype", choices=["auto", "bfloat16", "float16", "float32"],
                       default="auto", help="dtype of the 4-bit matmuls")
    quant.add_argument("--bnb-4bit-use-double-quant", action="store_true",
                       help="quantize the 4-bit scales too")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def parse_adapters(values: list[str]) -> dict[str, str]:
    """Turn ["name=dir", ...] into {name: dir}, collecting every problem."""
    adapters, problems = {}, []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            problems.append(f"--adapter {value!r}: expected NAME=DIR")
        elif name in adapters:
            problems.append(f"--adapter {value!r}: the name {name!r} is used twice")
        else:
            adapters[name] = path
    if problems:
        from loratune.errors import ConfigError

        raise ConfigError(problems, source="loratune serve")
    return adapters


def base_of(model_name_or_path: str | None, adapters: dict[str, str]) -> str:
    """The base to serve: the flag, else the base the first adapter was trained on."""
    from loratune.config import LoraConfig
    from loratune.tools.load_trained import check_adapter_path, resolve_base_name

    if model_name_or_path or not adapters:
        return resolve_base_name(model_name_or_path, None, None)
    first = next(iter(adapters.values()))
    check_adapter_path(first)
    return resolve_base_name(None, LoraConfig.from_pretrained(first), first)


def run(args: argparse.Namespace) -> int:
    from loratune.errors import ConfigError, LoratuneError

    try:
        from loratune.serve.server import load_and_build, serve_forever
        from loratune.serve.state import ServeSettings
        from loratune.tools.load_trained import resolve_device
    except ImportError as exc:
        print(f"error: the server needs the 'serve' extra ({exc.name} is missing): "
              "pip install 'loratune[serve]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        problems = [f"--{flag} must be positive, got {value}" for flag, value in (
            ("max-loaded", args.max_loaded), ("max-batch-size", args.max_batch_size),
            ("max-queue", args.max_queue), ("max-request-tokens", args.max_request_tokens),
            ("max-model-len", args.max_model_len), ("threads", args.threads))
            if value is not None and value <= 0]
        roots = [Path(r).resolve() for r in args.adapter_root]
        problems += [f"--adapter-root {r} is not a directory" for r in roots if not r.is_dir()]
        if problems:
            raise ConfigError(problems, source="loratune serve")
        adapters = parse_adapters(args.adapter)
        args.model_name_or_path = base_of(args.model_name_or_path, adapters)
        env_key = os.environ.get("LORATUNE_API_KEY")
        settings = ServeSettings(
            base_name=args.served_model_name or args.model_name_or_path, base_root=args.model_name_or_path,
            api_keys=args.api_key or ([env_key] if env_key else []), adapter_roots=roots,
            max_loaded=args.max_loaded, max_request_tokens=args.max_request_tokens,
            max_connections=args.max_connections, header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
        )
        quantization = {
            "load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit,
            "bnb_4bit_quant_type": args.bnb_4bit_quant_type,
            "bnb_4bit_compute_dtype": args.bnb_4bit_compute_dtype,
            "bnb_4bit_use_double_quant": args.bnb_4bit_use_double_quant,
        }
        app, state = load_and_build(args.model_name_or_path, settings, dtype=args.dtype,
                                    device=resolve_device(args.device), quantization=quantization,
                                    adapters=adapters,
                                    max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                                    context_length=args.max_model_len, num_threads=args.threads)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"serving {settings.base_name!r} with adapters {sorted(adapters) or 'none'} on "
          f"http://{args.host}:{args.port} (playground at /)", file=sys.stderr)
    serve_forever(app, state, host=args.host, port=args.port, log_level=args.log_level)
    return 0
