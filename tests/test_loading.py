"""Tests for loratune.tools.loading: presets, local directories, dtype choice, error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from factories import tiny_model
from loratune.dtypes import bf16_supported
from loratune.errors import ConfigError
from loratune.tools import loading
from loratune.tools.loading import (
    DEFAULT_MODEL,
    PRESETS_DIR,
    list_presets,
    load_base_model,
    load_tokenizer,
    save_preset_as_hf_dir,
)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def preset_fp32():
    return load_base_model(DEFAULT_MODEL, dtype="float32")


def test_default_preset_is_listed_and_small():
    assert DEFAULT_MODEL in list_presets()
    shipped = sum(p.stat().st_size for p in PRESETS_DIR.rglob("*") if p.is_file())
    assert shipped < 1_000_000


def test_preset_weights_are_deterministic_and_leave_global_rng_alone(preset_fp32):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = load_base_model(DEFAULT_MODEL, dtype="float32")
    assert torch.equal(torch.rand(3), expected_next)
    assert _same_weights(preset_fp32, again)


def test_preset_is_llama_with_large_init_and_named_by_preset(preset_fp32):
    cfg = preset_fp32.config
    assert cfg.model_type == "llama" and cfg.initializer_range == pytest.approx(0.2)
    assert cfg.name_or_path == DEFAULT_MODEL
    # the large init shows in the weights: std of a projection is ~0.2, not ~0.02
    std = preset_fp32.model.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.15 < std < 0.25


def test_base_model_is_frozen_and_in_eval_mode(preset_fp32):
    assert not any(p.requires_grad for p in preset_fp32.parameters())
    assert not preset_fp32.training


def test_bf16_preset_is_the_fp32_preset_cast(preset_fp32):
    bf16 = load_base_model(DEFAULT_MODEL, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(preset_fp32.state_dict().items(), bf16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_preset_tokenizer_has_special_tokens_and_chat_template():
    tok = load_tokenizer(DEFAULT_MODEL)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "<|im_end|>")
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # adds BOS like Llama
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]) == "What is 2 + 3?"
    assert len(tok) <= AutoConfig.from_pretrained(PRESETS_DIR / "tiny-llama").vocab_size


def test_local_dir_written_from_preset_loads_back(tmp_path, preset_fp32):
    out = save_preset_as_hf_dir(DEFAULT_MODEL, tmp_path / "tiny")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert _same_weights(load_base_model(out, dtype="float32"), preset_fp32)
    tok = load_tokenizer(out)
    assert tok.chat_template == load_tokenizer(DEFAULT_MODEL).chat_template


def test_preset_dir_takes_the_bare_preset_name_and_refuses_unknown_ones(tmp_path, preset_fp32):
    out = save_preset_as_hf_dir(DEFAULT_MODEL.removeprefix("preset:"), tmp_path / "tiny")
    assert _same_weights(load_base_model(out, dtype="float32"), preset_fp32)
    with pytest.raises(ConfigError, match="unknown preset .preset:tiny-lama.; available presets: "):
        save_preset_as_hf_dir("tiny-lama", tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_local_dir_from_factory_model_and_missing_pad_token(tmp_path):
    model = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path)
    tok = load_tokenizer(DEFAULT_MODEL)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg.get("pad_token") is None
    loaded = load_base_model(tmp_path, dtype="float32", device="cpu")
    assert _same_weights(loaded, model)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert load_tokenizer(tmp_path).pad_token == "<|im_end|>"  # falls back to EOS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("preset:nope",
         "unknown preset 'preset:nope'; available presets: preset:smollm2-135m-instruct, preset:tiny-llama"),
        ("./no/such/dir", "is not a local directory, a hub id"),
        ("a/b/c", "is not a local directory, a hub id"),
    ],
)
def test_bad_model_names_raise_config_error(name, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_base_model(name)
    with pytest.raises(ConfigError):
        load_tokenizer(name)


def test_file_and_empty_dir_are_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        load_base_model(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_base_model(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_weights_name_the_file(tmp_path, damage):
    tiny_model("llama", seed=3).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as fh:
            fh.truncate(5000)
    else:
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=f"cannot read the weights in {weights} .*truncated or corrupt"):
        load_base_model(tmp_path, dtype="float32")


def test_truncated_pytorch_bin_weights_name_the_file(tmp_path):
    model = tiny_model("llama", seed=3)
    model.config.save_pretrained(tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    with open(weights, "r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(ConfigError, match=f"cannot read the weights in {weights} "):
        load_base_model(tmp_path, dtype="float32")


def test_hub_id_offline_is_a_config_error():
    # conftest sets HF_HUB_OFFLINE=1: nothing is downloaded, the message says why
    with pytest.raises(ConfigError, match=r"cannot load 'loratune-tests/not-cached' from the Hugging Face "
                                          r"hub \(there is no local"):
        load_tokenizer("loratune-tests/not-cached")


def test_quantized_loading_needs_one_mode():
    with pytest.raises(ConfigError, match="pick one"):
        load_base_model(DEFAULT_MODEL, load_in_4bit=True, load_in_8bit=True)


def test_quantized_loading_calls_quantize_model(monkeypatch):
    calls = []

    def fake_quantize_model(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(loading, "quantize_model", fake_quantize_model)
    load_base_model(DEFAULT_MODEL, load_in_8bit=True)
    load_base_model(DEFAULT_MODEL, load_in_4bit=True, bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype="float16", quant_backend="torch")
    auto = torch.bfloat16 if bf16_supported("cpu") else torch.float32  # the compute dtype follows the CPU
    assert calls == [
        {"bits": 8, "quant_type": "nf4", "compute_dtype": auto, "double_quant": False, "backend": "auto",
         "int8_compute": False, "smooth": None, "codes": None},
        {"bits": 4, "quant_type": "nf4", "compute_dtype": torch.float16, "double_quant": True,
         "backend": "torch", "int8_compute": False, "smooth": None, "codes": None},
    ]


def test_bf16_by_name_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog):
    from loratune import dtypes

    monkeypatch.setattr(dtypes, "_cpu_has_bf16", lambda: False)
    dtypes._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="loratune.dtypes"):
        assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16
        assert dtypes.resolve_dtype("auto") == torch.float32
        dtypes.resolve_dtype(torch.bfloat16)
    assert [r.message for r in caplog.records if "emulates" in r.message] == [caplog.records[0].message]


def test_fp16_on_a_cpu_without_native_fp16_warns_once(monkeypatch, caplog):
    from loratune import dtypes

    monkeypatch.setattr(dtypes, "_cpu_has_fp16", lambda: False)
    dtypes._warn_emulated_fp16.cache_clear()
    with caplog.at_level("WARNING", logger="loratune.dtypes"):
        assert dtypes.resolve_dtype("float16") == torch.float16
        dtypes.resolve_dtype(torch.float16)
        assert dtypes.resolve_dtype("float16", "cuda") == torch.float16  # CUDA: no CPU warning
    assert [r.message for r in caplog.records if "no native fp16" in r.message] == [caplog.records[0].message]
    monkeypatch.setattr(dtypes, "_cpu_has_fp16", lambda: True)
    dtypes._warn_emulated_fp16.cache_clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="loratune.dtypes"):
        dtypes.resolve_dtype("float16")
    assert "no native fp16" not in caplog.text


@pytest.mark.parametrize(("cap", "native"), [("AVX2", False), ("avx512_core", False),
                                             ("AVX512_CORE_BF16", None), (None, None)])
def test_an_instruction_set_cap_below_avx512_bf16_makes_bf16_emulated(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA below AVX512-BF16 sends torch's bf16 matmuls down the emulated path."""
    from pathlib import Path

    from loratune import dtypes

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_flags = "avx512_bf16" in flags or "amx_bf16" in flags
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    dtypes._cpu_has_bf16.cache_clear()
    try:
        assert dtypes._cpu_has_bf16() is (has_flags if native is None else native)
    finally:
        dtypes._cpu_has_bf16.cache_clear()


