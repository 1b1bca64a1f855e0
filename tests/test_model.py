"""LoraModel end to end on tiny Llama, GPT-2, Qwen2 and custom modules: the equivalences of STYLE.md.

fresh == base (bitwise); disabled == base, restored even when the body raises; only LoRA parameters
change in training; mixed batch == separate per-adapter runs (forward and greedy generate);
a failed mixed call leaves the model usable; several active adapters add up; delete_adapter;
PiSSA/OLoRA keep the output; the user's LoraConfig is never mutated.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from factories import VOCAB, tiny_batch, tiny_model
from loratune import LoraConfig, LoraModel, PeftModel, TaskType, get_peft_model
from loratune.errors import ConfigError, MergeError
from loratune.layers import LoraLayer, ModulesToSave
from tolerances import assert_changed, assert_close

# (arch, config kwargs): every layer type the core supports on a real model.
CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear", use_rslora=True)),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    ("gpt2", dict(target_modules=["c_attn"], use_dora=True)),
    ("qwen2", dict(target_modules="all-linear")),
    ("qwen2", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
]
IDS = [f"{a}-{'-'.join(f'{k}' for k in kw if k != 'target_modules') or kw['target_modules']}"
       for a, kw in CASES]


def perturb(model: nn.Module, std: float = 0.2, seed: int = 3, adapter: str | None = None) -> None:
    """Give every adapter tensor (lora_* and modules_to_save copies) a random offset."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            adapter_owned = "lora_" in name or ".modules_to_save." in name
            if adapter_owned and (adapter is None or f".{adapter}." in f"{name}."):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def logits(model, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def lora(arch="llama", seed=0, dtype=torch.float32, name="default", **kw) -> LoraModel:
    return get_peft_model(tiny_model(arch, seed=seed, dtype=dtype), LoraConfig(r=4, lora_alpha=8, **kw), name)


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_fresh_adapter_is_base_bitwise_then_perturbed_differs(arch, kw):
    x = tiny_batch()
    base = logits(tiny_model(arch), x)
    model = lora(arch, **kw)
    assert torch.equal(logits(model, x), base)
    perturb(model)
    assert_changed(logits(model, x), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fresh_adapter_is_base_bitwise_low_precision(dtype):
    x = tiny_batch()
    base = logits(tiny_model("llama", dtype=dtype), x)
    model = lora(dtype=dtype, target_modules="all-linear")
    assert torch.equal(logits(model, x), base)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_disabled_equals_base_and_state_restored_after_exception(arch, kw):
    x = tiny_batch()
    base = logits(tiny_model(arch), x)
    model = lora(arch, **kw)
    perturb(model)
    adapted = logits(model, x)
    assert_changed(adapted, base)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), adapted)
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(logits(model, x), adapted)


TRAIN_CASES = [(a, kw, torch.float32) for a, kw in CASES] + [("llama", CASES[1][1], torch.bfloat16),
                                                              ("gpt2", CASES[5][1], torch.bfloat16)]


@pytest.mark.parametrize("arch,kw,dtype", TRAIN_CASES, ids=IDS + ["llama-bf16", "gpt2-dora-bf16"])
def test_only_lora_parameters_change_in_training(arch, kw, dtype):
    model = lora(arch, dtype=dtype, lora_dropout=0.1, **kw)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = tiny_batch(seq=6)
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_bias_all_trains_biases_too():
    model = lora("qwen2", target_modules=["q_proj"], bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("k_proj.bias") for n in trainable)
    assert {n for n in trainable if "lora_" not in n} == {n for n, _ in model.named_parameters()
                                                          if n.endswith("bias") and "lora_" not in n}
    lora_only = lora("qwen2", target_modules=["q_proj"], bias="lora_only")
    extra = {n for n, p in lora_only.named_parameters() if p.requires_grad and "lora_" not in n}
    assert extra == {f"model.model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in (0, 1)}


MIXED = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"])),
    ("qwen2", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
]


def two_adapters(arch, kw) -> LoraModel:
    model = lora(arch, name="a", init_lora_weights=False, **kw)
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw))
    perturb(model)
    return model


