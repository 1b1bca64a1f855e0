"""`loratune merge`: fold an adapter into its base and write a standard Hugging Face model directory.

The directory (config.json, model.safetensors, generation_config.json, tokenizer files) loads with
plain `transformers.AutoModelForCausalLM.from_pretrained`. The merged model's logits on a probe
batch are compared (float32) with the adapter model's, and the written files are read back: the
maximum absolute difference is printed with PASS or FAIL; on FAIL nothing is written, exit code 1.
A QLoRA adapter (quantized base) is merged into the dequantized base and written in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys

from loratune.cli.generate import EXIT_USAGE, add_model_arguments, describe, quant_overrides

EXIT_CHECK_FAILED = 1


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "merge", help="Merge an adapter into its base and write a standard HF model directory.",
        description="Merge --adapter into its base model, write --output_dir as a standard Hugging Face "
                    "model directory, and check that its logits equal the adapter model's.",
        allow_abbrev=False,
    )
    add_model_arguments(parser, adapter_required=True, dtypes=("bfloat16", "float32", "float16"),
                        dtype_help="dtype of the written weights (default: bfloat16; always bfloat16 for a "
                                   "quantized base)")
    parser.add_argument("--output_dir", required=True, metavar="OUT",
                        help="new directory for the merged model")
    parser.add_argument("--format", default="hf", choices=["hf", "gguf"],
                        help="hf: a Hugging Face model directory (default); gguf: OUT/model.gguf for "
                             "llama.cpp and Ollama, with a Modelfile")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="GGUF tensor type with --format gguf (default: f16)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed max |logit difference| of the float32 check, "
                             "a finite number >= 0 (default: 1e-4 + 1e-4 * max |logit|)")
    return parser


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from loratune.errors import LoratuneError
    from loratune.tools.export import check_merge_output_dir, check_tolerance, merge_to_directory
    from loratune.tools.load_trained import load_model, resolve_device, resolve_quant

    hf_logging.disable_progress_bar()  # the save/reload bars would bury the check's result
    try:
        check_tolerance(args.tolerance)
        check_merge_output_dir(args.output_dir, args.adapter)
        resolve_device(args.device)  # before the model loads
        quant = resolve_quant(args.adapter if _is_dir(args.adapter) else None, quant_overrides(args))
        quantized = quant["load_in_4bit"] or quant["load_in_8bit"]
        dtype = args.dtype
        if quantized and dtype != "bfloat16":
            print(f"note: a quantized base is dequantized to bfloat16; writing bfloat16, not {dtype}",
                  file=sys.stderr)
            dtype = "bfloat16"
        # The check runs in float32: the base (and a quantized base's matmuls) compute in float32,
        # so the merged model must match the adapter model up to summation order.
        overrides = {**quant_overrides(args), **({"bnb_4bit_compute_dtype": "float32"} if quantized else {})}
        loaded = load_model(args.model_name_or_path, args.adapter, dtype="float32", quant=overrides,
                            device=args.device)
        if args.format == "gguf":
            return _run_gguf(args, loaded)
        print(f"Merging {describe(loaded)} -> {args.output_dir} ({dtype})")
        report = merge_to_directory(loaded, args.output_dir, dtype=dtype, tolerance=args.tolerance)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verdict = "PASS" if report.passed else "FAIL"
    print(f"Logit check, merged vs {report.reference} (float32): max abs diff {report.max_abs_diff:.3e} "
          f"(tolerance {report.tolerance:.3e}, max |logit| {report.max_abs_logit:.3g}): {verdict}")
    if report.dtype != "float32":
        print(f"Written {report.dtype} model vs {report.reference}: max abs diff {report.written_diff:.3e} "
              f"({report.dtype} rounding of the weights)")
    if not report.weights_identical:
        print("error: the directory read back does not hold the merged weights", file=sys.stderr)
    if not report.published:
        print(f"error: the merged model does not reproduce the adapter model; {args.output_dir} "
              "was not written",
              file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"Wrote {args.output_dir}: {', '.join(report.files)}")
    print(f"Load it with: AutoModelForCausalLM.from_pretrained({args.output_dir!r})")
    return 0


def _run_gguf(args, loaded) -> int:
    from loratune.cli.export import print_result, quiet_gguf_writer
    from loratune.tools.gguf_export import merge_to_gguf

    quiet_gguf_writer()
    print(f"Merging {describe(loaded)} -> {os.path.join(args.output_dir, 'model.gguf')} ({args.outtype})")
    result = merge_to_gguf(loaded, args.output_dir, outtype=args.outtype, tolerance=args.tolerance)
    verdict = "PASS" if result.passed else "FAIL"
    print(f"Logit check, merged vs the adapter model (float32): max abs diff {result.max_abs_diff:.3e} "
          f"(tolerance {result.tolerance:.3e}): {verdict}")
    if not result.passed:
        print(f"error: the merged model does not reproduce the adapter model; {args.output_dir} "
              "was not written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"Written {args.outtype} GGUF, read back by Transformers, vs the adapter model: max abs diff "
          f"{result.written_diff:.3e} ({args.outtype} rounding of the weights)")
    print_result(result)
    return 0


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)
