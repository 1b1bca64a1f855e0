"""`loratune export --format gguf` and `loratune merge --format gguf`: GGUF files plus an Ollama
Modelfile and the llama.cpp command lines, in one new output directory.

  export_adapter_gguf  OUT/adapter.gguf (+ OUT/base.gguf when the base is not a GGUF file already),
                       OUT/Modelfile (FROM base, ADAPTER adapter);
  merge_to_gguf        OUT/model.gguf, merged and checked like `merge_to_directory` (float32 logits of
                       the merged model vs the adapter model), then read back with Transformers' GGUF
                       reader and measured (the rounding of the output type, reported), OUT/Modelfile.
The output directory appears complete or not at all (`atomic_directory`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loratune.atomic import atomic_directory
from loratune.config import LoraConfig
from loratune.errors import ConfigError, MergeError, one_line
from loratune.tools.export import (
    check_merge_output_dir,
    logits_of,
    merge_into_base,
    probe_batch,
    tolerance_for,
)
from loratune.tools.gguf import parse_outtype, write_gguf_model
from loratune.tools.gguf_adapter import write_gguf_adapter
from loratune.tools.gguf_base import check_gguf_file
from loratune.tools.load_trained import resolve_base_name
from loratune.tools.loading import gguf_file_of, load_tokenizer, model_dir
from loratune.tools.ollama import OllamaTemplate, convert_chat_template, llama_cpp_commands, modelfile


@dataclass(frozen=True)
class GgufExport:
    """What was written, and how to run it."""

    output_dir: str
    files: list[str]
    model_gguf: str  # the model llama.cpp loads (-m)
    adapter_gguf: str | None
    template: OllamaTemplate
    commands: list[str]
    max_abs_diff: float | None = None  # merge: merged (float32) vs adapter model, the PASS/FAIL number
    tolerance: float | None = None
    written_diff: float | None = None  # merge: the GGUF read back vs the adapter model

    @property
    def passed(self) -> bool:
        return self.max_abs_diff is None or self.max_abs_diff <= self.tolerance


def base_config_and_tokenizer(name: str):
    """(Transformers config, tokenizer, GGUF file or None) of a base model, without loading weights."""
    gguf_file = gguf_file_of(name)
    if gguf_file is None:
        directory = model_dir(name)  # a ConfigError for a name that is none of the accepted kinds
        try:
            config = AutoConfig.from_pretrained(directory)
        except Exception as exc:  # offline hub id, broken config.json, an impossible architecture
            raise ConfigError(f"cannot read the base model config of {name!r}: {one_line(exc)}") from None
        return config, load_tokenizer(name), None
    check_gguf_file(gguf_file)  # a file cut short, an adapter, missing keys: named, not a traceback
    kwargs = {"gguf_file": gguf_file.name}
    try:
        return (AutoConfig.from_pretrained(gguf_file.parent, **kwargs),
                AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs), gguf_file)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"cannot read {gguf_file} as a GGUF base model: "
                          f"{type(exc).__name__}: {exc}") from exc


def export_adapter_gguf(adapter_dir: str, output_dir: str, *, outtype: str = "f32",
                        base: str | None = None) -> GgufExport:
    """Write the adapter as GGUF (and the base, when it is not GGUF yet) plus a Modelfile.

    Raises:
        ConfigError / UnsupportedFeatureError / AdapterError: bad outtype, base, output_dir or adapter.
    """
    parse_outtype(outtype)
    check_merge_output_dir(output_dir, adapter_dir)
    base_name = resolve_base_name(base, LoraConfig.from_pretrained(adapter_dir), adapter_dir)
    config, tokenizer, base_gguf = base_config_and_tokenizer(base_name)
    template = convert_chat_template(tokenizer)
    out = Path(output_dir).resolve()
    with atomic_directory(output_dir) as tmp:
        write_gguf_adapter(adapter_dir, config, Path(tmp) / "adapter.gguf", outtype)
        if base_gguf is None:
            from loratune.tools.loading import load_base_model

            model = load_base_model(base_name, dtype="float32")
            write_gguf_model(model, tokenizer, Path(tmp) / "base.gguf", _model_outtype(outtype))
        model_path = str(base_gguf or out / "base.gguf")
        (Path(tmp) / "Modelfile").write_text(modelfile(model_path, template, adapter_gguf="./adapter.gguf"))
        files = sorted(os.listdir(tmp))
    return GgufExport(str(out), files, model_path, str(out / "adapter.gguf"), template,
                      llama_cpp_commands(model_path, str(out / "adapter.gguf")))


def _model_outtype(outtype: str) -> str:
    """A base written beside an f32 adapter is f16: full precision doubles its size for no gain."""
    return "f16" if outtype == "f32" else outtype


def _judge_written(written_diff: float, diff: float, tol: float, outtype: str) -> None:
    """Refuse to publish a GGUF whose read-back logits are not finite (a weight beyond the type's
    range), or, written in f32, differ from the checked merge by more than the tolerance (nothing
    rounds there, so the file itself is wrong)."""
    if not math.isfinite(written_diff):
        raise MergeError(f"the written {outtype} GGUF, read back, gives non-finite logits: a merged weight "
                         "does not fit it; use --outtype bf16 or f32")
    if outtype == "f32" and written_diff > diff + tol:
        raise MergeError(f"the written f32 GGUF, read back, differs from the adapter model by "
                         f"{written_diff:.3e} (tolerance {tol:.3e}): the GGUF conversion lost something; "
                         "nothing was written")


def merge_to_gguf(loaded, output_dir: str, *, outtype: str = "f16", tolerance: float | None = None
                  ) -> GgufExport:
    """Merge `loaded.model` (a float32 LoraModel) into its base and write OUT/model.gguf + Modelfile.

    The model is consumed (merged in place). Nothing is published when the float32 check fails.

    Raises:
        ConfigError: bad outtype or output_dir, no adapter, unsupported architecture or tokenizer.
        MergeError: NaN/Inf in a merged weight.
    """
    parse_outtype(outtype)
    if not hasattr(loaded.model, "merge_and_unload"):
        raise ConfigError("merging needs an adapter (--adapter DIR)")
    check_merge_output_dir(output_dir, loaded.adapter_dir)
    probe = probe_batch(loaded.tokenizer, loaded.model.get_input_embeddings().weight.shape[0])
    reference = logits_of(loaded.model, probe)
    merged = merge_into_base(loaded)
    diff = float((logits_of(merged, probe) - reference).abs().max())
    tol = tolerance if tolerance is not None else tolerance_for(reference)
    template = convert_chat_template(loaded.tokenizer)
    out = Path(output_dir).resolve()
    result = dict(template=template, max_abs_diff=diff, tolerance=tol, adapter_gguf=None,
                  model_gguf=str(out / "model.gguf"), commands=llama_cpp_commands(str(out / "model.gguf")))
    if diff > tol or diff != diff:
        return GgufExport(str(out), [], written_diff=None, **result)
    with atomic_directory(output_dir) as tmp:
        path = Path(tmp) / "model.gguf"
        write_gguf_model(merged, loaded.tokenizer, path, outtype, name=Path(output_dir).name,
                         vocab_from=gguf_file_of(loaded.base_name))
        written = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", dtype=torch.float32)
        written_diff = float((logits_of(written.eval(), probe) - reference).abs().max())
        _judge_written(written_diff, diff, tol, outtype)
        (Path(tmp) / "Modelfile").write_text(modelfile("./model.gguf", template))
        files = sorted(os.listdir(tmp))
    return GgufExport(str(out), files, written_diff=written_diff, **result)
