"""Hostile adapter files and configs against the library: every case raises a LoratuneError naming
what is wrong, before anything large is allocated, and leaves the user's model as it came.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import tiny_config, tiny_model
from loratune import LoraConfig, PeftModel, get_peft_model, module_patterns
from loratune.adapter_io import read_adapter
from loratune.errors import AdapterError, ConfigError, LoratuneError, TargetNotFoundError

Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid adapter (r=4, q_proj) saved once; each case copies it."""
    out = tmp_path_factory.mktemp("adapter") / "a"
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.save_pretrained(str(out))
    return out


@pytest.fixture
def fast_budget(monkeypatch):
    monkeypatch.setattr(module_patterns, "MATCH_BUDGET_S", 0.0001)  # far below any machine's time
    module_patterns._too_slow.clear()


def copy_with(saved, tmp_path, *, config: dict | None = None, raw: bytes | None = None):
    out = tmp_path / "a"
    shutil.copytree(saved, out)
    if config is not None:
        base = json.loads((saved / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if raw is not None:
        (out / "adapter_config.json").write_bytes(raw)
    return out


def copy_with_tensors(saved, tmp_path, damage):
    """A copy of the saved adapter whose tensors `damage` (a dict -> None) has changed."""
    path = copy_with(saved, tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    damage(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def load_refused(path, needle: str, kind=LoratuneError):
    model = tiny_model()
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(kind) as err:
        PeftModel.from_pretrained(model, str(path))
    assert needle in str(err.value), str(err.value)[:500]
    assert len(str(err.value)) < 4000
    assert {n for n, _ in model.named_modules()} == before  # nothing injected
    return err.value


RAW_CONFIGS = {
    "invalid_utf8": (b'{"r": 4, "peft_type": "LORA", "x": "\xff\xfe"}', "is not UTF-8 text (byte 0xff"),
    "latin1": ('{"r": 4, "base_model_name_or_path": "caf\xe9"}'.encode("latin-1"), "is not UTF-8 text"),
    "utf16": ('{"r": 4}'.encode("utf-16"), "is not UTF-8 text"),
    "overlong_utf8": (b'{"r": 4, "x": "\xc0\xaf"}', "is not UTF-8 text"),
    "deep_lists": (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels deep"),
    "deep_objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nests 100000 levels deep"),
    "deep_in_a_field": (b'{"r": 4, "auto_mapping": ' + b"[" * 65 + b"]" * 65 + b"}", "nests 66 levels"),
    "huge": (b'{"r": 4, "x": "' + b"a" * (1 << 20) + b'"}', "is over 1,048,576 bytes"),
    "truncated": (b'{"r": 4, "lora_alpha"', "invalid JSON"),
    "trailing_comma": (b'{"r": 4,}', "invalid JSON"),
    "empty": (b"", "invalid JSON"),
    "list": (b"[1, 2]", "expected a JSON object, got list"),
    "string": (b'"LORA"', "expected a JSON object, got str"),
    "null": (b"null", "expected a JSON object, got NoneType"),
    "huge_int": (b'{"r": ' + b"9" * 5000 + b"}", "cannot be parsed"),
}


@pytest.mark.parametrize("name", sorted(RAW_CONFIGS))
def test_a_hostile_adapter_config_file_is_an_adapter_error(name, saved, tmp_path):
    raw, needle = RAW_CONFIGS[name]
    path = copy_with(saved, tmp_path, raw=raw)
    load_refused(path, needle, AdapterError)


FIELDS = {
    "r_1e9": ({"r": 1_000_000_000},
              "expected (1000000000, 32) (adapter_config.json gives this layer r=1000000000)"),
    "r_too_small": ({"r": 2}, "expected (2, 32)"),
    "r_float": ({"r": 1e9}, "r must be a positive integer, got 1000000000.0"),
    "r_zero": ({"r": 0}, "r must be a positive integer, got 0"),
    "r_negative": ({"r": -4}, "r must be a positive integer, got -4"),
    "r_string": ({"r": "4"}, "r must be a positive integer, got '4'"),
    "r_bool": ({"r": True}, "r must be a positive integer, got True"),
    "r_bigint": ({"r": 10**40}, "gives this layer r=10000000000000000000000000000000000000000"),
    "rank_pattern_1e9": ({"rank_pattern": {"q_proj": 10**9}}, "gives this layer r=1000000000"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
    "alpha_inf": ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number, got inf"),
    "alpha_neg_inf": ({"lora_alpha": float("-inf")}, "lora_alpha must be a finite number, got -inf"),
    "alpha_1e308": ({"lora_alpha": 1e308}, "overflows float32"),
    "alpha_1e40": ({"lora_alpha": 1e40}, "overflows float32"),
    "alpha_bigint": ({"lora_alpha": 10**400}, "lora_alpha must be a finite number"),
    "alpha_string": ({"lora_alpha": "8"}, "lora_alpha must be a number, got '8'"),
    "alpha_pattern_inf": ({"alpha_pattern": {"q_proj": float("inf")}}, "must be a finite number"),
    "alpha_pattern_1e308": ({"alpha_pattern": {"q_proj": 1e308}}, "overflows float32"),
    "alpha_pattern_key_long": ({"alpha_pattern": {"q" * 2000: 8}}, "at most 1000 are accepted"),
    "rslora_1e308": ({"lora_alpha": 1e308, "use_rslora": True}, "overflows float32"),
    "targets_nothing": ({"target_modules": ["foo_proj"]},
                        "no module matches target_modules entry 'foo_proj'"),
    "targets_regex_nothing": ({"target_modules": ".*foo"}, "no module matches target_modules '.*foo'"),
    "targets_invalid_regex": ({"target_modules": "(q_proj"}, "is not a valid regular expression"),
    "targets_long_regex": ({"target_modules": ".*" * 600}, "a regex of 1200 characters"),
    "targets_counted_repeats": ({"target_modules": "((a{1000}){1000}){1000}"}, "repeats too much"),
    "targets_not_strings": ({"target_modules": [1, 2]}, "entries must be strings"),
    "targets_mapping": ({"target_modules": {"q_proj": 1}}, "must be a list of module names or a regex"),
    "exclude_bomb_counted": ({"exclude_modules": "(x{500}){500}"}, "repeats too much"),
    "layers_pattern_long": ({"layers_to_transform": [0], "layers_pattern": "l" * 1001}, "at most 1000"),
    "peft_type": ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    "init_loftq": ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    "dropout_nan": ({"lora_dropout": float("nan")}, "lora_dropout must be in [0, 1)"),
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_a_hostile_config_field_is_refused_by_name_before_allocating(name, saved, tmp_path):
    fields, needle = FIELDS[name]
    path = copy_with(saved, tmp_path, config=fields)
    t0 = time.monotonic()
    load_refused(path, needle)
    assert time.monotonic() - t0 < 30  # never the terabyte a rank of 1e9 would take


BOMBS = [r"(.|..)+\d", r"(.|..)*[0-9]", r"(\w|\w\w|.)+\d"]


@pytest.mark.parametrize("pattern", BOMBS)
def test_a_backtracking_target_regex_fails_fast(pattern, saved, tmp_path, fast_budget):
    path = copy_with(saved, tmp_path, config={"target_modules": pattern})
    t0 = time.monotonic()
    load_refused(path, "took over 0.0001s to match", ConfigError)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("pattern", BOMBS)
def test_a_backtracking_rank_pattern_key_fails_fast(pattern, saved, tmp_path, fast_budget):
    path = copy_with(saved, tmp_path, config={"rank_pattern": {pattern: 4}})
    load_refused(path, "took over 0.0001s to match", ConfigError)


def test_a_backtracking_regex_in_code_fails_fast_too(fast_budget):
    with pytest.raises(ConfigError, match="nested quantifiers"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=BOMBS[0]))


def test_ordinary_regexes_still_match_as_in_peft():
    config = LoraConfig(target_modules=r".*\.layers\.[01]\.self_attn\.(q|v)_proj")
    model = get_peft_model(tiny_model(), config)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 4


TENSORS = {
    "rank_mismatch_A": (lambda t: t.__setitem__(Q0A, torch.zeros(3, 32)),
                        "has shape (3, 32), expected (4, 32)"),
    "rank_mismatch_B": (lambda t: t.__setitem__(Q0A.replace("lora_A", "lora_B"), torch.zeros(32, 9)),
                        "has shape (32, 9), expected (32, 4)"),
    "nan": (lambda t: t[Q0A].__setitem__((0, 0), float("nan")), None),
    "bad_key": (lambda t: t.__setitem__("model.x.lora_A.weight", torch.zeros(4, 64)),
                "tensor keys must start with 'base_model.model.'"),
    "extra_layer": (lambda t: t.__setitem__(Q0A.replace("q_proj", "k_proj"), torch.zeros(4, 64)),
                    "unexpected"),
}


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_hostile_tensors_are_named(name, saved, tmp_path):
    damage, needle = TENSORS[name]
    path = copy_with_tensors(saved, tmp_path, damage)
    if needle is None:  # NaN weights load (PEFT does too); the serving path refuses them
        PeftModel.from_pretrained(tiny_model(), str(path))
        return
    load_refused(path, needle, AdapterError)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 64, b"\xff" * 8 + b"{}", b"PK\x03\x04 zip"])
def test_a_garbage_safetensors_file_is_named(garbage, saved, tmp_path):
    path = copy_with(saved, tmp_path)
    (path / "adapter_model.safetensors").write_bytes(garbage)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(str(path))


@pytest.mark.parametrize("where", ["missing", "a_file", "hub_like"])
def test_hostile_adapter_paths_are_named(where, tmp_path):
    path = {"missing": str(tmp_path / "nope"), "a_file": str(tmp_path / "f"),
            "hub_like": "../" * 50 + "etc/passwd"}[where]
    (tmp_path / "f").write_text("x")
    with pytest.raises(AdapterError):
        PeftModel.from_pretrained(tiny_model(), path)


def test_load_adapter_checks_ranks_before_injecting(saved, tmp_path):
    path = copy_with(saved, tmp_path, config={"r": 10**9})
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(AdapterError, match="gives this layer r=1000000000"):
        model.load_adapter(str(path), adapter_name="big")
    assert "big" not in model.peft_config


WRONG_TYPES = {  # field: (value, what the message says); PEFT writes true/false and strings here
    "use_rslora": ("false", "use_rslora must be true or false, got 'false'"),  # truthy: wrong scaling
    "use_dora": (1, "use_dora must be true or false, got 1"),
    "fan_in_fan_out": (None, "fan_in_fan_out must be true or false, got None"),
    "inference_mode": ("yes", "inference_mode must be true or false, got 'yes'"),
    "base_model_name_or_path": (5, "base_model_name_or_path must be a string or null, got 5"),
    "revision": (["main"], "revision must be a string or null, got ['main']"),
    "init_lora_weights": (1.0, "init_lora_weights must be one of"),  # 1.0 == True
}


@pytest.mark.parametrize("field", sorted(WRONG_TYPES))
def test_a_config_field_of_the_wrong_type_is_refused_naming_file_and_field(field, saved, tmp_path):
    value, needle = WRONG_TYPES[field]
    path = copy_with(saved, tmp_path, config={field: value})
    err = load_refused(path, needle, ConfigError)
    assert str(path / "adapter_config.json") in str(err)


def test_a_config_that_selects_no_module_names_the_adapter(saved, tmp_path):
    path = copy_with(saved, tmp_path, config={"target_modules": []})
    err = load_refused(path, "target_modules is an empty list", TargetNotFoundError)
    assert f"{path} (adapter_config.json)" in str(err)
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(TargetNotFoundError, match="adapter_config.json"):
        model.load_adapter(str(path), adapter_name="other")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_integer_or_bool_adapter_weights_are_refused_by_name(dtype, saved, tmp_path):
    path = copy_with_tensors(saved, tmp_path, lambda t: t.update({Q0A: t[Q0A].to(dtype)}))
    err = load_refused(path, f"{Q0A} ({str(dtype).removeprefix('torch.')})", AdapterError)
    assert str(path / "adapter_model.safetensors") in str(err)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float8_e4m3fn])
def test_other_float_adapter_weights_load_cast_as_in_peft(dtype, saved, tmp_path):
    path = copy_with_tensors(saved, tmp_path, lambda t: t.update({Q0A: t[Q0A].to(dtype)}))
    model = PeftModel.from_pretrained(tiny_model(), str(path))
    loaded = model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(loaded, load_file(str(path / "adapter_model.safetensors"))[Q0A].float())


def test_a_float8_adapter_with_a_nan_is_named_not_a_crash(saved, tmp_path):
    """torch has no isfinite for float8: the NaN check reads such tensors through float32."""
    from loratune.adapter_io import check_finite

    nan = torch.full((4, 32), float("nan"))
    path = copy_with_tensors(saved, tmp_path, lambda t: t.update({Q0A: nan.to(torch.float8_e4m3fn)}))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=re.escape(Q0A)):
        check_finite(tensors, source=str(path))


