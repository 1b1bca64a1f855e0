"""PEFT parity in both directions: an adapter saved by one library loads in the other and gives the
same logits; trainable parameter counts agree; add_weighted_adapter matches PEFT's combinations."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import loratune
from factories import tiny_batch, tiny_model
from tolerances import assert_changed, assert_close

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.parity


CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ("llama", dict(target_modules="all-linear", rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2", dict(target_modules=["c_attn"], use_dora=True)),
    ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    ("gpt2", dict(target_modules="all-linear")),
    ("qwen2", dict(target_modules="all-linear", bias="all")),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1])),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h")),
    ("gpt2", dict(target_modules=["c_attn"], modules_to_save=["ln_f", "lm_head"], bias="all")),
    ("gpt2",
     dict(target_modules=["c_attn"], bias="lora_only", exclude_modules=["transformer.h.1.attn.c_attn"])),
    ("llama", dict(target_modules=r".*\.(q|v)_proj", use_dora=True, use_rslora=True)),
    ("qwen2", dict(target_modules=["embed_tokens"])),  # tied to lm_head
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["norm"])),  # model.norm only (PEFT 0.22 on)
    ("llama", dict(target_modules="all-linear", modules_to_save=["mlp"])),  # no LoRA inside a saved module
    ("mistral", dict(target_modules="all-linear", use_dora=True, rank_pattern={r".*\.1\.mlp\..*": 2},
                     alpha_pattern={"o_proj": 3}, exclude_modules=["model.layers.0.mlp.up_proj"])),
    ("mistral", dict(target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"], bias="all")),
]
IDS = ["llama", "rslora", "rank-alpha-pattern", "dora", "gpt2-conv1d", "gpt2-dora", "embedding",
       "gpt2-all-linear", "qwen2-bias-all", "modules-to-save", "layers-to-transform", "layers-pattern",
       "gpt2-mts-bias-all", "gpt2-lora-only-exclude", "regex-dora-rslora", "qwen2-tied-embedding",
       "modules-to-save-suffix", "no-lora-inside-saved", "mistral-dora-patterns-exclude",
       "mistral-embedding-mts-bias-all"]


def perturb(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (0.1 if "lora_" in name else 0.02))


def logits(model, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def build(lib, arch, kw, name="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(tiny_model(arch),
                                  lib.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw),
                                  adapter_name=name)


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_ours_to_peft(tmp_path, arch, kw):
    x = tiny_batch()
    ours = build(loratune, arch, kw)
    perturb(ours)
    expected = logits(ours, x)
    assert_changed(expected, logits(tiny_model(arch), x))
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    assert_close(logits(theirs, x), expected)
    if arch == "qwen2" and "embed_tokens" in kw["target_modules"]:  # tied to lm_head: PEFT merges into both
        with pytest.raises(loratune.errors.MergeError, match="tied"):
            ours.merge_and_unload()
        return
    assert_close(logits(ours.merge_and_unload(), x), logits(theirs.merge_and_unload(), x))
    assert_close(logits(ours, x), expected)


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_peft_to_ours_and_counts(tmp_path, arch, kw):
    x = tiny_batch()
    theirs = build(peft, arch, kw)
    perturb(theirs)
    expected = logits(theirs, x)
    assert_changed(expected, logits(tiny_model(arch), x))
    theirs.save_pretrained(str(tmp_path))
    ours = loratune.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    assert_close(logits(ours, x), expected)
    ours.save_pretrained(str(tmp_path / "again"))
    assert_same_files(tmp_path / "again", tmp_path)
    assert build(loratune, arch, kw).get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable_ours = loratune.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path), is_trainable=True)
    trainable_theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path), is_trainable=True)
    assert trainable_ours.get_nb_trainable_parameters() == trainable_theirs.get_nb_trainable_parameters()


def assert_same_files(ours, theirs) -> None:
    """Our re-save of a PEFT adapter holds PEFT's tensors (names, shapes, dtypes, values) and config
    values (types and list order too). Left out, by design: the base weight of an adapted embedding
    (PEFT's save_embedding_layers="auto"), the second copy of a saved module's bias PEFT writes with
    bias="all" (`<module>.modules_to_save.bias`, equal to `<module>.bias`), and PEFT's fields for
    features we refuse, at their defaults."""
    from safetensors.torch import load_file

    mine, peft_tensors = (load_file(str(d / "adapter_model.safetensors")) for d in (ours, theirs))
    embedding_bases = {k for k in peft_tensors
                       if k.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))}
    bias_copies = {k for k in peft_tensors if k.endswith(".modules_to_save.bias")}
    for key in bias_copies:
        assert torch.equal(peft_tensors[key], peft_tensors[key.replace(".modules_to_save.bias", ".bias")])
    assert set(mine) == set(peft_tensors) - embedding_bases - bias_copies
    for key, tensor in mine.items():
        assert tensor.dtype == peft_tensors[key].dtype and torch.equal(tensor, peft_tensors[key]), key
    mine, peft_config = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, theirs))
    assert set(mine) <= set(peft_config)
    for key, value in mine.items():
        if key not in ("peft_version", "auto_mapping"):
            assert (type(value), value) == (type(peft_config[key]), peft_config[key]), key
    for key in set(peft_config) - set(mine) - {"peft_version", "auto_mapping"}:
        field = loratune.LoraConfig.__dataclass_fields__[key]
        inert = field.metadata["peft_only"] == "ignored"
        assert inert or any(peft_config[key] == off for off in field.metadata["off"]), key


def test_fresh_default_init_is_base_in_both():
    x = tiny_batch()
    base = logits(tiny_model("llama"), x)
    for lib in (loratune, peft):
        model = lib.get_peft_model(tiny_model("llama"),
                                   lib.LoraConfig(target_modules=["q_proj"], use_dora=True))
        assert torch.equal(logits(model, x), base)


def test_mixed_batch_matches_peft(tmp_path):
    x = tiny_batch(batch=3)
    kw = dict(target_modules=["q_proj", "v_proj"])
    theirs = build(peft, "llama", kw, "a")
    theirs.add_adapter("b", peft.LoraConfig(r=2, init_lora_weights=False, **kw))
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = loratune.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "a"), adapter_name="a")
    ours.load_adapter(str(tmp_path / "b"), adapter_name="b")
    names = ["b", "__base__", "a"]
    theirs.eval()  # PEFT refuses adapter_names in training mode
    assert_close(logits(ours, x, adapter_names=names), logits(theirs, x, adapter_names=names))


@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
@pytest.mark.parametrize("arch,kw", [("llama", dict(target_modules=["q_proj", "v_proj"])),
                                     ("gpt2", dict(target_modules=["c_attn"]))], ids=["llama", "gpt2"])
def test_add_weighted_adapter_matches_peft(tmp_path, combination, arch, kw):
    x = tiny_batch()
    theirs = build(peft, arch, kw, "a")
    r_b = 4 if combination == "linear" else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("b", peft.LoraConfig(r=r_b, lora_alpha=3, init_lora_weights=False, **kw))
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = loratune.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "a"), adapter_name="a")
    ours.load_adapter(str(tmp_path / "b"), adapter_name="b")
    args = (["a", "b"], [0.7, 1.3], "ab")
    svd = {"svd_clamp": 0.9, "svd_driver": None, "svd_full_matrices": True}
    options = svd if combination == "svd" else {}
    theirs.add_weighted_adapter(*args, combination_type=combination, **options)
    ours.add_weighted_adapter(*args, combination_type=combination, **options)
    theirs.set_adapter("ab")
    ours.set_adapter("ab")
    expected = logits(theirs, x)
    assert_changed(expected, logits(tiny_model(arch), x))
    assert_close(logits(ours, x), expected)


def seq_cls_model(arch: str = "qwen2"):
    from transformers import AutoModelForSequenceClassification, DistilBertConfig

    from factories import tiny_config

    torch.manual_seed(0)
    if arch == "distilbert":  # a head of two layers: pre_classifier, then classifier
        cfg = DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, num_labels=3)
    else:
        cfg = tiny_config(arch, num_labels=3, pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


@pytest.mark.parametrize("arch,targets", [("qwen2", ["q_proj"]), ("qwen2", "all-linear"),
                                          ("distilbert", ["q_lin"]), ("distilbert", "all-linear")],
                         ids=["q_proj", "all-linear", "distilbert-q_lin", "distilbert-all-linear"])
def test_sequence_classification_both_ways(tmp_path, arch, targets):
    # PEFT adds the head to modules_to_save (every name it knows: classifier, score, pre_classifier)
    # and never puts LoRA on a module it trains in full, also under "all-linear".
    x = tiny_batch()
    for src, dst in ((peft, loratune), (loratune, peft)):
        model = build_on(src, seq_cls_model(arch), targets)
        perturb(model)
        model.eval()
        expected = model(input_ids=x).logits.detach()
        out = tmp_path / src.__name__
        model.save_pretrained(str(out))
        loaded = dst.PeftModel.from_pretrained(seq_cls_model(arch), str(out))
        loaded.eval()
        with torch.no_grad():
            assert_close(loaded(input_ids=x).logits, expected)
    counts = [build_on(lib, seq_cls_model(arch), targets).get_nb_trainable_parameters()
              for lib in (loratune, peft)]
    assert counts[0] == counts[1]


def test_a_file_from_peft_up_to_0_21_saving_every_suffix_match_loads(tmp_path):
    # PEFT up to 0.21 read modules_to_save=["norm"] as a plain suffix: its files also hold every
    # layers.N.input_layernorm copy. Such a file loads, and the copies are listed by full path.
    x = tiny_batch()
    norms = ["model.norm"] + [f"model.layers.{i}.{n}" for i in range(2)
                              for n in ("input_layernorm", "post_attention_layernorm")]
    ours = loratune.get_peft_model(tiny_model("llama"), loratune.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=norms, init_lora_weights=False))
    perturb(ours)
    expected = logits(ours, x)
    ours.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["modules_to_save"] = ["norm"]
    path.write_text(json.dumps(config))
    loaded = loratune.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert_close(logits(loaded, x), expected)
    assert sorted(loaded.peft_config["default"].modules_to_save) == sorted(["norm"] + norms[1:])


def build_on(lib, model, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(model, lib.LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS",
                                                        init_lora_weights=False))


class ConvNet(torch.nn.Module):
    """A custom (non-Transformers) module with Embedding, Conv1d, Conv2d and Linear layers."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv1 = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(1, 2, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(2 * 4 * 4, 5)

    def forward(self, input_ids):  # (B, 7)
        h = torch.relu(self.conv1(self.emb(input_ids).transpose(1, 2)))  # (B, 8, 7)
        return self.fc(self.conv2(h[:, None]).flatten(1))  # (B, 2, 4, 4) -> (B, 5)


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval()


def test_custom_conv_module_both_ways(tmp_path):
    x = torch.randint(0, 20, (3, 7))
    targets = ["emb", "conv1", "conv2", "fc"]
    base = conv_net()(x).detach()
    for src, dst in ((loratune, peft), (peft, loratune)):
        model = build_on_module(src, conv_net(), targets)
        perturb(model)
        with torch.no_grad():
            expected = model(x)
        assert_changed(expected, base)
        out = tmp_path / src.__name__
        model.save_pretrained(str(out))
        loaded = dst.PeftModel.from_pretrained(conv_net(), str(out))
        with torch.no_grad():
            assert_close(loaded(x), expected)


def build_on_module(lib, module, targets):
    return lib.get_peft_model(module, lib.LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                     init_lora_weights=False))


