"""QLoRA on CPU: base-model memory and training speed/quality of LoRA on bf16, int8 and NF4 bases.

    python bench/qlora_memory.py [--steps 16] [--batch 4] [--seq 64] [--threads 1] [--json PATH]

Model: the SmolLM-135M shape (Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate
1536, vocab 49152, tied embeddings) built from its config with random weights (nothing is
downloaded). Two parts:

1. Memory. Each base (bf16, int8, NF4, NF4 + double quant) is built in its own subprocess; we
   report the bytes of the linear weights (what quantization replaces) and the process RSS after
   building (minus the RSS after imports). glibc's mmap threshold is fixed so memory freed by
   quantization goes back to the OS instead of staying in the heap.
2. Training. LoRA (r=16, all linear layers) on each base, trained in lock-step (one step of each
   variant in turn, so load changes from other processes hit all variants alike) on the same
   batches of a synthetic language (a fixed random successor map over 64 token ids), then
   evaluated on held-out sequences. tokens/s is the
   median over steps after the first; eval loss is compared with LoRA on the bf16 base.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import psutil
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from loratune import LoraConfig, get_peft_model
from loratune.quant import quantize_model, quantized_layers

VARIANTS = {   # name -> quantize_model kwargs (None: plain bf16 base)
    "bf16": None,
    "int8": dict(bits=8),
    "nf4": dict(bits=4, quant_type="nf4"),
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
}
TRAIN_VARIANTS = ("bf16", "int8", "nf4-dq")
SUBVOCAB = 64   # the synthetic language uses token ids below this


def smollm_config() -> LlamaConfig:
    """The SmolLM-135M architecture (HuggingFaceTB/SmolLM-135M config.json), random init."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )


def build_base(variant: str, seed: int = 0) -> nn.Module:
    """Build the bf16 base from the config (same weights for a seed) and quantize it per variant."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(smollm_config(), dtype=torch.bfloat16)
    if VARIANTS[variant] is not None:
        quantize_model(model, compute_dtype=torch.bfloat16, **VARIANTS[variant])
    return model.requires_grad_(False).eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder's linear weights (quantized storage where quantized; lm_head is tied)."""
    total = sum(m.quantized_nbytes() for _, m in quantized_layers(model))
    embed = model.get_input_embeddings().weight
    for m in model.modules():
        if type(m) is nn.Linear and m.weight is not embed:
            total += m.weight.numel() * m.weight.element_size()
    return total


# ----- part 1: memory, one subprocess per variant ------------------------------------------------

def _rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def memory_child(variant: str) -> None:
    """Runs in the subprocess: build one base, print its memory figures as JSON."""
    torch.set_num_threads(1)
    before = _rss()
    model = build_base(variant)
    after = _rss()
    print(json.dumps({"variant": variant, "linear_bytes": linear_weight_bytes(model),
                      "rss": after, "rss_model": after - before}))


