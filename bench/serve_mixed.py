"""Decode throughput of one batch of 16 requests spread over 1, 4 and 16 distinct adapters.

    python bench/serve_mixed.py [--model preset:tiny-llama] [--new-tokens 64] [--rank 8] [--threads 1]

Ours: the serving engine (continuous batching, per-row gathered LoRA, KV cache), 16 requests
submitted at once. Baseline: PEFT + Transformers `generate(adapter_names=[...])` on the same batch
(same prompts, same adapters saved once in PEFT format, greedy, EOS ignored so every row decodes
exactly --new-tokens tokens). Throughput = generated tokens / wall time of the whole batch
(prefill included for both), best of --repeats. Targets: 16 distinct adapters >= 0.6x our
single-adapter throughput and >= 3x PEFT. Also checks that both produce the same tokens.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import threading
import time
from pathlib import Path

import torch

from loratune import LoraConfig, get_peft_model
from loratune.serve.engine import Engine, GenerationRequest
from loratune.serve.lora_rows import linear_shapes
from loratune.serve.registry import prepare_adapter
from loratune.serve.sampling import SamplingParams
from loratune.tools.loading import load_base_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapters(base, n: int, rank: int, root: Path) -> list[Path]:
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(base), config)
        model.save_pretrained(str(root / f"a{i}"))
        paths.append(root / f"a{i}")
    return paths


def run_engine(engine: Engine, prompts, adapter_ids, new_tokens: int) -> tuple[float, list[list[int]]]:
    outputs = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(kind, value):
            if kind == "token":
                outputs[i].append(value)
            else:
                done.release()
        return sink

    start = time.perf_counter()
    for i, (prompt, adapter_id) in enumerate(zip(prompts, adapter_ids)):
        params = SamplingParams(max_tokens=new_tokens, temperature=0)
        engine.submit(GenerationRequest(prompt, adapter_id, params, sink_for(i)))
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - start, outputs


def run_peft(model, prompts, names, new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="preset:tiny-llama")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft  # the baseline; a dev dependency only

    base = load_base_model(args.model, dtype="float32")
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, vocab, (args.batch, args.prompt_tokens), generator=g).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(base, args.batch, args.rank, Path(tmp))
        engine = Engine(copy.deepcopy(base), eos_token_ids=set(),
                        context_length=base.config.max_position_embeddings,
                        max_batch_size=args.batch, max_queue=4 * args.batch, num_threads=args.threads)
        engine.start()
        shapes = linear_shapes(engine.model)
        for i, path in enumerate(paths):
            engine.install_adapter(i + 1, prepare_adapter(path.name, path, shapes, torch.float32)).result()
        no_eos = copy.deepcopy(base)
        no_eos.generation_config.eos_token_id = None  # like the engine run: every row decodes new_tokens
        reference = peft.PeftModel.from_pretrained(no_eos, str(paths[0]), adapter_name="a0").eval()
        for path in paths[1:]:
            reference.load_adapter(str(path), adapter_name=path.name)

        rows = []
        for distinct in (1, 4, 16):
            per = args.batch // distinct
            adapter_index = [i // per for i in range(args.batch)]
            ours_t, peft_t, same = [], [], True
            run_engine(engine, prompts, [i + 1 for i in adapter_index], 4)  # warm-up
            for _ in range(args.repeats):
                t, ours_tokens = run_engine(engine, prompts, [i + 1 for i in adapter_index], args.new_tokens)
                ours_t.append(t)
                t, peft_tokens = run_peft(reference, prompts,
                                          [f"a{i}" for i in adapter_index], args.new_tokens)
                peft_t.append(t)
                same = same and ours_tokens == peft_tokens
            tokens = args.batch * args.new_tokens
            rows.append((distinct, tokens / min(ours_t), tokens / min(peft_t), same))
        engine.stop()

    single = rows[0][1]
    print(f"\nserve_mixed: {args.model}, batch {args.batch}, {args.prompt_tokens} prompt + "
          f"{args.new_tokens} new tokens per row, LoRA r={args.rank} on {len(TARGETS)} projections, fp32, "
          f"{args.threads} thread(s), "
          f"best of {args.repeats}\n")
    print("| distinct adapters | loratune serve tok/s | PEFT adapter_names tok/s | loratune / PEFT "
          "| vs 1 adapter | same tokens |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for distinct, ours, base_tps, same in rows:
        print(f"| {distinct} | {ours:.0f} | {base_tps:.0f} | {ours / base_tps:.2f}x | {ours / single:.2f}x "
              f"| {'yes' if same else 'NO'} |")
    sixteen = rows[-1]
    ok = sixteen[1] / single >= 0.6 and sixteen[1] / sixteen[2] >= 3
    print(f"\ntargets (16 distinct >= 0.6x single, >= 3x PEFT): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
