"""Which modules a LoraConfig adapts: names/suffixes, full-match regex, "all-linear", None defaults,
exclude_modules, layers_to_transform/layers_pattern, rank/alpha patterns; typos fail loudly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from factories import tiny_model
from loratune import LoraConfig, get_peft_model
from loratune.errors import ConfigError, TargetNotFoundError
from loratune.inject import DEFAULT_TARGET_MODULES, find_targets, resolve_config
from loratune.layers import LoraLayer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.down = nn.Linear(8, 4)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def adapted(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def targets(model, **kw) -> list[str]:
    return sorted(find_targets(model, resolve_config(model, LoraConfig(**kw))))


def test_list_entries_match_names_and_dotted_suffixes():
    m = tiny_model("llama")
    assert targets(m, target_modules=["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    expected = [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    assert targets(m, target_modules=["self_attn.v_proj"]) == expected
    assert targets(m, target_modules=["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]


def test_suffix_must_match_a_whole_component():
    m = tiny_model("llama")
    with pytest.raises(TargetNotFoundError):
        targets(m, target_modules=["proj"])  # "q_proj" does not end with ".proj"


def test_typo_names_the_close_module():
    m = tiny_model("llama")
    with pytest.raises(TargetNotFoundError, match="'q_proj'") as err:
        get_peft_model(m, LoraConfig(target_modules=["qproj", "v_proj"]))
    assert "qproj" in str(err.value)


def test_typo_in_gpt2_names_real_modules():
    with pytest.raises(TargetNotFoundError, match="c_attn"):
        get_peft_model(tiny_model("gpt2"), LoraConfig(target_modules=["c_atn"]))


def test_every_list_entry_must_match():
    with pytest.raises(TargetNotFoundError, match="nonexistent"):
        targets(tiny_model("llama"), target_modules=["q_proj", "nonexistent"])


def test_regex_string_is_a_full_match():
    m = tiny_model("llama")
    got = targets(m, target_modules=r".*\.1\.self_attn\.(q|k)_proj")
    assert got == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(TargetNotFoundError):  # "q_proj" alone as a regex must match the whole name
        targets(m, target_modules="q_proj")
    with pytest.raises(TargetNotFoundError):
        targets(m, target_modules=r".*self_att")  # re.search would hit every self_attn.* name


def test_single_string_that_matches_no_path_in_full_explains_the_rule():
    m = tiny_model("llama")
    with pytest.raises(TargetNotFoundError) as err:
        targets(m, target_modules="q_proj")
    text = str(err.value)
    assert "a single string is a regex that must match the whole module path" in text
    assert "'model.layers.0.self_attn.q_proj'" in text
    assert 'target_modules: ["q_proj"]' in text and "'.*q_proj'" in text
    with pytest.raises(TargetNotFoundError) as err:
        targets(m, target_modules=r".*self_att")
    assert "must match the whole module path" in str(err.value) and "'.*.*" not in str(err.value)


def test_exclude_modules():
    m = tiny_model("llama")
    got = targets(m, target_modules="all-linear", exclude_modules=["o_proj", "mlp.down_proj"])
    assert got and not any(n.endswith(("o_proj", "down_proj")) for n in got)
    got = targets(m, target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.0\..*")
    assert got == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetNotFoundError, match="removed them all"):
        targets(m, target_modules=["q_proj"], exclude_modules=["q_proj"])


@pytest.mark.parametrize("arch,pattern", [
    ("llama", None), ("llama", "layers"), ("gpt2", "h"), ("gpt2", None),
])
def test_layers_to_transform_and_pattern(arch, pattern):
    m = tiny_model(arch)
    name = "q_proj" if arch == "llama" else "c_attn"
    got = targets(m, target_modules=[name], layers_to_transform=[1], layers_pattern=pattern)
    assert len(got) == 1 and (".layers.1." in got[0] or ".h.1." in got[0])
    assert targets(m, target_modules=[name], layers_to_transform=0, layers_pattern=pattern) == [
        g.replace(".1.", ".0.") for g in got]


def test_layers_pattern_without_layers_to_transform_is_a_config_error():
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"q_proj", "v_proj"}), ("qwen2", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
])
def test_none_targets_use_architecture_defaults(arch, expected):
    model = get_peft_model(tiny_model(arch), LoraConfig(target_modules=None))
    assert {n.split(".")[-1] for n in adapted(model.model)} == expected
    assert set(model.peft_config["default"].target_modules) == expected
    assert set(DEFAULT_TARGET_MODULES[arch]) == expected


def test_none_targets_on_unknown_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match="no default targets"):
        get_peft_model(MLP(), LoraConfig(target_modules=None))


@pytest.mark.parametrize("arch,head", [("llama", "lm_head"), ("qwen2", "lm_head"), ("gpt2", "lm_head")])
def test_all_linear_excludes_the_output_head(arch, head):
    model = get_peft_model(tiny_model(arch), LoraConfig(target_modules="all-linear"))
    names = adapted(model.model)
    assert head not in {n.split(".")[-1] for n in names}
    kinds = (nn.Linear, Conv1D)
    expected = sorted(n for n, mod in tiny_model(arch).named_modules()
                      if isinstance(mod, kinds) and n != head)
    assert names == expected
    assert sorted(model.peft_config["default"].target_modules) == sorted({n.split(".")[-1] for n in expected})


def test_all_linear_on_a_custom_module():
    model = get_peft_model(MLP(), LoraConfig(target_modules="all-linear"))
    assert adapted(model.model) == ["down", "up"]


def test_rank_and_alpha_patterns():
    model = get_peft_model(tiny_model("llama"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 3}, alpha_pattern={"v_proj": 6}))
    layers = dict((n, m) for n, m in model.model.named_modules() if isinstance(m, LoraLayer))
    q0, v0, v1 = (layers[f"model.layers.{i}.self_attn.{p}"]
                  for i, p in ((0, "q_proj"), (0, "v_proj"), (1, "v_proj")))
    assert (q0.r["default"], q0.scaling["default"]) == (2, 8 / 2)
    assert (v0.r["default"], v0.scaling["default"]) == (4, 6 / 4)
    assert (v1.r["default"], v1.scaling["default"]) == (3, 6 / 3)


def test_conv_targets_on_a_custom_module():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 2, 3)

        def forward(self, x):  # (B, 3, L)
            h = self.c1(x)
            return self.c2(h[:, :, None, :].expand(-1, -1, 4, -1))

    model = get_peft_model(ConvNet(), LoraConfig(target_modules=["c1", "c2"], init_lora_weights=False))
    assert adapted(model.model) == ["c1", "c2"]
    assert model(torch.randn(2, 3, 6)).shape == (2, 2, 2, 4)


def test_modules_to_save_are_not_also_lora_targets():
    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules="all-linear",
                                                           modules_to_save=["model.layers.0.mlp.up_proj"]))
    names = adapted(model.model)
    assert "model.layers.0.mlp.up_proj" not in names and "model.layers.1.mlp.up_proj" in names
    assert isinstance(model.model.model.layers[0].mlp.up_proj.original_module, nn.Linear)


def test_one_rule_for_wrapper_parts_and_adapter_owned_names():
    from loratune.layers import inside_wrapper, owned_by_adapter

    for name in ("model.embed_tokens.lora_embedding_A", "layers.0.q_proj.lora_A.default",
                 "layers.0.q_proj.lora_dropout.default", "lm_head.modules_to_save.default"):
        assert inside_wrapper(name) and owned_by_adapter(name), name
    for name in ("layers.0.q_proj.base_layer", "lm_head.original_module"):
        assert inside_wrapper(name) and not owned_by_adapter(name), name
    for name in ("layers.0.q_proj", "model.embed_tokens", "layers.0.flora_proj"):
        assert not inside_wrapper(name) and not owned_by_adapter(name), name


def test_a_regex_target_never_matches_an_embedding_adapters_parts():
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["embed_tokens"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=r".*embed.*"))
    assert "second" in model.model.model.embed_tokens.lora_embedding_A
