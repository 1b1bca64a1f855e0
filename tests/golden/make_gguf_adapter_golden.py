"""Make the golden GGUF adapters in tests/golden/gguf_adapter/ with llama.cpp's own converter.

    make llama-cpp-src      # llama.cpp sources into ~/.cache/loratune/llama.cpp/src (pip download)
    .venv/bin/python tests/golden/make_gguf_adapter_golden.py [LLAMA_CPP_SRC]

For each case it saves a tiny random PEFT adapter (fixed seed) for the base config in base/, then runs
`convert_lora_to_gguf.py --base base --outtype T --outfile <case>/T.gguf <case>/adapter` for each
outtype. tests/test_gguf_adapter.py checks that `write_gguf_adapter` writes the same bytes.

rsLoRA: the converter writes adapter.lora.alpha = lora_alpha and ignores use_rslora, so llama.cpp
would scale by lora_alpha / r. The golden file for the rslora case is the converter's output for the
same tensors with use_rslora off and lora_alpha * sqrt(r), which llama.cpp scales correctly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "gguf_adapter"
sys.path.insert(0, str(HERE.parent))  # tests/, for factories

from factories import tiny_model  # noqa: E402
from loratune import LoraConfig, get_peft_model  # noqa: E402

CASES = {
    "qv": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), ["f32"]),
    "all_linear": (dict(r=4, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 8}),
                   ["f32", "f16", "bf16", "q8_0"]),
    "rslora": (dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    use_rslora=True), ["f32"]),
}


def save_case(name: str, kwargs: dict, seed: int) -> Path:
    model = tiny_model("llama")
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, base_model_name_or_path="tiny-llama", **kwargs)
    adapter = OUT / name / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    return adapter


def reference_input(adapter: Path, tmp: Path) -> Path:
    """The adapter as the converter must see it (rsLoRA folded into lora_alpha, see above)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    if not config.get("use_rslora"):
        return adapter
    copy = tmp / adapter.parent.name / "adapter"  # same directory name: general.name comes from it
    shutil.copytree(adapter, copy)
    config["lora_alpha"] = config["lora_alpha"] * math.sqrt(config["r"])
    config["use_rslora"] = False
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return copy


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else
               os.path.expanduser("~/.cache/loratune/llama.cpp/src"))
    converter = src / "convert_lora_to_gguf.py"
    if not converter.is_file():
        sys.exit(f"{converter} not found: run `make llama-cpp-src` or pass the llama.cpp source directory")
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "base").mkdir(parents=True)
    base = tiny_model("llama").config
    base.architectures = ["LlamaForCausalLM"]  # what save_pretrained records; the converter needs it
    base.to_json_file(OUT / "base" / "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, (kwargs, outtypes)) in enumerate(CASES.items()):
            adapter = reference_input(save_case(name, kwargs, seed), Path(tmp))
            for outtype in outtypes:
                subprocess.run([sys.executable, str(converter), "--base", str(OUT / "base"),
                                "--outtype", outtype, "--outfile", str(OUT / name / f"{outtype}.gguf"),
                                str(adapter)], check=True, cwd=src)


if __name__ == "__main__":
    main()