def test_a_bin_file_with_non_string_keys_is_an_adapter_error(saved, tmp_path):
    path = copy_with(saved, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    torch.save({1: torch.zeros(1)}, path / "adapter_model.bin")
    bin_file = path / "adapter_model.bin"
    load_refused(path, f"{bin_file}: expected a dict of tensors keyed by name", AdapterError)


@pytest.mark.parametrize("kwargs, needle", [
    ({"model_id": None}, "adapter path must be a string or path, got None"),
    ({"model_id": 5}, "adapter path must be a string or path, got 5"),
    ({"subfolder": 3}, "subfolder must be a string or path, got 3"),
    ({"config": {"r": 4}}, "config must be a loratune LoraConfig, got dict"),
    ({"model": "org/base"}, "expected the base model as a torch.nn.Module, got str"),
])
def test_wrong_argument_types_to_from_pretrained_are_config_errors(kwargs, needle, saved):
    args = {"model": tiny_model(), "model_id": str(saved), **kwargs}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        PeftModel.from_pretrained(**args)


@pytest.mark.parametrize("names", [None, 3, [["default"]]])
def test_set_adapter_with_a_non_name_is_a_config_error(names, saved):
    model = PeftModel.from_pretrained(tiny_model(), str(saved))
    with pytest.raises(ConfigError, match="adapter_name must be an adapter name or a list of them"):
        model.set_adapter(names)
    assert model.active_adapters == ["default"]


def test_one_adapter_name_as_a_string_merges_as_in_peft(saved):
    model = PeftModel.from_pretrained(tiny_model(), str(saved))
    model.merge_adapter("default")  # PEFT takes a str; it is not a list of letters
    assert model.model.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]