def _lora_losses(base, steps: int) -> list[float]:
    """Train LoRA r=8 on all linear layers over the example data; return the loss of every step."""
    from pathlib import Path

    from loratune import LoraConfig, get_peft_model
    from loratune.data import DataConfig, build_datasets, collate, plan_batches

    tok = load_tokenizer(DEFAULT_MODEL)
    train_file = Path(__file__).resolve().parents[1] / "examples" / "data" / "train.jsonl"
    data = build_datasets(DataConfig(train_file=str(train_file), packing=False), tok).train
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for indices in plan_batches([len(ex["input_ids"]) for ex in data], 8, 0, 0)[:steps]:
        batch = collate([data[i] for i in indices], packing=False, pad_token_id=tok.pad_token_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_preset_init_lets_lora_move_the_loss():
    steps = 40
    preset = _lora_losses(load_base_model(DEFAULT_MODEL, dtype="float32"), steps)
    cfg = AutoConfig.from_pretrained(PRESETS_DIR / "tiny-llama")
    cfg.initializer_range = 0.02
    torch.manual_seed(0)
    usual = _lora_losses(AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False), steps)
    first, last = sum(preset[:5]) / 5, sum(preset[-5:]) / 5
    assert last < 0.5 * first
    assert last < sum(usual[-5:]) / 5