@pytest.mark.parametrize("arch,kw", MIXED, ids=[f"{a}-{i}" for i, (a, _) in enumerate(MIXED)])
def test_mixed_batch_forward_equals_separate_runs(arch, kw):
    model = two_adapters(arch, kw)
    x = tiny_batch(batch=5, seq=6)
    names = ["a", "b", "__base__", "b", "a"]
    mixed = logits(model, x, adapter_names=names)
    separate = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        separate[name] = logits(model, x)
    with model.disable_adapter():
        separate["__base__"] = logits(model, x)
    assert_changed(separate["a"], separate["b"])
    assert_changed(separate["a"], separate["__base__"])
    for row, name in enumerate(names):
        assert_close(mixed[row], separate[name][row])
    assert all(layer.batch_groups is None for layer in model.modules()
               if isinstance(layer, (LoraLayer, ModulesToSave)))


@pytest.mark.parametrize("arch,kw", MIXED[:1] + MIXED[2:4], ids=["llama", "gpt2", "qwen2-mts"])
def test_mixed_batch_generate_equals_separate_runs(arch, kw):
    model = two_adapters(arch, kw)
    x = tiny_batch(batch=3, seq=4)
    names = ["b", "__base__", "a"]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=x, adapter_names=names, **gen)
    separate = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        separate[name] = model.generate(input_ids=x, **gen)
    with model.disable_adapter():
        separate["__base__"] = model.generate(input_ids=x, **gen)
    assert not torch.equal(separate["a"], separate["__base__"])
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], separate[name][row]), (row, name)


def test_mixed_batch_beam_search_expands_rows_per_caller_row():
    model = two_adapters("llama", MIXED[0][1])
    x = tiny_batch(batch=2, seq=4)
    gen = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, pad_token_id=0)
    # (4, T): rows 0-1 from b, 2-3 from a
    mixed = model.generate(input_ids=x, adapter_names=["b", "a"], **gen)
    model.set_adapter("b")
    only_b = model.generate(input_ids=x, **gen)
    model.set_adapter("a")
    only_a = model.generate(input_ids=x, **gen)
    assert torch.equal(mixed[:2], only_b[:2]) and torch.equal(mixed[2:], only_a[2:])


def test_failed_mixed_call_leaves_model_usable():
    model = two_adapters("llama", MIXED[0][1])
    model.set_adapter("a")
    x = tiny_batch(batch=2)
    before = logits(model, x)
    with pytest.raises(ConfigError, match="nope"):
        model(input_ids=x, adapter_names=["a", "nope"])
    with pytest.raises(ConfigError, match="3 entries but the batch has 2"):
        model(input_ids=x, adapter_names=["a", "b", "a"])
    with pytest.raises(ConfigError, match="nope"):
        model.generate(input_ids=x, adapter_names=["nope", "a"], max_new_tokens=2)
    with pytest.raises(Exception):  # noqa: B017 - any error raised inside the model's forward
        model(input_ids=torch.full_like(x, VOCAB + 5), adapter_names=["a", "b"])
    assert all(layer.batch_groups is None for layer in model.modules()
               if isinstance(layer, (LoraLayer, ModulesToSave)))
    assert torch.equal(logits(model, x), before)
    assert_close(logits(model, x, adapter_names=["b", "b"]), logits_of(model, "b", x))


def logits_of(model, name, x):
    previous = model.active_adapters
    model.set_adapter(name)
    out = logits(model, x)
    model.set_adapter(previous)
    return out