def test_saving_onto_a_file_is_refused_and_leaves_it_intact(saved, tmp_path):
    model = PeftModel.from_pretrained(tiny_model(), str(saved))
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    with pytest.raises(ConfigError, match=re.escape(f"{target}: it is a file, not a directory")):
        model.save_pretrained(str(target))
    with pytest.raises(ConfigError, match="is under .*notes.txt, which is a file"):
        model.save_pretrained(str(target / "sub"))
    with pytest.raises(ConfigError, match="save_directory must be a string or path, got None"):
        model.save_pretrained(None)
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"weights": [float("nan")]}, "weights must be a list of finite numbers, got [nan]"),
    ({"weights": ["1"]}, "weights must be a list of finite numbers, got ['1']"),
    ({"weights": [10**400]}, "weights must be a list of finite numbers"),
    ({"adapters": "default"}, "adapters must be a list of adapter names, got 'default'"),
    ({"svd_rank": -1}, "svd_rank must be a positive integer, got -1"),
    ({"svd_clamp": "x"}, "svd_clamp must be in (0, 1], got 'x'"),
    ({"svd_driver": "bogus"}, "svd_driver must be one of"),
    ({"svd_driver": "gesvd"}, "svd_driver='gesvd' needs the model on CUDA"),
])
def test_add_weighted_adapter_names_the_bad_argument_before_changing_anything(kwargs, needle, saved):
    model = PeftModel.from_pretrained(tiny_model(), str(saved))
    args = {"adapters": ["default"], "weights": [1.0], "adapter_name": "w", **kwargs}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        model.add_weighted_adapter(**args)
    assert list(model.peft_config) == ["default"]
    assert "w" not in model.model.model.layers[0].self_attn.q_proj.r