# Hostile model directories: every case is a ConfigError (or InsufficientMemoryError) naming the file
# and the field or tensor at fault, raised before a model of the claimed size is built.

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """A tiny model of each architecture plus the preset tokenizer, saved once; each case copies one."""
    root = tmp_path_factory.mktemp("bases")
    tok = load_tokenizer(DEFAULT_MODEL)
    for arch in ("llama", "gpt2", "qwen2"):
        tiny_model(arch, seed=1).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    return root


def _copy(saved_dirs, tmp_path, arch="llama"):
    import shutil

    return Path(shutil.copytree(saved_dirs / arch, tmp_path / arch))


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, damage):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    damage(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("arch, raw, fields, needle", [
    ("llama", "{not json", None, "config.json is not a readable JSON file"),
    ("llama", "[1, 2]", None, r"config.json holds a JSON list; expected an object"),
    ("llama", None, {"model_type": None}, "config.json: model_type None is not a model type"),
    ("llama", None, {"model_type": "nosuch"}, "config.json: model_type 'nosuch' is not a model type"),
    ("llama", None, {"hidden_size": 0}, "config.json: hidden_size: 0 is not a positive integer"),
    ("llama", None, {"hidden_size": -32}, "config.json: hidden_size: -32 is not a positive integer"),
    ("llama", None, {"hidden_size": "32"}, "config.json: hidden_size: '32' is not a positive integer"),
    ("llama", None, {"num_attention_heads": 0}, "config.json: num_attention_heads: 0 is not a positive"),
    ("llama", None, {"num_hidden_layers": 0}, "config.json: num_hidden_layers: 0 is not a positive"),
    ("llama", None, {"num_attention_heads": 5}, "config.json: .*validate_architecture"),
    ("gpt2", None, {"n_layer": -2}, "config.json: n_layer: -2 is not a positive integer"),
])
def test_a_hostile_config_json_is_refused_naming_file_and_field(saved_dirs, tmp_path, arch, raw, fields,
                                                                needle):
    path = _copy(saved_dirs, tmp_path, arch)
    if raw is not None:
        (path / "config.json").write_text(raw)
    else:
        _edit_config(path, **fields)
    with pytest.raises(ConfigError, match=f"{path}/{needle}"):
        load_base_model(path, dtype="float32")


@pytest.mark.parametrize("arch, fields", [
    ("llama", {"hidden_size": 10**12}), ("llama", {"vocab_size": 10**12}),
    ("llama", {"num_hidden_layers": 10**9}), ("gpt2", {"n_embd": 10**12}), ("qwen2", {"hidden_size": 10**12}),
])
def test_a_config_too_large_for_memory_is_refused_before_building_the_model(saved_dirs, tmp_path, monkeypatch,
                                                                            arch, fields):
    from loratune.errors import InsufficientMemoryError

    path = _copy(saved_dirs, tmp_path, arch)
    _edit_config(path, **fields)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(InsufficientMemoryError, match=f"the model {path}/config.json describes .* available"):
        load_base_model(path, dtype="float32")


@pytest.mark.parametrize("arch, damage, fields, needle", [
    ("llama", lambda t: t.pop(Q0), None, f"1 tensor the model has but the checkpoint lacks .*: {Q0}"),
    ("gpt2", lambda t: t.pop("transformer.h.0.attn.c_attn.weight"), None,
     "the checkpoint lacks .*: transformer.h.0.attn.c_attn.weight"),
    ("qwen2", lambda t: t.pop("model.norm.weight"), None, "the checkpoint lacks .*: model.norm.weight"),
    ("llama", lambda t: t.update({Q0: torch.zeros(7, 3)}), None,
     rf"{Q0} is \(7, 3\) in the checkpoint, \(32, 32\) in the model"),
    ("llama", lambda t: t.update({"model.layers.9.bogus.weight": torch.zeros(2)}), None,
     "the checkpoint has but the model lacks .*: model.layers.9.bogus.weight"),
    ("llama", None, {"num_hidden_layers": 1}, "9 tensors the checkpoint has but the model lacks"),
    ("llama", None, {"vocab_size": 16},
     r"model.embed_tokens.weight is \(128, 32\) in the checkpoint, \(16, 32\)"),
    ("llama", lambda t: t.update({Q0: t[Q0].to(torch.int32)}), None, f"'{Q0}' is I32; expected a float"),
    ("llama", lambda t: t.update({Q0: t[Q0] > 0}), None, f"tensor '{Q0}' is BOOL; expected a float"),
])
def test_checkpoint_tensors_that_do_not_fit_the_model_are_named(saved_dirs, tmp_path, arch, damage, fields,
                                                                needle):
    path = _copy(saved_dirs, tmp_path, arch)
    if damage is not None:
        _edit_tensors(path, damage)
    if fields is not None:
        _edit_config(path, **fields)
    with pytest.raises(ConfigError, match=needle) as info:
        load_base_model(path, dtype="float32")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("extra", ["v_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"])
def test_an_unused_tensor_outside_the_blocks_loads_with_a_warning(saved_dirs, tmp_path, caplog, extra):
    path = _copy(saved_dirs, tmp_path)
    _edit_tensors(path, lambda t: t.update({extra: torch.zeros(4)}))
    with caplog.at_level("WARNING"):
        load_base_model(path, dtype="float32")
    assert ("left out" in caplog.text) == (extra == "v_head.weight"), caplog.text


def test_half_precision_weights_still_load_cast_to_the_asked_dtype(saved_dirs, tmp_path):
    path = _copy(saved_dirs, tmp_path)
    _edit_tensors(path, lambda t: t.update({Q0: t[Q0].half()}))
    loaded = load_base_model(path, dtype="float32")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def _shard(path, index_of):
    """Split model.safetensors into two shards and write the index `index_of(weight_map)` returns."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = index_of(weight_map)
    (path / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


@pytest.mark.parametrize("index_of, needle", [
    (lambda wm: {"metadata": {}, "weight_map": {**wm, Q0: "ghost.safetensors"}},
     "'weight_map' names shard files that are not files in .*: ghost.safetensors"),
    (lambda wm: "{oops", "is not a readable JSON file"),
    (lambda wm: [1], "holds a JSON list"),
    (lambda wm: {"metadata": {}}, "'weight_map' must map each tensor name"),
    (lambda wm: {"metadata": {}, "weight_map": {**wm, Q0: 3}}, "'weight_map' must map each tensor name"),
    (lambda wm: {"weight_map": wm}, "'metadata' is None; expected an object"),
])
def test_a_checkpoint_index_that_cannot_be_followed_is_named(saved_dirs, tmp_path, index_of, needle):
    path = _copy(saved_dirs, tmp_path)
    _shard(path, index_of)
    with pytest.raises(ConfigError, match=f"{path}/model.safetensors.index.json.*{needle}"):
        load_base_model(path, dtype="float32")


def test_a_sharded_checkpoint_loads_and_a_missing_shard_is_named(saved_dirs, tmp_path):
    path = _copy(saved_dirs, tmp_path)
    _shard(path, lambda wm: {"metadata": {}, "weight_map": wm})
    assert _same_weights(load_base_model(path, dtype="float32"), load_base_model(saved_dirs / "llama",
                                                                                  dtype="float32"))
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="not files in .*: model-00002-of-00002.safetensors"):
        load_base_model(path, dtype="float32")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_directory_where_a_file_belongs_is_named(saved_dirs, tmp_path, name):
    path = _copy(saved_dirs, tmp_path)
    (path / name).unlink()
    (path / name).mkdir()
    with pytest.raises(ConfigError, match=f"{path / name} is a directory"):
        load_base_model(path, dtype="float32")


TOKENIZER_SAVED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@pytest.mark.parametrize("file, text, needle", [
    (None, None, "has no tokenizer files"),
    ("tokenizer.json", "{broken", "tokenizer.json is not a readable JSON file"),
    ("tokenizer.json", "[]", "tokenizer.json holds a JSON list"),
    ("tokenizer_config.json", "[]", "tokenizer_config.json holds a JSON list"),
    ("tokenizer.json", "{}", r"cannot load a tokenizer from .* \(files tokenizer.json.*KeyError: 'added_"),
    ("tokenizer_config.json", json.dumps({"eos_token": 5}), r"\(files tokenizer.json.*eos_token has to be"),
])
def test_hostile_tokenizer_files_are_named(saved_dirs, tmp_path, file, text, needle):
    path = _copy(saved_dirs, tmp_path)
    if file is None:
        for name in TOKENIZER_SAVED:
            (path / name).unlink(missing_ok=True)
        load_base_model(path, dtype="float32")  # the model itself needs no tokenizer
    else:
        (path / file).write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name, needle", [("", "the model name is empty"), ("  ", "the model name is empty"),
                                          ("~no-such-user-x/model", "no such user's home directory")])
def test_odd_model_names_are_config_errors(name, needle):
    with pytest.raises(ConfigError, match=needle):
        load_base_model(name)
    with pytest.raises(ConfigError, match=needle):
        load_tokenizer(name)


def test_the_trainer_names_a_checkpoint_tensor_that_is_missing(saved_dirs, tmp_path):
    from loratune.train import run

    path = _copy(saved_dirs, tmp_path)
    _edit_tensors(path, lambda t: t.pop(Q0))
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    needle = f"{path}/model.safetensors: 1 tensor the model has but the checkpoint lacks .*{Q0}"
    with pytest.raises(ConfigError, match=needle):
        run(model_name_or_path=str(path), train_file=str(data), output_dir=str(tmp_path / "out"), max_steps=1,
            save_steps=0, disable_tqdm=True, num_threads=1)
    assert not (tmp_path / "out").exists()