def test_adapters_loaded_for_inference_run_in_eval_mode(tmp_path):
    """As PEFT: from_pretrained and load_adapter without is_trainable switch dropout off."""
    x = tiny_batch()
    theirs = peft.get_peft_model(tiny_model("llama"),
                                 peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5,
                                                                       init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = loratune.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert not ours.training and torch.equal(logits(ours, x), logits(ours, x))
    ours.train()
    ours.load_adapter(str(tmp_path), adapter_name="again")
    assert not ours.training
    assert loratune.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path), is_trainable=True).training


def test_config_takes_peft_fields_at_their_off_values_and_peft_task_types():
    config = loratune.LoraConfig(target_modules=["q_proj"], lora_bias=False, use_qalora=False,
                                 layer_replication=None, loftq_config={}, trainable_token_indices=None,
                                 target_parameters=None, ensure_weight_tying=False, runtime_config=None,
                                 task_type=peft.TaskType.CAUSAL_LM)
    assert config.task_type == loratune.TaskType.CAUSAL_LM
    for on in ({"lora_bias": True}, {"ensure_weight_tying": True}, {"layer_replication": [[0, 1]]}):
        with pytest.raises(loratune.errors.UnsupportedFeatureError, match=next(iter(on))):
            loratune.LoraConfig(target_modules=["q_proj"], **on)


