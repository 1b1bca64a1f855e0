"""`loratune inspect` in-process: the text report, --json, and clean errors."""

from __future__ import annotations

import json

from loratune.cli.main import main
from loratune.config import LoraConfig
from test_inspection import write_adapter


def test_text_report(tmp_path, capsys):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 64},
                     base_model_name_or_path="org/base")
    path = write_adapter(tmp_path / "a", cfg, {"model.layers.0.self_attn.q_proj": 8,
                                               "model.layers.0.self_attn.v_proj": 64})
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert f"Adapter:     {path}" in out
    assert "Base model:  org/base" in out
    assert "Ranks:       r=8 x1, r=64 x1" in out
    assert "  model.layers.0.self_attn.v_proj: r=64" in out
    assert "Targets:     q_proj, v_proj (2 modules)" in out
    assert f"Parameters:  {2 * 8 * 16 + 2 * 64 * 16:,}" in out
    assert "Dtype:       float32 (4 tensors)" in out
    assert "vLLM:   ACCEPTED\n  note: rank 64 needs --max-lora-rank 64 (default 16)" in out
    assert "LoRAX:  REJECTED\n  - rank_pattern/alpha_pattern" in out


def test_json_report_for_a_dora_adapter(tmp_path, capsys):
    path = write_adapter(tmp_path / "a", LoraConfig(r=8, use_dora=True, bias="all"), {"m.layers.0.q_proj": 8})
    assert main(["inspect", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["targets"] == ["q_proj"] and data["num_parameters"] == 256
    vllm = data["servers"]["vLLM"]
    assert not vllm["accepted"]
    assert any("DoRA" in r for r in vllm["reasons"]) and any("bias='all'" in r for r in vllm["reasons"])
    assert not data["servers"]["LoRAX"]["accepted"]


def test_bad_adapters_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert "none: no such adapter directory" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": -3}')
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "r must be a positive integer" in err and "Traceback" not in err
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_qalora": true}')
    assert main(["inspect", str(tmp_path)]) == 2
    assert "use_qalora=True" in capsys.readouterr().err


def test_broken_adapters_are_rejected_with_the_reason(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    path = write_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]),
                         {"model.layers.0.self_attn.q_proj": 4})
    save_file({}, f"{path}/adapter_model.safetensors")
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "vLLM:   REJECTED\n  - no LoRA tensors" in out and "LoRAX:  REJECTED\n  - no LoRA tensors" in out
    nan = write_adapter(tmp_path / "nan", LoraConfig(r=4, target_modules=["q_proj"]),
                        {"model.layers.0.self_attn.q_proj": 4})
    save_file({f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight":
               torch.full((4, 4), float("nan")) for x in "AB"}, f"{nan}/adapter_model.safetensors")
    assert main(["inspect", nan, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["problems"] == ["2 tensor(s) hold NaN or Inf values: "
                                "model.layers.0.self_attn.q_proj.lora_A.weight, "
                                "model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert data["servers"]["vLLM"]["reasons"] == data["problems"] == data["servers"]["LoRAX"]["reasons"]


def test_a_file_is_not_an_adapter_directory(tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert main(["inspect", str(tmp_path / "weights.safetensors")]) == 2
    assert "weights.safetensors: is a file, not an adapter directory" in capsys.readouterr().err