# ----- GGUF export --------------------------------------------------------------------------------

Q0B = Q0A.replace("lora_A", "lora_B")
GGUF_DAMAGE = {
    "lone_lora_A": (lambda t: t.pop(Q0B), "self_attn.q_proj: has no lora_B"),
    "lone_lora_B": (lambda t: t.pop(Q0A), "self_attn.q_proj: has no lora_A"),
    "stray_bias": (lambda t: t.__setitem__(Q0A.replace("lora_A.weight", "base_layer.bias"), torch.zeros(32)),
                   "q_proj.base_layer.bias: not a lora_A/lora_B weight"),
    "ranks_differ": (lambda t: t.__setitem__(Q0B, torch.zeros(32, 3)),
                     "lora_A (4, 32) and lora_B (32, 3) are not (R, in) and (out, R)"),
    "other_base": (lambda t: t.update({Q0A: torch.zeros(4, 48), Q0B: torch.zeros(48, 4)}),
                   "the adapter is for a (48, 48) weight, the base model's is (32, 32)"),
}


@pytest.mark.parametrize("name", sorted(GGUF_DAMAGE))
def test_a_gguf_adapter_export_names_the_tensor_that_cannot_be_written(name, saved, tmp_path):
    from loratune.tools.gguf_adapter import write_gguf_adapter

    damage, needle = GGUF_DAMAGE[name]
    path = copy_with_tensors(saved, tmp_path, damage)
    out = tmp_path / "out" / "adapter.gguf"
    with pytest.raises(AdapterError, match=re.escape(needle)) as err:
        write_gguf_adapter(str(path), tiny_config(), out)
    assert str(path) in str(err.value)
    assert not out.exists()