def test_mixed_batch_refused_while_merged():
    model = two_adapters("llama", dict(target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.raises(MergeError, match="unmerge"):
        model(input_ids=tiny_batch(), adapter_names=["a", "b"])
    model.unmerge_adapter()
    model(input_ids=tiny_batch(), adapter_names=["a", "b"])


def test_every_call_that_needs_adapters_apart_is_refused_while_merged_naming_itself():
    model = two_adapters("llama", dict(target_modules=["q_proj"]))
    model.merge_adapter(["a"])
    calls = {
        "add an adapter": lambda: model.add_adapter("c", LoraConfig(target_modules=["q_proj"])),
        "delete adapter 'a': it is merged": lambda: model.delete_adapter("a"),
        "disable adapters": lambda: model.disable_adapter().__enter__(),
        "disable adapter layers": model.disable_adapter_layers,
        "enable adapter layers": model.enable_adapter_layers,
        "route rows with adapter_names": lambda: model(input_ids=tiny_batch(), adapter_names=["a", "b"]),
    }
    for action, call in calls.items():
        with pytest.raises(MergeError, match=f"cannot {action}.*call unmerge_adapter"):
            call()
    model.delete_adapter("b")  # only the merged one is pinned


def test_every_unknown_adapter_is_named_with_the_argument_it_came_in():
    model = two_adapters("llama", dict(target_modules=["q_proj"]))
    calls = {
        "": lambda: model.set_adapter(["a", "zz"]),
        "adapter_names has ": lambda: model(input_ids=tiny_batch(), adapter_names=["a", "zz"]),
        "selected_adapters has ": lambda: model.save_pretrained("unused", selected_adapters=["zz"]),
    }
    for where, call in calls.items():
        expected = rf"^{where}unknown adapter\(s\) \['zz'\]; loaded adapters: \['a', 'b'\]"
        with pytest.raises(ConfigError, match=expected):
            call()


@pytest.mark.parametrize("arch,kw", MIXED[:3], ids=["llama", "llama-dora", "gpt2"])  # LoRA layers add up
def test_set_adapter_list_is_the_sum(arch, kw):
    model = two_adapters(arch, kw)
    x = tiny_batch()
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and "a" in m.r)
    # Layer-level: both active == base + delta_a + delta_b exactly.
    inp = torch.randn(2, 3, layer.in_features) if not hasattr(layer.base_layer, "num_embeddings") else x
    base = layer.base_layer(inp)
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        model.set_adapter(names)
        assert model.active_adapters == names
        outs[tuple(names)] = layer(inp)
    assert_close(outs[("a", "b")], outs[("a",)] + outs[("b",)] - base)
    model.set_adapter(["a", "b"])
    both = logits(model, x)
    assert_changed(both, logits_of(model, "a", x))
    assert_changed(both, logits_of(model, "b", x))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".a." in n for n in trainable) and any(".b." in n for n in trainable)


def test_only_the_active_adapter_is_trainable():
    model = two_adapters("llama", dict(target_modules=["q_proj"]))
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    assert model.active_adapter == "b"


def test_delete_adapter():
    model = two_adapters("llama", dict(target_modules=["q_proj", "v_proj"]))
    x = tiny_batch()
    only_b = logits_of(model, "b", x)
    model.set_adapter(["a", "b"])
    assert_changed(logits(model, x), only_b)
    model.delete_adapter("a")
    assert "a" not in model.peft_config and model.active_adapters == ["b"]
    assert not any(".a." in n for n, _ in model.named_parameters())
    assert_close(logits(model, x), only_b)
    with pytest.raises(ConfigError, match="unknown adapter"):
        model.delete_adapter("a")
    with pytest.raises(ConfigError, match="unknown"):
        model.set_adapter("a")


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing():
    model = lora(target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False)
    perturb(model)
    x = tiny_batch()
    before = logits(model, x)
    model.merge_adapter()
    with pytest.raises(MergeError, match="unmerge"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    assert "default" in model.model.model.embed_tokens.modules_to_save  # not half-deleted
    assert_close(logits(model, x), before)


@pytest.mark.parametrize("kw,error", [
    (dict(target_modules=["qproj"]), "TargetNotFoundError"),
    (dict(target_modules=["q_proj", "rotary_emb"]), "UnsupportedFeatureError"),
    (dict(target_modules=["q_proj", "embed_tokens"], use_dora=True), "UnsupportedFeatureError"),
])
def test_failed_get_peft_model_leaves_the_model_untouched(kw, error):
    base = tiny_model("llama")
    x = tiny_batch()
    before_types = {n: type(m) for n, m in base.named_modules()}
    before_out = logits(base, x)
    with pytest.raises(Exception) as err:  # noqa: B017 - the type is checked by name below
        get_peft_model(base, LoraConfig(**kw))
    assert type(err.value).__name__ == error
    assert {n: type(m) for n, m in base.named_modules()} == before_types
    assert all(p.requires_grad for p in base.parameters())
    assert torch.equal(logits(base, x), before_out)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))  # and it can be adapted afterwards
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}