def measure_memory(variant: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    out = subprocess.run([sys.executable, __file__, "--memory-child", variant], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- part 2: training speed and quality --------------------------------------------------------

def language_batches(n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """Sequences of a fixed random successor map over SUBVOCAB tokens (start token drawn per row).

    Learnable by LoRA in a few steps and checkable on held-out rows (same map, other starts).
    """
    successor = torch.randperm(SUBVOCAB, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, SUBVOCAB, (batch,), generator=g)
        for t in range(1, seq):
            ids[:, t] = successor[ids[:, t - 1]]
        out.append(ids)
    return out


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    return statistics.fmean(model(input_ids=b, labels=b).loss.item() for b in batches)


def warmup_cosine(steps: int, warmup: int = 2):
    """lr factor: linear warm-up, then cosine decay to 0 (a settled final step to compare)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def train_lockstep(args) -> dict[str, dict]:
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    models, opts, scheds = {}, {}, {}
    for variant in TRAIN_VARIANTS:
        base = build_base(variant)
        torch.manual_seed(1)   # the same LoRA init for every variant
        models[variant] = get_peft_model(base, lora)
        params = [p for p in models[variant].parameters() if p.requires_grad]
        opts[variant] = torch.optim.AdamW(params, lr=args.lr)
        scheds[variant] = torch.optim.lr_scheduler.LambdaLR(opts[variant], warmup_cosine(args.steps))
    train = language_batches(args.steps, args.batch, args.seq, seed=1)
    held_out = language_batches(args.eval_batches, args.batch, args.seq, seed=2)
    results = {v: {"eval_before": eval_loss(m, held_out), "step_s": [], "losses": []}
               for v, m in models.items()}
    for step, ids in enumerate(train):
        for variant, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opts[variant].step()
            scheds[variant].step()
            opts[variant].zero_grad(set_to_none=True)
            results[variant]["step_s"].append(time.perf_counter() - start)
            results[variant]["losses"].append(loss.item())
        print(f"step {step + 1}/{args.steps}: " + ", ".join(
            f"{v} {r['losses'][-1]:.3f} ({r['step_s'][-1]:.2f}s)" for v, r in results.items()),
              file=sys.stderr)
    tokens = args.batch * args.seq
    for variant, model in models.items():
        model.eval()
        r = results[variant]
        r["eval_after"] = eval_loss(model, held_out)
        r["tokens_per_s"] = tokens / statistics.median(r["step_s"][1:] or r["step_s"])
    return results


# ----- report ------------------------------------------------------------------------------------

def memory_table(memory: list[dict]) -> list[str]:
    bf16 = next(m for m in memory if m["variant"] == "bf16")
    lines = ["| base | linear weights MiB | x bf16 | process RSS MiB | model RSS MiB | x bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in memory:
        lines.append(f"| {m['variant']} | {m['linear_bytes'] / 2**20:.1f} "
                     f"| {m['linear_bytes'] / bf16['linear_bytes']:.3f} "
                     f"| {m['rss'] / 2**20:.0f} | {m['rss_model'] / 2**20:.0f} "
                     f"| {m['rss_model'] / bf16['rss_model']:.3f} |")
    return lines


def training_table(training: dict[str, dict], args) -> list[str]:
    base = training["bf16"]
    lines = [f"LoRA r=16 all-linear, AdamW lr={args.lr} (warm-up + cosine), {args.steps} steps of "
             f"{args.batch}x{args.seq} tokens, eval on {args.eval_batches} held-out batches", "",
             "| base | train tokens/s | x bf16 LoRA | eval loss before | eval loss after | x bf16 LoRA "
             "| loss drop x bf16 LoRA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base_drop = base["eval_before"] - base["eval_after"]
    for variant, r in training.items():
        drop = r["eval_before"] - r["eval_after"]
        lines.append(f"| {variant} | {r['tokens_per_s']:.0f} "
                     f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f} "
                     f"| {r['eval_before']:.3f} | {r['eval_after']:.3f} "
                     f"| {r['eval_after'] / base['eval_after']:.3f} "
                     f"| {drop / base_drop:.2f} |")
    return lines


def report(memory: list[dict], training: dict[str, dict], args) -> str:
    command = " ".join(["python bench/qlora_memory.py", *sys.argv[1:]])
    lines = [f"Command: `{command}`",
             f"Model: SmolLM-135M shape, random weights; torch {torch.__version__}, {args.threads} threads",
             ""]
    if memory:
        lines += memory_table(memory) + [""]
    if training:
        lines += training_table(training, args)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps a shared machine from stalling")
    parser.add_argument("--skip-training", action="store_true", help="memory part only")
    parser.add_argument("--skip-memory", action="store_true", help="training part only")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    torch.set_num_threads(args.threads)
    memory = [] if args.skip_memory else [measure_memory(v) for v in VARIANTS]
    training = {} if args.skip_training else train_lockstep(args)
    print(report(memory, training, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": memory, "training": training, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
