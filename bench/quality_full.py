"""The full fine-tuning contender of bench/quality.py: every weight trained, a plain PyTorch loop.

The LoRA paper's reference point. Master weights, gradients and AdamW state are fp32; where the
device has native bf16 the forward and backward run under `torch.autocast` in bf16 (mixed
precision), elsewhere in fp32. Same rows, tokens and labels as loratune (the examples come from
`loratune.data`, so the prompt is masked exactly as there), the same batch plan (loratune's
`plan_batches`, unpacked: 8 examples per micro-batch, shuffled by seed and epoch), each batch
right-padded to its longest row. Loss: the Transformers model's own mean cross-entropy over the
batch's answer tokens. Learning rate, schedule (Transformers' `get_scheduler`, warmup rounded up
as in Transformers), weight decay and clipping are the task's. The trained model is saved as a
standard Hugging Face folder (weights in fp32, tokenizer and chat template beside them), which
the scorer loads like any base.
"""

from __future__ import annotations

import contextlib
import math


def train_full(job: dict, clock) -> dict:
    """Train every weight; return the worker's result (see quality_workers.train_loratune)."""
    import torch
    from quality_workers import size_on_disk
    from transformers import AutoModelForCausalLM, get_scheduler

    from loratune.data import DataConfig
    from loratune.data.batching import collate, plan_batches
    from loratune.data.build import tokenize_rows
    from loratune.data.sources import read_file
    from loratune.tools.loading import load_tokenizer

    hp = job["hp"]
    clock.restart()
    torch.manual_seed(hp["seed"])
    tokenizer = load_tokenizer(job["model_dir"])
    examples, _, _ = tokenize_rows(read_file(job["train_file"]),
                                   DataConfig(max_seq_length=hp["max_seq_length"]), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    lengths = [len(ex["input_ids"]) for ex in examples]
    gas, bs = hp["gradient_accumulation_steps"], hp["per_device_train_batch_size"]

    def plan(epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps, each a list of micro-batches (lists of example indices)."""
        micro = plan_batches(lengths, bs, hp["seed"], epoch)
        return [micro[i:i + gas] for i in range(0, len(micro), gas)]

    total = math.ceil(hp["num_train_epochs"] * len(plan(0)))
    warmup = math.ceil(total * hp["warmup_ratio"])  # rounded up, as Transformers and loratune do
    scheduler = get_scheduler(hp["lr_scheduler_type"], optimizer, num_warmup_steps=warmup,
                              num_training_steps=total)
    device_type = next(model.parameters()).device.type
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if job["bf16"]
                else contextlib.nullcontext())
    losses, step, epoch = [], 0, 0
    while step < total:
        for group in plan(epoch):
            if step == total:
                break
            step_loss = 0.0
            for indices in group:
                batch = collate([examples[i] for i in indices], packing=False,
                                pad_token_id=tokenizer.pad_token_id, max_seq_length=hp["max_seq_length"])
                with autocast:
                    loss = model(**batch, use_cache=False).loss / len(group)
                loss.backward()
                step_loss += float(loss)
            if hp["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step += 1
        epoch += 1
    model.save_pretrained(job["out_dir"])
    tokenizer.save_pretrained(job["out_dir"])
    train_s = clock.train_seconds()
    window = losses[-hp["logging_steps"]:]  # the last logging window, as the trainers report it
    return {"train_s": train_s, "final_loss": sum(window) / len(window), "steps": step,
            "model_dir": job["out_dir"], "size_bytes": size_on_disk(job["out_dir"]),
            "dtype": "bf16 autocast, fp32 weights" if job["bf16"] else "fp32", "curve": []}
