"""Write a PEFT LoRA adapter as a llama.cpp GGUF adapter, checked against its base model first.

The layout, names and tensor encodings are gguf.py's (shared with the model writer); this module adds
what only an adapter needs: pairing each module's lora_A and lora_B, checking every pair against the
base config before anything is written, and the adapter's metadata keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import gguf
import torch
from torch import Tensor

from loratune.errors import ConfigError
from loratune.module_patterns import first_few
from loratune.tools.gguf import (
    Hparams,
    atomic_gguf_path,
    encode_tensor,
    gguf_tensor_name,
    hparams_of,
    parse_outtype,
    qk_heads,
    rope_row_order,
    write_tensors_and_close,
)

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


def write_gguf_adapter(adapter_dir: str, base_config, path: str | os.PathLike, outtype: str = "f32") -> str:
    """Write a PEFT LoRA adapter as a llama.cpp GGUF adapter (`llama-cli --lora`, Ollama ADAPTER).

    Laid out as llama.cpp's convert_lora_to_gguf.py does: per module `<gguf name>.lora_a` (ne [in, r])
    and `.lora_b` (ne [r, out]), lora_b rows permuted for q/k; keys general.type=adapter,
    adapter.type=lora, adapter.lora.alpha, and the model card metadata. rsLoRA is written with
    alpha = lora_alpha * sqrt(r) (the converter writes lora_alpha, which llama.cpp would divide by r).
    `base_config`: the base model's Transformers config (object or dict). Returns the path written.

    Raises:
        UnsupportedFeatureError: what llama.cpp cannot load (`acceptance.check_llama_cpp`), by name.
        ConfigError: base architecture or outtype not supported; LoRA on a tied output head.
    """
    from pathlib import Path

    from loratune.adapter_io import read_adapter
    from loratune.errors import UnsupportedFeatureError
    from loratune.tools.acceptance import check_llama_cpp, rslora_alpha
    from loratune.tools.inspection import summarize_adapter

    _, qtype = parse_outtype(outtype)
    hp = hparams_of(base_config, source="base model config")
    verdict = check_llama_cpp(summarize_adapter(adapter_dir))
    if not verdict.accepted:
        raise UnsupportedFeatureError(f"{adapter_dir}: llama.cpp cannot load this adapter: "
                                      + "; ".join(verdict.reasons))
    config, tensors = read_adapter(adapter_dir)
    writer = gguf.GGUFWriter(None, hp.arch)
    ranks = set()
    for name, lora_a, lora_b in adapter_pairs(tensors, hp, source=os.fspath(adapter_dir)):
        ranks.add(lora_a.shape[0])
        for suffix, data in ((".lora_a", lora_a), (".lora_b", lora_b)):
            encoded, tensor_type = encode_tensor(name + suffix, data, qtype)
            writer.add_tensor(name + suffix, encoded, raw_dtype=tensor_type)
    alpha = rslora_alpha(config.lora_alpha, ranks.pop()) if config.use_rslora else float(config.lora_alpha)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata = gguf.Metadata.load(None, Path(adapter_dir), None, writer.get_total_parameter_count()[0])
    metadata.name = metadata.name or Path(adapter_dir).name
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    path = os.fspath(path)
    with atomic_gguf_path(path) as tmp:
        write_tensors_and_close(writer, tmp)
    return path


def adapter_pairs(tensors: dict[str, Tensor], hp: Hparams, *, source: str = "adapter"
                  ) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Yield (GGUF weight name, lora_A (R, in), lora_B (out, R)) per module, in file order, lora_B rows
    permuted for q/k; a pair of mixed dtypes, or not float16/float32, goes through float32.

    Raises:
        AdapterError: a tensor that is not half of a lora_A/lora_B pair, a lone half, or a pair whose
            shapes do not fit the base model (`hp`); all checked before the first pair is yielded.
        ConfigError: LoRA on an output head tied to the embedding.
    """
    from loratune.adapter_io import PREFIX
    from loratune.errors import AdapterError

    pairs: dict[str, dict[str, Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key.removeprefix(PREFIX))
        if m is None:
            problems.append(f"{key}: not a lora_A/lora_B weight")
            continue
        pairs.setdefault(m["module"], {})[m["kind"]] = tensor
    for module, pair in pairs.items():
        if module == "lm_head" and hp.tie_word_embeddings:
            raise ConfigError("LoRA on lm_head: the base model ties it to embed_tokens, and llama.cpp has no "
                              "separate output tensor to apply it to")
        problems += _pair_problems(module, pair, hp)
    if problems:
        raise AdapterError(f"{source}: cannot be written as a llama.cpp adapter for this base: "
                           + first_few(problems, sep="; "))
    for module, pair in pairs.items():
        name = gguf_tensor_name(module + ".weight")
        lora_a, lora_b = pair["lora_A"], pair["lora_B"]
        if lora_a.dtype != lora_b.dtype or lora_a.dtype not in (torch.float16, torch.float32):
            lora_a, lora_b = lora_a.float(), lora_b.float()
        heads = qk_heads(name, hp)
        yield name, lora_a, (rope_row_order(lora_b, heads) if heads else lora_b)


def _pair_problems(module: str, pair: dict[str, Tensor], hp: Hparams) -> list[str]:
    """Why one module's lora_A/lora_B cannot be written for the base `hp` (empty when they can)."""
    lone = [k for k in ("lora_A", "lora_B") if k not in pair]
    if lone:
        return [f"{module}: has no {lone[0]} (each module needs both lora_A and lora_B)"]
    a, b = tuple(pair["lora_A"].shape), tuple(pair["lora_B"].shape)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return [f"{module}: lora_A {a} and lora_B {b} are not (R, in) and (out, R)"]
    name = gguf_tensor_name(module + ".weight")
    want = _base_shape(name, hp) if name else None
    if want is None:
        return [f"{module}: no llama.cpp tensor for this module in a {hp.model_type} model"]
    if (b[0], a[1]) != want:
        return [f"{module}: the adapter is for a ({b[0]}, {a[1]}) weight, the base model's is {want} "
                "(an adapter trained on another base?)"]
    return []


def _base_shape(gguf_name: str, hp: Hparams) -> tuple[int, int] | None:
    """(out, in) of the base weight behind a GGUF weight name; None for a block past the model's last."""
    parts = gguf_name.split(".")  # ["blk", "0", "attn_q", "weight"] or ["output", "weight"]
    if parts[0] == "blk" and int(parts[1]) >= hp.n_layers:
        return None
    q, kv = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    d, ffn, vocab = hp.hidden_size, hp.intermediate_size, hp.vocab_size
    shapes = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
              "ffn_gate": (ffn, d), "ffn_up": (ffn, d), "ffn_down": (d, ffn), "output": (vocab, d)}
    return shapes.get(parts[-2])