def test_pruning_combinations_are_refused_by_name():
    model = build(loratune, "llama", dict(target_modules=["q_proj"]), "a")
    model.add_adapter("b", loratune.LoraConfig(r=2, target_modules=["q_proj"]))
    for kw in (dict(combination_type="ties", density=0.5), dict(combination_type="svd", density=0.5),
               dict(combination_type="svd", majority_sign_method="frequency")):
        with pytest.raises(loratune.errors.UnsupportedFeatureError):
            model.add_weighted_adapter(["a", "b"], [1, 1], "ab", **kw)


@pytest.mark.parametrize("name, index", [("model.decoder_blocks.1.0", 1), ("model.layers.1.experts.0.w1", 1),
                                         ("transformer.h.3.attn.c_attn", 3), ("lm_head", None)])
def test_layer_index_without_layers_pattern_is_the_first_numbered_segment(name, index):
    from loratune.inject import layer_index

    assert layer_index(name, None) == index


def test_rank_pattern_takes_the_first_matching_key_in_order_as_peft():
    """Keys that overlap resolve by dict order, not exact-name-first. (Saved files sort their keys, in
    PEFT as here, so overlapping keys do not survive a save in either library.)"""
    patterns = {"q_proj": 2, "model.layers.0.self_attn.q_proj": 6}
    ranks = []
    for lib in (loratune, peft):
        model = lib.get_peft_model(tiny_model("llama"), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        rank_pattern=patterns))
        ranks.append(sorted(m.r["default"] for n, m in model.named_modules()
                            if n.endswith("q_proj") and hasattr(m, "r")))
    assert ranks[0] == ranks[1] == [2, 2]


