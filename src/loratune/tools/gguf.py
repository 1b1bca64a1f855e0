"""Write models and LoRA adapters as GGUF files for llama.cpp and Ollama, with the `gguf` package.

Two writers, both laid out the way llama.cpp's own converters lay their output out
(`convert_hf_to_gguf.py` for models, `convert_lora_to_gguf.py` for adapters), tensor for tensor:
  write_gguf_model    a full model: architecture metadata, tokenizer, chat template, weights (here);
  write_gguf_adapter  a LoRA adapter for `llama-cli --lora` / Ollama's ADAPTER line (gguf_adapter.py).
Llama-family architectures only (llama, mistral, qwen2); anything else is refused by name.

Invariants a reader must know:
  - GGUF shapes are reversed: a torch (out, in) weight is stored with ne = [in, out].
  - llama.cpp's "llama" architecture applies rotary embeddings to interleaved pairs, Transformers
    to the two halves of each head, so q_proj/k_proj rows (and, in an adapter, the rows of their
    lora_B) are permuted per head (`rope_row_order`). qwen2 uses the halves layout: no permutation.
  - Norms and other 1-D tensors are always F32; 2-D weights take the output type; q8_0 falls back to
    F16 for a tensor whose row length is not a multiple of 32, as llama.cpp's converter does.
Files appear complete or not at all (written beside the target, then renamed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from loratune.atomic import file_mode
from loratune.errors import ConfigError
from loratune.module_patterns import shown
from loratune.tools.gguf_vocab import add_vocab

logger = logging.getLogger(__name__)

OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# Transformers model_type -> (GGUF architecture, whether q/k rows are permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# Hugging Face module path (under model.layers.N.) -> GGUF tensor base name (under blk.N.)
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_KEY = re.compile(r"^model\.layers\.(?P<bid>\d+)\.(?P<module>.+)$")
_SIZES = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass(frozen=True)
class Hparams:
    """The architecture numbers both writers need, read from a Transformers config."""

    model_type: str
    arch: str  # GGUF architecture name
    permute_qk: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    head_dim_explicit: bool  # config.json sets head_dim (the converter then writes key/value_length)


def hparams_of(config, *, source: str = "config") -> Hparams:
    """Read what GGUF needs from a Transformers config (object or config.json dict).

    Raises:
        ConfigError: an architecture llama.cpp export does not support, or a missing field.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    model_type = get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"model_type {model_type!r}: GGUF export supports {supported} (Llama family)",
                          source=source)
    if model_type == "llama" and (get("attention_bias") or get("mlp_bias")):
        raise ConfigError("a Llama model with attention_bias/mlp_bias is not supported by GGUF export",
                          source=source)
    missing = [k for k in _SIZES if get(k) is None]
    if missing:
        raise ConfigError(f"missing fields {missing}", source=source)
    bad = [f"{k}={shown(get(k))}" for k in _SIZES + _OPTIONAL_SIZES
           if get(k) is not None and not _is_size(get(k))]
    bad += [f"{k}={shown(get(k))}" for k in ("rope_theta", "rms_norm_eps")
            if get(k) is not None and not _is_positive_float(get(k))]
    if bad:
        raise ConfigError(f"fields that must be positive numbers (sizes: whole numbers below 2**31): "
                          f"{', '.join(bad)}", source=source)
    arch, permute = ARCHITECTURES[model_type]
    n_heads = int(get("num_attention_heads"))
    rope = get("rope_parameters") or {}
    rope_theta = get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"rope_type {rope.get('rope_type')!r} (rope scaling) is not supported by GGUF "
                          "export; to export an adapter, convert the base with llama.cpp's "
                          "convert_hf_to_gguf.py and pass it as --base FILE.gguf", source=source)
    return Hparams(
        model_type=model_type, arch=arch, permute_qk=permute, n_layers=int(get("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(get("num_key_value_heads") or n_heads),
        hidden_size=int(get("hidden_size")), intermediate_size=int(get("intermediate_size")),
        head_dim=int(get("head_dim") or int(get("hidden_size")) // n_heads),
        vocab_size=int(get("vocab_size")), context_length=int(get("max_position_embeddings") or 2048),
        rope_theta=float(rope_theta), rms_norm_eps=float(get("rms_norm_eps") or 1e-6),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        head_dim_explicit=get("head_dim") is not None,
    )


def _is_size(value: object) -> bool:
    """A positive whole number that fits GGUF's uint32 keys (JSON may spell 32 as 32.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 < value < 2**31 and (isinstance(value, int) or value.is_integer())


def _is_positive_float(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:  # an int beyond any float
        return False


def parse_outtype(outtype: str) -> tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]:
    """Return (file type, 2-D tensor type) for an --outtype name.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    if not isinstance(outtype, str) or outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {shown(outtype)}: expected one of {', '.join(OUTTYPES)}")
    return OUTTYPES[outtype]


def gguf_tensor_name(hf_name: str) -> str | None:
    """Map a Transformers weight name to its GGUF name ("model.layers.0.self_attn.q_proj.weight" ->
    "blk.0.attn_q.weight"); None for a name with no GGUF tensor."""
    module, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{kind}"
    m = _BLOCK_KEY.match(module)
    if m and m["module"] in _BLOCK_NAMES:
        return f"blk.{m['bid']}.{_BLOCK_NAMES[m['module']]}.{kind}"
    return None


def rope_row_order(rows: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a q/k projection (or its lora_B, or bias) from Transformers' rotary layout
    (each head: first half, second half) to llama.cpp's (each head: interleaved pairs).

    rows: (n_heads * head_dim, ...) -> same shape. Inverse of Transformers' GGUF reader permutation.
    """
    head_dim = rows.shape[0] // n_heads
    grouped = rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:])  # (H, 2, hd/2, ...)
    return grouped.transpose(1, 2).reshape(rows.shape)


def qk_heads(gguf_name: str, hp: Hparams) -> int | None:
    """The head count to permute a tensor's rows by, or None when it is not permuted."""
    if not hp.permute_qk:
        return None
    if ".attn_q." in gguf_name:
        return hp.n_heads
    if ".attn_k." in gguf_name:
        return hp.n_kv_heads
    return None


def encode_tensor(name: str, data: Tensor, qtype: gguf.GGMLQuantizationType
                  ) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Turn one tensor into the bytes GGUF stores and their type, as llama.cpp's converter does:
    float16/float32 kept, any other dtype through float32; norms and 1-D tensors F32."""
    if data.dtype not in (torch.float16, torch.float32):
        data = data.to(torch.float32)
    array = data.detach().cpu().contiguous().numpy()
    if array.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        logger.info("%s: rows of %d values do not fit %s blocks; written as F16", name, array.shape[-1],
                    qtype.name)
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def add_architecture_kv(writer: gguf.GGUFWriter, hp: Hparams, file_type: gguf.LlamaFileType) -> None:
    """The `<arch>.*` keys llama.cpp needs to build the model, in the converter's order."""
    writer.add_block_count(hp.n_layers)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    if hp.head_dim_explicit:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_file_type(file_type)
    if hp.arch == "llama":
        writer.add_vocab_size(hp.vocab_size)
        writer.add_rope_dimension_count(hp.head_dim)


def model_tensors(state: dict[str, Tensor], hp: Hparams) -> Iterator[tuple[str, Tensor]]:
    """Yield (GGUF name, tensor) for a Transformers state dict, q/k rows permuted for llama.cpp.

    Raises:
        ConfigError: a weight with no GGUF name (the architecture has something we cannot write).
    """
    if any(".lora_A." in k or ".base_layer." in k for k in state):
        raise ConfigError("the model still holds LoRA layers: merge them first (merge_and_unload())")
    unknown = []
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and hp.tie_word_embeddings:
            continue  # tied: llama.cpp reads the output head from token_embd
        name = gguf_tensor_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        heads = qk_heads(name, hp)
        yield name, (rope_row_order(tensor, heads) if heads else tensor)
    if unknown:
        raise ConfigError(f"weights with no GGUF tensor name: {unknown[:5]}; GGUF export supports plain "
                          f"{', '.join(sorted(ARCHITECTURES))} models")


@contextlib.contextmanager
def atomic_gguf_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds.

    Raises:
        ConfigError: `path` is a directory, or its folder cannot be made or written to.
    """
    target = os.path.abspath(os.fspath(path))
    if os.path.isdir(target):
        raise ConfigError(f"cannot write {os.fspath(path)}: it is a directory; give a file path (e.g. "
                          f"{os.path.join(os.fspath(path), 'model.gguf')})")
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
    except OSError as err:  # a file where a folder should be, no permission, read-only disk
        raise ConfigError(f"cannot write {os.fspath(path)}: its folder {os.path.dirname(target)} cannot be "
                          f"made or written to ({err.strerror or err})") from None
    os.close(fd)
    os.chmod(tmp, file_mode())  # mkstemp makes 0600; the file should look like open()'s
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_tensors_and_close(writer: gguf.GGUFWriter, path: str) -> None:
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_model(model: nn.Module, tokenizer, path: str | os.PathLike, outtype: str = "f16", *,
                     name: str | None = None, vocab_from: str | os.PathLike | None = None) -> str:
    """Write a Transformers causal LM (merged, no LoRA layers) and its tokenizer as one GGUF file.

    `vocab_from`: a GGUF file whose `tokenizer.*` keys are copied as they are (a base that was
    loaded from GGUF keeps llama.cpp's exact vocabulary); otherwise they are built from `tokenizer`.
    Returns the path written.

    Raises:
        ConfigError: unsupported architecture or tokenizer, unknown outtype.
    """
    file_type, qtype = parse_outtype(outtype)
    hp = hparams_of(getattr(model, "config", None), source="model config")  # None: not a Transformers model
    path = os.fspath(path)
    writer = gguf.GGUFWriter(None, hp.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(model.config, "_name_or_path", None) or hp.model_type)
    add_architecture_kv(writer, hp, file_type)
    add_vocab(writer, tokenizer, hp.vocab_size, vocab_from=vocab_from)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, tensor in model_tensors(model.state_dict(), hp):
        data, tensor_type = encode_tensor(tensor_name, tensor, qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=tensor_type)
    with atomic_gguf_path(path) as tmp:
        write_tensors_and_close(writer, tmp)
    return path
