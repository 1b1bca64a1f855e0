"""Will vLLM, LoRAX or llama.cpp serve this adapter? Their acceptance rules, applied to an `AdapterSummary`.

A `Verdict` lists `reasons` (the server refuses the adapter, or would load it and compute
something else) and `notes` (it loads, but needs a setting or runs slower). The rules follow the
servers' own checks:
  vLLM  (vllm/lora/peft_helper.py `PEFTHelper.validate_legal`, vllm/config/lora.py): rank, including
        every rank_pattern value, <= --max-lora-rank, whose allowed values are VLLM_MAX_LORA_RANKS
        (default 16; any rank up to it works, e.g. r=24 with --max-lora-rank 32); no DoRA; bias
        "none"; modules_to_save only a classifier head; init_lora_weights that rewrite the base
        (PiSSA, OLoRA) refused; LoRA on embed_tokens/lm_head only for the few models that declare
        it; targets must be linear layers the model's vLLM implementation knows.
  LoRAX (server/lorax_server/adapters/lora.py): reads only r, lora_alpha, use_rslora and the
        lora_A/lora_B tensors, so everything else in the file is ignored (DoRA magnitudes,
        modules_to_save, biases, rank_pattern/alpha_pattern scaling), and a layer type adapted in
        only some layers is dropped entirely; ranks are padded, any rank loads.
  llama.cpp (src/llama-adapter.cpp, convert_lora_to_gguf.py; after `loratune export --format gguf`):
        reads lora_a/lora_b pairs and one `adapter.lora.alpha` per file, scaling each tensor by
        alpha / (its own rank); so rank_pattern works, alpha_pattern and rsLoRA with mixed ranks
        cannot be expressed (rsLoRA with one rank is written as alpha * sqrt(r)); no DoRA, biases,
        modules_to_save or embedding LoRA; only modules with a llama.cpp tensor (Llama family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loratune.tools.inspection import AdapterSummary

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Linear layer names vLLM's LoRA-capable model implementations expose (packed ones like qkv_proj
# are assembled from q_proj/k_proj/v_proj). GPT-2's Conv1D names are absent: vLLM has no LoRA for it.
VLLM_KNOWN_TARGETS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2", "out_proj", "Wqkv",
    "w1", "w2", "w3", "wqkv", "wo", "c_attn_qkv", "in_proj", "x_proj", "kv_a_proj_with_mqa", "kv_b_proj",
    "q_a_proj", "q_b_proj",
})
EMBEDDING_TARGETS = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"})
VLLM_MODULES_TO_SAVE = frozenset({"classifier", "score"})
VLLM_SUPPORTED_INITS = (True, False, "gaussian")
LORAX_KNOWN_TARGETS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj", "c_fc", "fc1", "fc2",
    "Wqkv", "out_proj", "qkv_proj", "gate_up_proj",
})


@dataclass(frozen=True)
class Verdict:
    """Whether one server accepts the adapter; `reasons` say why not, `notes` what to set."""

    server: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "reasons": list(self.reasons), "notes": list(self.notes)}


def vllm_max_lora_rank_for(rank: int) -> int | None:
    """The smallest allowed --max-lora-rank that fits `rank`, or None when none does."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def check_vllm(s: AdapterSummary) -> Verdict:
    """Apply vLLM's adapter checks (see the module docstring); a broken adapter (`s.problems`) is refused."""
    c, reasons, notes = s.config, list(s.problems), []
    rank = max([s.max_rank, c.r, *c.rank_pattern.values()])
    needed = vllm_max_lora_rank_for(rank)
    if needed is None:
        reasons.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
                       f"allowed values: {', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
    elif needed > VLLM_DEFAULT_MAX_LORA_RANK:
        notes.append(f"rank {rank} needs --max-lora-rank {needed} (default {VLLM_DEFAULT_MAX_LORA_RANK})")
    if c.use_dora or s.dora_modules:
        reasons.append("DoRA (use_dora) is not supported by vLLM")
    if c.bias != "none":
        reasons.append(f"bias={c.bias!r}: vLLM supports only bias='none' (adapter biases are not supported)")
    unsupported_save = [m for m in (c.modules_to_save or []) if m not in VLLM_MODULES_TO_SAVE]
    if unsupported_save:
        reasons.append(f"modules_to_save {unsupported_save}: vLLM accepts only None or a classifier head "
                       f"({', '.join(sorted(VLLM_MODULES_TO_SAVE))})")
    if c.init_lora_weights not in VLLM_SUPPORTED_INITS:
        reasons.append(f"init_lora_weights={c.init_lora_weights!r} rewrites the base weights; "
                       "vLLM refuses it (serve a base with those weights and set init_lora_weights to true)")
    embeddings = sorted({m.name for m in s.modules if m.embedding or m.name in EMBEDDING_TARGETS})
    if embeddings:
        reasons.append(f"LoRA on embedding/output layers {embeddings}: vLLM accepts it only for the few "
                       "models that declare these modules, and most do not")
    unknown = sorted({m.name for m in s.modules} - VLLM_KNOWN_TARGETS - EMBEDDING_TARGETS)
    if unknown:
        reasons.append(f"target modules {unknown} are not linear layers vLLM's LoRA models adapt "
                       f"(it adapts e.g. {', '.join(sorted(VLLM_KNOWN_TARGETS)[:8])}, ...)")
    return Verdict("vLLM", reasons, notes)