def test_a_gguf_output_path_that_is_a_directory_or_under_a_file_is_named(saved, tmp_path):
    from loratune.tools.gguf_adapter import write_gguf_adapter

    (tmp_path / "keep.txt").write_text("precious")
    under_a_file = tmp_path / "keep.txt" / "a.gguf"
    for out, needle in ((tmp_path, "it is a directory"), (under_a_file, "cannot be made")):
        with pytest.raises(ConfigError, match=needle) as err:
            write_gguf_adapter(str(saved), tiny_config(), out)
        assert str(out) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("num_hidden_layers", "2"),
                                          ("hidden_size", 2**40), ("rms_norm_eps", float("nan"))])
def test_a_base_config_with_bad_numbers_is_refused_by_field_for_gguf(field, value):
    from loratune.tools.gguf import hparams_of

    config = tiny_config().to_dict() | {field: value}
    with pytest.raises(ConfigError, match=re.escape("base: fields that must be positive numbers")) as err:
        hparams_of(config, source="base")
    assert f"{field}=" in str(err.value)


def test_a_gguf_outtype_that_is_not_a_string_is_a_config_error():
    from loratune.tools.gguf import parse_outtype

    with pytest.raises(ConfigError, match=re.escape("--outtype ['f16']: expected one of")):
        parse_outtype(["f16"])