def test_failed_add_adapter_leaves_the_model_as_it_was():
    model = lora(target_modules=["q_proj"], init_lora_weights=False)
    x = tiny_batch()
    before = logits(model, x)
    types = {n: type(m) for n, m in model.named_modules()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(Exception):  # noqa: B017
        bad = LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)
        model.add_adapter("bad", bad)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert "bad" not in model.peft_config and torch.equal(logits(model, x), before)


def test_add_adapter_name_rules():
    model = lora(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="__base__"):
        model.add_adapter("__base__", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="LoraConfig"):
        model.add_adapter("x", {"r": 4})
    for reserved in ("eval", "train", "keys", "copy", "to"):  # attributes of nn.ModuleDict/ParameterDict
        with pytest.raises(ConfigError, match=f"{reserved!r} is reserved"):
            model.add_adapter(reserved, LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ConfigError, match="reserved"):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]), adapter_name="eval")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "é", "x" * 129, "__base__", 3])
def test_add_adapter_refuses_names_outside_the_one_rule(name):
    model = lora(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="adapter name"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]


def test_a_dotted_adapter_name_trains_saves_loads_and_mixes(tmp_path):
    """vLLM-style names such as "sql.v2" work everywhere, although torch module names cannot hold "."."""
    x = tiny_batch()
    cfg = LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    model = get_peft_model(tiny_model("llama"), cfg, adapter_name="sql.v2")
    base = logits(tiny_model("llama"), x)
    assert torch.equal(logits(model, x), base)
    assert "model.model.embed_tokens.lora_embedding_A.sql:v2" in dict(model.named_parameters())
    perturb(model)
    adapted = logits(model, x)
    assert_changed(adapted, base)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} >= {"sql:v2", "weight"}
    model.save_pretrained(str(tmp_path))
    # a sub-folder, as for any non-default name
    assert (tmp_path / "sql.v2" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "sql.v2"), adapter_name="sql.v2")
    assert loaded.active_adapters == ["sql.v2"] and torch.equal(logits(loaded, x), adapted)
    mixed = logits(loaded, x, adapter_names=["sql.v2", "__base__"])
    assert_close(mixed[0], adapted[0])
    assert_close(mixed[1], base[1])
    loaded.load_adapter(str(tmp_path / "sql.v2"), adapter_name="sql.v3")
    loaded.delete_adapter("sql.v2")
    assert list(loaded.peft_config) == ["sql.v3"] and "sql:v2" not in str(dict(loaded.named_parameters()))


def test_user_config_is_never_mutated(tmp_path):
    for cfg in (LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"],
                           task_type=TaskType.CAUSAL_LM),
                LoraConfig(target_modules=None, rank_pattern={"q_proj": 2}),
                LoraConfig(target_modules=["c_attn"])):
        snapshot = copy.deepcopy(cfg)
        target_list = cfg.target_modules
        arch = "gpt2" if cfg.target_modules == ["c_attn"] else "llama"
        model = get_peft_model(tiny_model(arch), cfg)
        model.add_adapter("second", cfg)
        model.save_pretrained(str(tmp_path / str(len(snapshot.to_dict()))))
        model.merge_and_unload()
        assert cfg == snapshot and cfg.target_modules is target_list
        assert model.peft_config["default"] is not cfg
    assert model.peft_config["default"].fan_in_fan_out and not cfg.fan_in_fan_out


