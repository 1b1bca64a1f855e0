"""Training config: flat keys -> frozen sections, coercion by field type, all problems at once."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from loratune.errors import ConfigError
from loratune.train.coerce import coerce
from loratune.train.config import SECTIONS, TrainConfig, build_config, describe_keys, key_owners, read_yaml

DATA = {"train_file": "train.jsonl"}

ISSUE_KEYS = (
    "model_name_or_path train_file eval_file dataset_name output_dir max_seq_length packing "
    "completion_only_loss r lora_alpha lora_dropout target_modules learning_rate lr_scheduler_type "
    "warmup_ratio num_train_epochs max_steps per_device_train_batch_size gradient_accumulation_steps "
    "max_grad_norm weight_decay logging_steps eval_steps save_steps save_total_limit seed bf16 "
    "gradient_checkpointing resume_from_checkpoint report_to "
    "load_in_4bit load_in_8bit bnb_4bit_quant_type bnb_4bit_compute_dtype bnb_4bit_use_double_quant "
    "use_rslora use_dora modules_to_save skip_bad_rows num_threads "
    "fsdp fsdp_cpu_offload fsdp_reshard_after_forward"
).split()


def test_every_documented_key_exists_and_has_help():
    owners = key_owners()
    assert set(ISSUE_KEYS) <= set(owners)
    for _, rows in describe_keys():
        for key, _, _, text in rows:
            assert text, f"{key} has no help text"


def test_defaults_follow_current_practice():
    cfg = build_config(DATA)
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.optim.learning_rate == 2e-4
    assert cfg.optim.lr_scheduler_type == "cosine"
    assert cfg.optim.warmup_ratio == 0.03
    assert cfg.model.model_name_or_path == "preset:tiny-llama"
    assert cfg.data.packing is True


def test_sections_are_frozen():
    cfg = build_config(DATA)
    for name in SECTIONS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, name), dataclasses.fields(getattr(cfg, name))[0].name, None)


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("learning_rate", "1e-4", 1e-4),  # PyYAML reads 1e-4 as a string
        ("learning_rate", 3, 3.0),
        ("r", "8", 8),
        ("max_steps", 20.0, 20),
        ("packing", "false", False),
        ("packing", "Yes", True),
        ("bf16", 0, False),
        ("target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
        ("target_modules", ["q_proj"], ["q_proj"]),
        ("target_modules", "all-linear", "all-linear"),
        ("resume_from_checkpoint", "true", True),
        ("resume_from_checkpoint", "out/checkpoint-4", "out/checkpoint-4"),
        ("save_total_limit", "null", None),
        ("eval_file", None, None),
        ("output_dir", 123, "123"),
    ],
)
def test_values_are_coerced_by_field_type(key, raw, expected):
    flat = build_config({**DATA, key: raw}).to_flat_dict()
    assert flat[key] == expected and type(flat[key]) is type(expected)


def test_unknown_key_is_named_with_a_close_match_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_config({**DATA, "lerning_rate": 1e-4})
    msg = str(err.value)
    assert "'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg
    assert "Valid keys:" in msg and "gradient_accumulation_steps" in msg


def test_all_problems_are_reported_at_once():
    raw = {"lerning_rate": 1, "r": "abc", "packing": "maybe", "lora_dropout": 2, "max_steps": 0,
           "lr_scheduler_type": "exponential"}
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    problems = err.value.problems
    assert len(problems) == 7, problems
    text = "\n".join(problems)
    for needle in ("lerning_rate", "r: expected an integer", "packing: expected a boolean", "lora_dropout",
                   "max_steps", "lr_scheduler_type", "no training data"):
        assert needle in text


def test_flat_dict_round_trips_through_yaml(tmp_path):
    cfg = build_config({**DATA, "target_modules": ["q_proj", "v_proj"], "learning_rate": "5e-4"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_flat_dict()))
    again = build_config(read_yaml(path))
    assert again == cfg
    assert isinstance(again, TrainConfig)


def test_replace_validates():
    cfg = build_config(DATA)
    assert cfg.replace(r=4).lora.r == 4
    with pytest.raises(ConfigError):
        cfg.replace(r=0)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("r: 8\nlearning_rate: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*line"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- r\n- 8\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(listy)


def test_run_accepts_a_path_a_dict_or_a_config_plus_overrides(tmp_path):
    from loratune.train.api import build_train_config

    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.jsonl\nr: 8\n")
    from_path = build_train_config(str(path), {"max_steps": "3"})
    assert (from_path.lora.r, from_path.loop.max_steps) == (8, 3)
    assert build_train_config({"train_file": "t.jsonl", "r": 8}, {"max_steps": 3}) == from_path
    assert build_train_config(from_path, {"r": 4}).lora.r == 4
    with pytest.raises(ConfigError, match="c.yaml"):
        build_train_config(str(path), {"r": 0})


@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**9, 10**9), st.booleans())
def test_flag_strings_coerce_back_to_the_values_they_print(x, n, b):
    """What a user copies from train_config.yaml onto the command line means the same thing."""
    assert coerce(str(x), float) == x
    assert coerce(str(n), int) == n
    assert coerce(str(b).lower(), bool) is b
    assert coerce(yaml.safe_dump(x).split("\n")[0], float) == x  # PyYAML's own spelling, e.g. 1.0e-05


@pytest.mark.parametrize("key",
                         ["learning_rate", "lora_alpha", "weight_decay", "max_grad_norm", "num_train_epochs"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_rejected(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number .*got {value}"):
        build_config({**DATA, key: value})


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999])
def test_seed_must_fit_numpy(seed):
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32 - 1\]"):
        build_config({**DATA, "seed": seed})
    assert build_config({**DATA, "seed": 2**32 - 1}).loop.seed == 2**32 - 1


def test_a_key_set_twice_in_the_yaml_is_refused_with_both_lines(tmp_path):
    from loratune.errors import ConfigError
    from loratune.train.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("r: 4\nlora_alpha: 8\nr: 8\n")
    with pytest.raises(ConfigError, match=r"key 'r' is set twice \(lines 1 and 3\)"):
        read_yaml(path)
    path.write_text("r: 4\ntarget_modules:\n  - q_proj\n  - v_proj\n")
    assert read_yaml(path) == {"r": 4, "target_modules": ["q_proj", "v_proj"]}


def test_eval_metric_is_loss_or_exact_match_and_exact_match_needs_eval_rows():
    cfg = build_config(DATA)
    assert (cfg.loop.eval_metric, cfg.loop.eval_max_new_tokens) == ("loss", None)
    exact = {"eval_metric": "exact_match"}
    cfg = build_config({**DATA, **exact, "eval_file": "e.jsonl", "eval_max_new_tokens": "8"})
    assert (cfg.loop.eval_metric, cfg.loop.eval_max_new_tokens) == ("exact_match", 8)
    assert build_config({**DATA, **exact, "eval_samples": 4}).loop.eval_metric == "exact_match"
    with pytest.raises(ConfigError) as err:
        build_config({**DATA, "eval_metric": "bleu", "eval_max_new_tokens": 0})
    assert err.value.problems == ["eval_metric: expected one of 'loss', 'exact_match', got 'bleu'",
                                  "eval_max_new_tokens must be >= 1 or null, got 0"]
    with pytest.raises(ConfigError, match="exact_match scores answers to eval rows; set eval_file"):
        build_config({**DATA, **exact})


def test_fsdp_settings_and_what_fsdp_cannot_do_are_refused_by_name():
    assert build_config({**DATA, "fsdp": "true", "fsdp_reshard_after_forward": "false"}).distributed.fsdp
    with pytest.raises(ConfigError) as err:
        build_config({**DATA, "fsdp_cpu_offload": True, "fsdp_reshard_after_forward": False})
    assert err.value.problems == ["fsdp_cpu_offload: only applies with fsdp: true",
                                  "fsdp_reshard_after_forward: only applies with fsdp: true"]
    with pytest.raises(ConfigError) as err:
        build_config({**DATA, "fsdp": True, "use_dora": True, "modules_to_save": ["lm_head"]})
    assert [p.split(":")[0] for p in err.value.problems] == ["use_dora", "modules_to_save"]
    assert all("fsdp" in p for p in err.value.problems)


@pytest.mark.parametrize("settings, message", [
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"},
     "bnb_4bit_quant_type: expected one of 'nf4', 'fp4', got 'nf5'"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, "bnb_4bit_compute_dtype 'int8' is not one of"),
])
def test_quantization_values_that_cannot_work_are_refused_by_name_before_loading(settings, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config({**DATA, **settings})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(message)
    from loratune.train import run  # the model path does not exist: the config is refused first

    missing = {"model_name_or_path": str(tmp_path / "missing"), "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=message.split(" ")[0]):
        run({**DATA, **settings, **missing})


ONLY_WITH = "only applies with load_in_4bit"


@pytest.mark.parametrize("settings, message", [
    ({"load_in_8bit": True, "bnb_4bit_quant_type": "fp4"}, f"bnb_4bit_quant_type {ONLY_WITH}"),
    ({"load_in_8bit": True, "bnb_4bit_use_double_quant": True}, f"bnb_4bit_use_double_quant {ONLY_WITH}"),
    ({"bnb_4bit_use_double_quant": True}, f"bnb_4bit_use_double_quant {ONLY_WITH}"),
    ({"bnb_4bit_compute_dtype": "float16"}, f"bnb_4bit_compute_dtype {ONLY_WITH} or load_in_8bit"),
    ({"base_compute": "int8", "bnb_4bit_compute_dtype": "bfloat16"},
     "bnb_4bit_compute_dtype is not used: base_compute: int8 multiplies in int8"),
])
def test_quantization_settings_nothing_reads_are_named_in_a_warning(settings, message, caplog):
    """A QLoRA config with load_in_4bit switched off for a quick run still builds: its leftovers warn."""
    with caplog.at_level("WARNING", logger="loratune.train.config"):
        cfg = build_config({**DATA, **settings}, source="run.yaml")
    assert f"run.yaml: {message}" in caplog.text, caplog.text
    assert all(getattr(cfg.model, k) == v for k, v in settings.items())


def test_quantization_settings_that_apply_are_kept():
    cfg = build_config({**DATA, "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                        "bnb_4bit_compute_dtype": "torch.float16", "bnb_4bit_use_double_quant": True})
    assert (cfg.model.bnb_4bit_quant_type, cfg.model.bnb_4bit_compute_dtype) == ("fp4", "torch.float16")
    cfg = build_config({**DATA, "load_in_8bit": True, "bnb_4bit_compute_dtype": "float32"})
    assert cfg.model.bnb_4bit_compute_dtype == "float32"


def test_numpy_numbers_are_the_numbers_they_hold():
    np = pytest.importorskip("numpy")
    cfg = build_config({**DATA, "r": np.int64(8), "max_steps": np.float32(20.0),
                        "learning_rate": np.float32(0.5), "load_in_4bit": np.bool_(True)})
    flat = cfg.to_flat_dict()
    assert (flat["r"], flat["max_steps"], flat["learning_rate"], flat["load_in_4bit"]) == (8, 20, 0.5, True)
    assert type(flat["r"]) is int and type(flat["load_in_4bit"]) is bool
    with pytest.raises(ConfigError, match=r"r: expected an integer, got 4\.5"):
        build_config({**DATA, "r": np.float64(4.5)})


def test_trls_names_for_our_keys_are_accepted(tmp_path):
    from loratune.train.api import build_train_config

    base = {"train_file": "t.jsonl"}
    assert build_config({**base, "max_length": 256}).data.max_seq_length == 256
    assert build_config({**base, "dataset_text_field": "body"}).data.text_column == "body"
    with pytest.raises(ConfigError, match="max_length and max_seq_length are the same setting"):
        build_config({**base, "max_length": 256, "max_seq_length": 512})
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.jsonl\nmax_length: 256\n")
    assert build_train_config(path, {"max_seq_length": 128}).data.max_seq_length == 128  # the flag wins
    assert build_train_config(path, {}).replace(max_length=64).data.max_seq_length == 64


@pytest.mark.parametrize("key", ["assistant_only_loss", "packing_strategy", "padding_free", "truncation_mode",
                                 "eos_token"])
def test_trls_keys_without_a_counterpart_say_what_happens_instead(key):
    with pytest.raises(ConfigError, match=f"'{key}' is a TRL / PEFT setting with no counterpart here: "):
        build_config({"train_file": "t.jsonl", key: True})


@pytest.mark.parametrize(("key", "value", "instead"), [
    ("save_strategy", "no", "save_steps: 0"), ("eval_strategy", "steps", "eval_steps: N"),
    ("logging_strategy", "steps", "logging_steps"), ("optim", "adamw_torch", "always AdamW"),
    ("lr_scheduler_kwargs", {"min_lr": 0}, "lr_scheduler_type"), ("neftune_noise_alpha", 5, "not supported"),
    ("fp16", True, "bf16: true"), ("per_device_eval_batch_size", 4, "per_device_train_batch_size"),
    ("gradient_checkpointing_kwargs", {"use_reentrant": False}, "gradient_checkpointing: true"),
    ("use_cpu", True, "CUDA_VISIBLE_DEVICES"), ("init_lora_weights", "gaussian", "init_lora_weights: true"),
])
def test_common_trainer_keys_are_refused_with_what_to_use(key, value, instead):
    """SFTConfig / TrainingArguments / LoraConfig keys a TRL script sets: refused, saying what to use."""
    with pytest.raises(ConfigError) as err:
        build_config({"train_file": "t.jsonl", key: value})
    assert f"'{key}' is a TRL / PEFT setting" in str(err.value) and instead in str(err.value)


def test_warmup_steps_reads_as_in_transformers_5():
    """Transformers 5 dropped warmup_ratio: warmup_steps >= 1 is steps, below 1 a fraction of all steps."""
    assert build_config({**DATA, "warmup_steps": 10}).optim.warmup_steps == 10
    assert build_config({**DATA, "warmup_steps": "0.1"}).optim.warmup_steps == 0.1
    assert build_config(DATA).optim.warmup_steps == 0  # warmup_ratio applies
    for bad in (-1, 2.5):
        with pytest.raises(ConfigError, match=f"warmup_steps must be a whole number .* got {float(bad)}"):
            build_config({**DATA, "warmup_steps": bad})


def test_an_unused_setting_is_warned_about_once(caplog):
    """The trainer replaces a key of the built config (the token budget); that must not warn again."""
    with caplog.at_level("WARNING", logger="loratune"):
        cfg = build_config({"train_file": "t.jsonl", "bnb_4bit_quant_type": "fp4"})
        cfg.replace(max_tokens_per_batch=512)
    assert caplog.text.count("bnb_4bit_quant_type only applies with load_in_4bit") == 1
