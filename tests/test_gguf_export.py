"""`loratune export --format gguf` and `loratune merge --format gguf` in-process; Modelfile templates."""

from __future__ import annotations

import os
import shutil

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.cli.main import main
from loratune.tools.export import logits_of, probe_batch
from loratune.tools.load_trained import load_model
from loratune.tools.loading import load_tokenizer
from loratune.tools.ollama import CHATML_GO_TEMPLATE, convert_chat_template
from test_load_trained import save_tiny_adapter, save_tiny_model_dir

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's: ChatML with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = ("{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                   "{% endfor %}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-export")
    base = save_tiny_model_dir(root / "base")
    return base, save_tiny_adapter(root / "adapter", base, scale=0.3)


def test_export_writes_adapter_base_and_modelfile(dirs, tmp_path, capsys):
    base, adapter = dirs
    out = tmp_path / "out"
    assert main(["export", adapter, "--format", "gguf", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(os.listdir(out)) == ["Modelfile", "adapter.gguf", "base.gguf"]
    assert lines == [f"Wrote {out}: Modelfile, adapter.gguf, base.gguf",
                     f"Ollama:    ollama create NAME -f {out}/Modelfile && ollama run NAME",
                     f"llama.cpp: llama-cli -m {out}/base.gguf --lora {out}/adapter.gguf",
                     f"llama.cpp: llama-server -m {out}/base.gguf --lora {out}/adapter.gguf --port 8080"]
    assert (out / "Modelfile").read_text() == (
        f"FROM {out}/base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\"{CHATML_GO_TEMPLATE}\"\"\"\n"
        "PARAMETER stop \"<|im_end|>\"\n")
    reader = gguf.GGUFReader(out / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert gguf.GGUFReader(out / "base.gguf").fields["general.file_type"].contents() == 1  # f16


def test_export_onto_a_gguf_base_points_the_modelfile_at_it(dirs, tmp_path, capsys):
    _, adapter = dirs
    base_gguf = save_tiny_gguf_base(tmp_path / "gguf-base")
    out = tmp_path / "out"
    assert main(["export", adapter, "--format", "gguf", "--base", str(base_gguf), "-o", str(out),
                 "--outtype", "q8_0"]) == 0
    assert sorted(os.listdir(out)) == ["Modelfile", "adapter.gguf"]
    assert (out / "Modelfile").read_text().startswith(f"FROM {base_gguf}\nADAPTER ./adapter.gguf\n")
    assert f"llama-cli -m {base_gguf} --lora {out}/adapter.gguf" in capsys.readouterr().out


def save_tiny_gguf_base(directory):
    """The HF base of `dirs` written as GGUF (same weights and tokenizer)."""
    from loratune.tools.gguf import write_gguf_model

    hf = save_tiny_model_dir(directory / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf)
    return write_gguf_model(model, AutoTokenizer.from_pretrained(hf), directory / "base.gguf", "f32")


def test_merge_to_gguf_passes_and_reads_back_close(dirs, tmp_path, capsys):
    _, adapter = dirs
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", adapter, "--output_dir", f"{out}/", "--format", "gguf",
                 "--outtype", "f32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f" -> {out}/model.gguf (f32)")  # one slash, however the path was typed
    assert lines[1].endswith(": PASS") and lines[2].startswith("Written f32 GGUF, read back by Transformers")
    assert sorted(os.listdir(out)) == ["Modelfile", "model.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf\nTEMPLATE")
    loaded = load_model(adapter=adapter, dtype="float32")
    probe = probe_batch(loaded.tokenizer, 1024)
    merged = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    torch.testing.assert_close(logits_of(merged, probe), logits_of(loaded.model, probe), atol=1e-3, rtol=0)
    base = logits_of(AutoModelForCausalLM.from_pretrained(loaded.base_name), probe)
    assert (logits_of(merged, probe) - base).abs().max() > 1e-2  # the adapter is in it


def test_bad_input_is_a_one_line_error_and_writes_nothing(dirs, tmp_path, capsys):
    base, adapter = dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", adapter, "--format", "gguf", "-o", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--format", "gguf", "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        main(["export", adapter, "--format", "gguf", "--outtype", "q4_k"])
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_chatml_templates_convert_with_their_default_system_message():
    tok = load_tokenizer("preset:tiny-llama")  # ChatML after {{ bos_token }}
    plain = convert_chat_template(tok)
    assert (plain.template, plain.system, plain.stop) == (CHATML_GO_TEMPLATE, None, ("<|im_end|>",))
    tok.chat_template = SMOLLM2_TEMPLATE
    smol = convert_chat_template(tok)
    assert smol.template == CHATML_GO_TEMPLATE
    assert smol.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_other_templates_are_not_converted_and_the_reason_is_given():
    tok = load_tokenizer("preset:tiny-llama")
    tok.chat_template = LLAMA2_TEMPLATE
    result = convert_chat_template(tok)
    assert result.template is None and "not ChatML" in result.reason
    tok.chat_template = None
    assert convert_chat_template(tok).reason == "the tokenizer has no chat template"



def test_a_trained_head_of_a_tied_base_is_written_in_the_gguf(tmp_path, capsys):
    """A tied Qwen2 with lm_head in modules_to_save: before, the merged GGUF dropped the trained head
    (llama.cpp then read it from token_embd) and the read-back diff was printed as f32 rounding."""
    from loratune import LoraConfig, get_peft_model
    from loratune.tools.loading import load_base_model
    from test_export import save_tiny_qwen2_tied_dir

    base = save_tiny_qwen2_tied_dir(tmp_path / "base")
    model = get_peft_model(load_base_model(base, dtype="float32"),
                           LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "modules_to_save" in n).mul_(-2.0)
    model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    args = ["--adapter", str(tmp_path / "adapter"), f"--output_dir={out}", "--format=gguf", "--outtype=f32"]
    assert main(["merge", *args]) == 0, capsys.readouterr().err
    names = {t.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert "output.weight" in names
    loaded = load_model(adapter=str(tmp_path / "adapter"), dtype="float32")
    probe = probe_batch(loaded.tokenizer, 1024)
    merged = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    torch.testing.assert_close(logits_of(merged, probe), logits_of(loaded.model, probe), atol=1e-3, rtol=0)


def test_a_merged_weight_beyond_the_outtype_is_refused_and_nothing_written(dirs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, adapter = dirs
    big = tmp_path / "big"
    shutil.copytree(adapter, big)
    tensors = load_file(str(big / "adapter_model.safetensors"))
    save_file({k: v.fill_(300.0) for k, v in tensors.items()}, str(big / "adapter_model.safetensors"))
    assert main(["merge", "--adapter", str(big), "--output_dir", str(tmp_path / "g"), "--format=gguf"]) == 2
    assert "does not fit it; use --outtype bf16 or f32" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(big), "--output_dir", str(tmp_path / "h"), "--dtype=float16"]) == 2
    assert "does not fit float16" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "h").exists()


def test_a_base_config_that_cannot_be_read_is_a_one_line_error(dirs, tmp_path, capsys):
    import json

    base, adapter = dirs
    broken = tmp_path / "broken"
    shutil.copytree(base, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    assert main(["export", adapter, "--base", str(broken), "--format=gguf", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the base model config") and err.count("\n") == 1
    assert "not a multiple of the number of attention heads" in err