@pytest.mark.parametrize("method", ["pissa", "olora", "pissa_niter_4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pissa_olora_keep_output_and_rewrite_base(method, dtype):
    x = tiny_batch()
    original = tiny_model("llama", dtype=dtype)
    base = logits(original, x)
    w0 = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = lora(dtype=dtype, target_modules=["q_proj", "v_proj"], init_lora_weights=method)
    q = model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.base_layer.weight, w0), "base weight should hold the residual"
    assert torch.count_nonzero(q.lora_B["default"].weight) > 0
    assert_close(logits(model, x), base, dtype)
    with model.disable_adapter():
        assert_changed(logits(model, x), base)  # the residual alone is a different model


def test_forwards_attributes_and_peft_accessors():
    model = lora(target_modules=["q_proj"])
    assert model.config.model_type == "llama"
    assert model.get_base_model() is model.model and model.base_model.model is model.model
    assert PeftModel is LoraModel and model.peft_type == "LORA"
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert model.get_input_embeddings() is model.model.model.embed_tokens


def test_print_trainable_parameters_format(capsys):
    model = lora(target_modules=["q_proj"])
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (4 * 32 + 32 * 4)  # 2 layers x (A + B) at r=4, dim 32
    assert total == sum(p.numel() for p in tiny_model("llama").parameters()) + trainable
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                   f"trainable%: {100 * trainable / total:.4f}")


@pytest.mark.parity
@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_print_trainable_parameters_equals_peft(arch, kw, capsys):
    peft = pytest.importorskip("peft")
    get_peft_model(tiny_model(arch), LoraConfig(**kw)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(tiny_model(arch), peft.LoraConfig(**kw)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours == theirs and ours.startswith("trainable params: ")


class ConvMLP(nn.Module):
    """A custom non-Transformers module with every layer type: Embedding, Linear, Conv1d, Conv2d."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, input_ids):  # (B, T)
        h = self.emb(input_ids).transpose(1, 2)  # (B, 8, T)
        h = torch.relu(self.conv1(h))  # (B, 8, T)
        h = self.conv2(h[:, None])  # (B, 2, 8, T)
        return self.fc(h.mean(-1).flatten(1))  # (B, 5)


def test_custom_module_all_layer_types():
    torch.manual_seed(0)
    net = ConvMLP().eval()
    x = torch.randint(0, 20, (3, 7))
    base = net(x).detach().clone()
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv1", "conv2", "fc"]))
    with torch.no_grad():
        assert torch.equal(model(x), base)
        perturb(model)
        adapted = model(x)
        assert_changed(adapted, base)
        with model.disable_adapter():
            assert torch.equal(model(x), base)
        model.add_adapter("other", LoraConfig(r=3, target_modules=["conv1", "fc"], init_lora_weights=False))
        model.set_adapter("other")
        other = model(x)
        mixed = model(x, adapter_names=["default", "__base__", "other"])
        assert_close(mixed[0], adapted[0])
        assert_close(mixed[1], base[1])
        assert_close(mixed[2], other[2])
        model.set_adapter("default")
        merged = model.merge_and_unload()
        assert_close(merged(x), adapted)


def test_save_pretrained_takes_peft_keyword_arguments(tmp_path, caplog):
    import logging

    from loratune.errors import UnsupportedFeatureError

    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "rank1"), is_main_process=False)
    assert not (tmp_path / "rank1").exists()  # other ranks of a distributed run write nothing
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(str(tmp_path / "a"), save_embedding_layers=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert "save_embedding_layers=True" in caplog.text
    with pytest.raises(UnsupportedFeatureError, match="path_initial_model_for_weight_conversion"):
        model.save_pretrained(str(tmp_path / "b"),
                              path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_from_pretrained_on_an_adapter_file_names_its_directory(tmp_path):
    from loratune.errors import AdapterError

    get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterError, match="is a file, not an adapter directory; did you mean its directory"):
        PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "adapter_model.safetensors"))