@pytest.mark.parametrize("creator", [loratune, peft], ids=["ours", "peft"])
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_pissa_and_olora_adapters_reload_as_trained_in_both(tmp_path, init, creator):
    """Their factors belong to the residual base their init made: loading runs that init again (as
    PEFT does) and puts the saved factors back, so the reloaded model is the trained one.
    pissa_niter_N's sketch is random: both libraries draw it as at creation, so a load from the
    same generator state (here: the factory's seed) rebuilds the same residual."""
    x = tiny_batch()
    config = creator.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    trained = creator.get_peft_model(tiny_model("llama"), config)
    perturb(trained)
    trained.eval()
    expected = logits(trained, x)
    trained.save_pretrained(str(tmp_path))
    for lib in (loratune, peft):
        assert_close(logits(lib.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)), x), expected)


def test_disable_and_enable_adapter_layers_as_peft(tmp_path):
    x = tiny_batch()
    models = [build(lib, "llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]))
              for lib in (loratune, peft)]
    for m in models:
        perturb(m)
    base = logits(tiny_model("llama"), x)
    for m in models:
        with_adapter = logits(m, x)
        m.base_model.disable_adapter_layers()
        assert_close(logits(m, x), base)
        m.base_model.enable_adapter_layers()
        assert_close(logits(m, x), with_adapter)


def test_a_pissa_adapter_on_a_quantized_base_is_refused_and_the_model_left_as_it_came(tmp_path):
    from loratune.quant import quantize_model

    trained = loratune.get_peft_model(tiny_model("llama"), loratune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                               init_lora_weights="pissa"))
    trained.save_pretrained(str(tmp_path))
    base = quantize_model(tiny_model("llama"), bits=8)
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    with pytest.raises(loratune.errors.AdapterError, match="unquantized base"):
        loratune.PeftModel.from_pretrained(base, str(tmp_path))
    assert not any("lora_" in n for n, _ in base.named_modules())
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())


