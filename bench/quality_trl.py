"""The TRL + PEFT contender of bench/quality.py: `SFTTrainer` with a PEFT `LoraConfig`, as users run it.

Needs the `bench` extra (`pip install -e '.[bench]'`: trl; peft comes with `dev`). Settings match
the loratune job key by key: epochs, batch size, gradient accumulation, learning rate, schedule
and warmup (`warmup_steps` below 1 is a ratio in Transformers 5), weight decay, clipping, seed,
max_length = max_seq_length, r / lora_alpha / lora_dropout / target_modules. The
base is loaded in bf16 where the device has native bf16 (with `bf16=True`, as loratune's frozen
base) and fp32 elsewhere; PEFT keeps the LoRA weights in fp32 either way.

Loss on the answer only: each `messages` row becomes a conversational prompt-completion row
(prompt = every turn but the last, completion = the last assistant turn), for which TRL's
`completion_only_loss` (on by default there) masks the prompt. The token ids and the trained
tokens are exactly loratune's: the chat template's prompt, then the answer, `<|im_end|>` and the
newline trained (tests/test_bench_quality.py checks both tasks).
`assistant_only_loss` would need `{% generation %}` markers, which SmolLM2's template lacks.
TRL's own defaults that would change what is compared are set off: gradient checkpointing (TRL
turns it on; loratune does not) and packing (TRL's default; loratune packs without changing the
examples per step, TRL pads each batch of 8 to its longest row, which costs it ~10% on these rows).
"""

from __future__ import annotations

import json


def prompt_completion(row: dict) -> dict:
    """A `messages` row as TRL's conversational prompt-completion row (loss on the last turn only)."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def train_trl(job: dict, clock) -> dict:
    """Train with TRL's SFTTrainer; return the worker's result (see quality_workers.train_loratune)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from quality_workers import size_on_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    hp = job["hp"]
    clock.restart()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"],
                                                 dtype=torch.bfloat16 if job["bf16"] else torch.float32)
    with open(job["train_file"], encoding="utf-8") as fh:
        dataset = Dataset.from_list([prompt_completion(json.loads(line)) for line in fh if line.strip()])
    config = SFTConfig(
        output_dir=job["out_dir"], num_train_epochs=hp["num_train_epochs"],
        per_device_train_batch_size=hp["per_device_train_batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"], learning_rate=hp["learning_rate"],
        lr_scheduler_type=hp["lr_scheduler_type"], warmup_steps=hp["warmup_ratio"],
        weight_decay=hp["weight_decay"], max_grad_norm=hp["max_grad_norm"], seed=hp["seed"],
        logging_steps=1, max_length=hp["max_seq_length"], packing=False,
        completion_only_loss=True, gradient_checkpointing=False, bf16=job["bf16"], save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=hp["r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=hp["target_modules"], task_type="CAUSAL_LM")
    callbacks = [exact_match_callback(job["curve"], tokenizer, hp, clock)] if job["curve"] else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=callbacks)
    trainer.train()
    trainer.save_model(job["out_dir"])
    train_s = clock.train_seconds()
    # logged every step, so the last window is the task's logging_steps, as loratune logs it
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h][-hp["logging_steps"]:]
    return {"train_s": train_s, "final_loss": sum(losses) / len(losses) if losses else None,
            "steps": trainer.state.global_step, "model_dir": job["out_dir"],
            "size_bytes": size_on_disk(job["out_dir"]), "dtype": "bf16" if job["bf16"] else "fp32",
            "curve": clock.points}


def exact_match_callback(curve: dict, tokenizer, hp: dict, clock):
    """A TrainerCallback scoring greedy exact match where loratune's trainer does: every
    `eval_steps` steps and at the last step, with the same function, rows and batch size.
    """
    from transformers import TrainerCallback

    from loratune.tools.evaluation import default_max_new_tokens, exact_match, load_answer_rows

    rows = load_answer_rows(curve["file"], tokenizer)
    max_new = default_max_new_tokens(tokenizer, rows)

    class ExactMatchCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % curve["eval_steps"] == 0 or step == state.max_steps:
                clock.measure(step, lambda: exact_match(model, tokenizer, rows, max_new_tokens=max_new,
                                                        batch_size=hp["per_device_train_batch_size"]).accuracy)

    return ExactMatchCallback()