def check_lorax(s: AdapterSummary) -> Verdict:
    """Apply LoRAX's adapter loading rules (see the module docstring); a broken adapter is refused."""
    c, reasons, notes = s.config, list(s.problems), []
    if c.use_dora or s.dora_modules:
        reasons.append("DoRA: LoRAX loads only lora_A/lora_B, so the magnitude vectors would be ignored")
    if c.modules_to_save:
        reasons.append(f"modules_to_save {c.modules_to_save}: LoRAX ignores fully trained modules")
    if c.bias != "none":
        reasons.append(f"bias={c.bias!r}: LoRAX ignores adapter biases")
    if c.rank_pattern or c.alpha_pattern:
        reasons.append("rank_pattern/alpha_pattern: LoRAX scales every module by lora_alpha / r from the "
                       "top-level config, so per-module scaling would be wrong")
    if c.init_lora_weights not in VLLM_SUPPORTED_INITS:
        reasons.append(f"init_lora_weights={c.init_lora_weights!r} rewrites the base weights, which LoRAX "
                       "does not do")
    embeddings = sorted({m.name for m in s.modules if m.embedding})
    if embeddings:
        reasons.append(f"LoRA on embedding layers {embeddings} is not supported by LoRAX")
    unknown = sorted({m.name for m in s.modules} - LORAX_KNOWN_TARGETS - set(embeddings))
    if unknown:
        reasons.append(f"target modules {unknown} are not layers LoRAX adapts "
                       f"(it adapts e.g. {', '.join(sorted(LORAX_KNOWN_TARGETS)[:8])}, ...)")
    if c.layers_to_transform is not None:
        reasons.append(f"layers_to_transform={c.layers_to_transform}: LoRAX drops a layer type unless every "
                       "layer of the model has it")
    if s.max_rank < 8:
        notes.append(f"rank {s.max_rank} < 8 runs without LoRAX's SGMV kernels (slower)")
    return Verdict("LoRAX", reasons, notes)


def check_llama_cpp(s: AdapterSummary) -> Verdict:
    """Apply llama.cpp's LoRA adapter rules (see the module docstring); a broken adapter is refused."""
    from loratune.tools.gguf import gguf_tensor_name

    c, reasons, notes = s.config, list(s.problems), []
    if c.use_dora or s.dora_modules:
        reasons.append("DoRA (use_dora): llama.cpp adapters hold only lora_a/lora_b, the magnitude "
                       "vectors would be lost (merge instead: loratune merge --format gguf)")
    if c.modules_to_save:
        reasons.append(f"modules_to_save {c.modules_to_save}: llama.cpp adapters cannot replace whole "
                       "modules (merge instead: loratune merge --format gguf)")
    if c.bias != "none":
        reasons.append(f"bias={c.bias!r}: llama.cpp adapters carry no biases")
    alphas = sorted({float(a) for a in c.alpha_pattern.values()} - {float(c.lora_alpha)})
    if alphas:
        reasons.append(f"alpha_pattern {dict(c.alpha_pattern)}: a llama.cpp adapter has one "
                       "adapter.lora.alpha for every module")
    if float(c.lora_alpha) == 0:
        reasons.append("lora_alpha 0: the adapter changes nothing (scaling 0), but llama.cpp reads an "
                       "adapter.lora.alpha of 0 as 'no alpha' and applies the adapter at full strength")
    ranks = sorted({m.r for m in s.modules}) or [c.r]
    if c.use_rslora and len(ranks) > 1:
        reasons.append(f"rsLoRA with ranks {ranks} (rank_pattern): llama.cpp scales by alpha / r, so one "
                       "alpha can stand for lora_alpha / sqrt(r) only when every module has the same rank")
    elif c.use_rslora:
        alpha = rslora_alpha(c.lora_alpha, ranks[0])
        notes.append(f"rsLoRA: written with adapter.lora.alpha = lora_alpha * sqrt(r) = {alpha:g}, "
                     "so llama.cpp's alpha / r is lora_alpha / sqrt(r)")
    if c.init_lora_weights not in VLLM_SUPPORTED_INITS:
        reasons.append(f"init_lora_weights={c.init_lora_weights!r} rewrites the base weights; a llama.cpp "
                       "adapter applies to the original base (merge instead)")
    embeddings = sorted({m.name for m in s.modules if m.embedding})
    if embeddings:
        reasons.append(f"LoRA on embedding layers {embeddings} is not exported to llama.cpp")
    unknown = sorted({m.path for m in s.modules if not m.embedding
                      and gguf_tensor_name(m.path + ".weight") is None})
    if unknown:
        reasons.append(f"modules {unknown[:4]}{' ...' if len(unknown) > 4 else ''} have no llama.cpp tensor "
                       "(GGUF export covers Llama, Mistral and Qwen2 attention and MLP projections)")
    return Verdict("llama.cpp", reasons, notes)


def rslora_alpha(lora_alpha: float, r: int) -> float:
    """The alpha llama.cpp needs for rsLoRA: its alpha / r must equal lora_alpha / sqrt(r)."""
    return float(lora_alpha) * math.sqrt(r)


def check_all(s: AdapterSummary) -> list[Verdict]:
    return [check_vllm(s), check_lorax(s), check_llama_cpp(s)]
