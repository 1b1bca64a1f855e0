"""LoraConfig: PEFT's names and defaults, validation that reports every problem, and reading PEFT's
adapter_config.json (unknown fields warn, unsupported features are refused by name)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re

import pytest

from loratune import LoraConfig, TaskType
from loratune.errors import AdapterError, ConfigError, LoratuneError, UnsupportedFeatureError


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=4, lora_alpha=8).scaling_for(4, 8) == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling_for(4, 8) == 4.0


@pytest.mark.parametrize("kwargs,names", [
    (dict(rank_pattern=[("q_proj", 4)]), "rank_pattern must be a dict"),
    (dict(alpha_pattern={"q_proj": "x"}), "alpha_pattern['q_proj'] must be a number"),
    (dict(rank_pattern={"[": 2}), "rank_pattern key '['"),
    (dict(target_modules="("), "target_modules is not a valid regular expression"),
    (dict(target_modules=5), "target_modules must be a list"),
    (dict(exclude_modules=["lm_head", 3]), "exclude_modules entries must be strings"),
    (dict(init_lora_weights="pissa_niter_x"), "pissa_niter_ suffix"),
    (dict(modules_to_save=[None]), "modules_to_save entries must be module names, got [None]"),
    (dict(modules_to_save=["lm_head", ""]), "modules_to_save entries must be module names, got ['']"),
    (dict(modules_to_save=7), "modules_to_save must be a list of module names"),
    (dict(layers_to_transform=1.5), "layers_to_transform must be a layer index or a list of them"),
    (dict(layers_to_transform=[[1]]), "layers_to_transform must be a layer index or a list of them"),
    (dict(layers_to_transform=[0], layers_pattern=5), "layers_pattern must be a layer-list name"),
])
def test_bad_module_specs_are_config_errors_naming_the_field(kwargs, names):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kwargs)
    assert names in str(err.value)


def test_one_module_to_save_given_as_a_string_is_a_list_of_one():
    assert LoraConfig(modules_to_save="lm_head").modules_to_save == ["lm_head"]  # not its letters


def test_valid_module_specs_pass():
    LoraConfig(target_modules=("q_proj", "v_proj"), exclude_modules=r".*lm_head",
               rank_pattern={r"layers\.0\.q_proj": 8}, alpha_pattern={"q_proj": 2.5},
               init_lora_weights="pissa_niter_4")


def test_layers_use_the_config_scaling():
    from factories import tiny_model
    from loratune import get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    layer = get_peft_model(tiny_model(), cfg).model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == cfg.scaling_for(4, 8) == 4.0


def test_task_type_string_is_coerced():
    cfg = LoraConfig(task_type="CAUSAL_LM")
    assert cfg.task_type is TaskType.CAUSAL_LM and str(cfg.task_type) == "CAUSAL_LM"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        LoraConfig(r=0, lora_dropout=1.5, bias="some", init_lora_weights="magic")
    msg = str(err.value)
    assert "4 problems" in msg
    for field in ("r must", "lora_dropout", "bias", "init_lora_weights"):
        assert field in msg


def test_to_dict_is_peft_layout_and_round_trips():
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                     rank_pattern={"q_proj": 2}, task_type=TaskType.CAUSAL_LM)
    d = cfg.to_dict()
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM"
    json.dumps(d)  # JSON-ready
    assert LoraConfig.from_dict(d) == cfg


def test_target_modules_set_becomes_sorted_list():
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


def test_unknown_fields_load_with_a_warning(caplog):
    d = LoraConfig(r=4).to_dict() | {"some_future_field": 3, "another_one": "x"}
    with caplog.at_level(logging.WARNING, logger="loratune"):
        cfg = LoraConfig.from_dict(d, source="adapter_config.json")
    assert cfg.r == 4
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "another_one" in warned and "some_future_field" in warned and "adapter_config.json" in warned


def test_peft_fields_we_ignore_do_not_warn(caplog):
    d = LoraConfig().to_dict() | {"peft_version": "0.99", "auto_mapping": None, "use_qalora": False,
                                  "loftq_config": {}, "layer_replication": None}
    with caplog.at_level(logging.WARNING, logger="loratune"):
        LoraConfig.from_dict(d)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("field,value", [
    ("use_qalora", True), ("loftq_config", {"loftq_bits": 4}), ("layer_replication", [[0, 2]]),
    ("lora_bias", True), ("trainable_token_indices", [1, 2]), ("init_lora_weights", "loftq"),
    ("init_lora_weights", "eva"), ("init_lora_weights", "corda"),
])
def test_unsupported_features_are_refused_by_name(field, value):
    d = LoraConfig().to_dict() | {field: value}
    with pytest.raises(UnsupportedFeatureError, match=field) as err:
        LoraConfig.from_dict(d, source="cfg.json")
    assert repr(value) in str(err.value) and "cfg.json" in str(err.value)


@pytest.mark.parametrize("field,value", [
    ("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 2]]),
    ("loftq_config", {"loftq_bits": 4}), ("target_parameters", ["w"]),
])
def test_a_peft_only_field_set_on_is_refused_by_name_when_built(field, value):
    with pytest.raises(UnsupportedFeatureError, match=f"LoraConfig: .*{re.escape(f'{field}={value!r}')}"):
        LoraConfig(**{field: value})


def test_peft_only_fields_are_real_fields_at_peft_defaults_and_never_written():
    cfg = LoraConfig(lora_bias=False, use_qalora=None, layer_replication=[], loftq_config={},
                     qalora_group_size=64, runtime_config={"ephemeral_gpu_offload": True}, megatron_core="x")
    assert cfg.unsupported_features() == [] and cfg.problems() == []
    peft_only = {f.name for f in dataclasses.fields(LoraConfig) if "peft_only" in f.metadata}
    assert {"lora_bias", "use_qalora", "qalora_group_size", "runtime_config"} <= peft_only
    assert not peft_only & set(cfg.to_dict())
    assert LoraConfig.from_dict(cfg.to_dict()) == LoraConfig()
    with pytest.raises(UnsupportedFeatureError):
        dataclasses.replace(cfg, lora_bias=True)


def test_problems_names_a_peft_only_field_switched_on():
    cfg = LoraConfig()
    cfg.lora_bias = True  # set after validation, as a caller mutating a config might
    assert cfg.problems() == ["lora_bias=True: a PEFT feature loratune does not support"]


def test_every_field_has_help_text():
    assert all(f.metadata.get("help") for f in dataclasses.fields(LoraConfig))


def test_other_peft_types_are_refused():
    with pytest.raises(UnsupportedFeatureError, match="IA3"):
        LoraConfig.from_dict({"peft_type": "IA3", "r": 8})


def test_bad_value_in_file_names_the_source():
    with pytest.raises(ConfigError, match="cfg.json.*r must"):
        LoraConfig.from_dict(LoraConfig().to_dict() | {"r": -1}, source="cfg.json")


def test_json_file_errors_are_adapter_errors(tmp_path):
    bad = tmp_path / "adapter_config.json"
    bad.write_text("{not json")
    with pytest.raises(AdapterError, match="line 1"):
        LoraConfig.from_json_file(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        LoraConfig.from_json_file(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        LoraConfig.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(AdapterError, match="not an adapter directory"):
        LoraConfig.from_pretrained(str(tmp_path / "adapter_config.json"))


def test_from_pretrained_reads_a_directory(tmp_path):
    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    cfg.save_json(str(tmp_path / "adapter_config.json"))
    assert LoraConfig.from_pretrained(str(tmp_path)) == cfg


def test_errors_are_loratune_errors():
    assert issubclass(ConfigError, LoratuneError) and issubclass(UnsupportedFeatureError, LoratuneError)


def test_replace_validates_again():
    with pytest.raises(ConfigError):
        dataclasses.replace(LoraConfig(), r=0)


def test_copy_compares_equal():
    cfg = LoraConfig(target_modules=["a"], rank_pattern={"a": 2})
    assert copy.deepcopy(cfg) == cfg


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LoraConfig)
                                   if f.metadata.get("peft_only") != "ignored"])  # those carry no behaviour
@pytest.mark.parametrize("_", [pytest.param(None, marks=pytest.mark.parity)])
def test_defaults_equal_peft(field, _):
    peft = pytest.importorskip("peft")
    if not hasattr(peft.LoraConfig(), field):
        pytest.skip(f"this PEFT has no field {field}")
    ours, theirs = getattr(LoraConfig(), field), getattr(peft.LoraConfig(), field)
    assert ours == theirs or str(ours) == str(theirs)


@pytest.mark.parity
def test_every_field_of_the_installed_peft_is_known():
    # A field PEFT adds (astra_config in 0.22) is written into every adapter_config.json it saves:
    # unknown here, each of those files would load with a warning, and a switched-on feature unseen.
    peft = pytest.importorskip("peft")
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert theirs - {f.name for f in dataclasses.fields(LoraConfig)} == set()



def test_config_does_not_import_adapter_io():
    """config.py finds adapter_config.json through adapter_files; adapter_io (tensors) builds on config."""
    import ast
    import inspect

    import loratune.config

    tree = ast.parse(inspect.getsource(loratune.config))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "adapter_files" in imported and "adapter_io" not in imported