def test_a_peft_file_listing_targets_this_model_lacks_loads_as_in_peft(tmp_path, caplog):
    """A target list written for several architectures ("c_attn" beside "q_proj"): PEFT adapts what
    matches; loading it warns and does the same. Creating an adapter with such a list stays an error."""
    x = tiny_batch()
    kw = dict(target_modules=["q_proj", "v_proj", "c_attn"])
    theirs = build(peft, "llama", kw)
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    with caplog.at_level("WARNING", logger="loratune"):
        ours = loratune.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert "target_modules ['c_attn'] match no module of this model" in caplog.text
    assert_close(logits(ours, x), logits(theirs, x))
    other = build(loratune, "llama", dict(target_modules=["q_proj"]), name="a")
    other.load_adapter(str(tmp_path), adapter_name="b")
    other.set_adapter("b")
    assert_close(logits(other, x), logits(theirs, x))
    with pytest.raises(loratune.errors.TargetNotFoundError, match="c_attn"):
        build(loratune, "llama", kw)


@pytest.mark.parametrize("src,dst", [(loratune, peft), (peft, loratune)],
                         ids=["ours-to-peft", "peft-to-ours"])
def test_several_adapters_in_sub_folders_both_ways(tmp_path, src, dst):
    """add_adapter + save_pretrained (non-default names in sub-folders, selected_adapters,
    safe_serialization=False) on one side; from_pretrained / load_adapter(subfolder=) on the other."""
    x = tiny_batch()
    model = build(src, "llama", dict(target_modules=["q_proj"]))
    for name, kw in (("b", dict(lora_alpha=4, target_modules=["v_proj"])),
                     ("c", dict(target_modules=["k_proj"], use_dora=True))):
        model.add_adapter(name, src.LoraConfig(r=2, init_lora_weights=False, **kw))
    perturb(model)
    model.eval()
    expected = {}
    for name in ("default", "b", "c"):
        model.set_adapter(name)
        expected[name] = logits(model, x)
    model.save_pretrained(str(tmp_path / "all"))
    model.save_pretrained(str(tmp_path / "only-b"), selected_adapters=["b"], safe_serialization=False)
    loaded = dst.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "all"))
    loaded.load_adapter(str(tmp_path / "all" / "b"), adapter_name="b")
    loaded.load_adapter(str(tmp_path / "all"), adapter_name="c", subfolder="c")
    for name in ("default", "b", "c"):
        loaded.set_adapter(name)
        assert_close(logits(loaded, x), expected[name])
    only_b = dst.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "only-b" / "b"),
                                           adapter_name="b")
    assert_close(logits(only_b, x), expected["b"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_inference_logits_are_peft_s_bit_for_bit(arch, tmp_path):
    """On a bf16 base PEFT keeps the adapter in fp32, adds its branch in fp32 and rounds once; eval and
    generation (no grad) take the same arithmetic, with one adapter (the fused op) and with two."""
    torch.manual_seed(0)
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"])
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(r=4, init_lora_weights=False, **kw))
    theirs.add_adapter("b", peft.LoraConfig(r=2, init_lora_weights=False, **kw))
    theirs.save_pretrained(str(tmp_path))
    ids = tiny_batch()
    for active in (["default"], ["default", "b"]):
        loaded = [peft.PeftModel.from_pretrained(tiny_model(arch).to(torch.bfloat16), str(tmp_path)),
                  loratune.PeftModel.from_pretrained(tiny_model(arch).to(torch.bfloat16), str(tmp_path))]
        logits = []
        for model in loaded:
            model.load_adapter(str(tmp_path / "b"), "b")
            model.base_model.set_adapter(active)
            with torch.no_grad():
                logits.append(model.eval()(input_ids=ids).logits)
        assert torch.equal(logits[0], logits[1]), (active, (logits[0] - logits[1]).abs().max())
