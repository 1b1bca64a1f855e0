"""Two processes under torchrun: DDP (every rank holds the whole base) against FSDP2 (`fsdp: true`).

    python bench/distributed.py                       # the benchmark model, 30 layers
    python bench/distributed.py --layers 8 --seq 128  # smaller: a couple of minutes on 2 cores
    python bench/distributed.py --no-write            # print the table, leave BENCHMARKS.md alone

`make bench-distributed` runs the first.

Model: train_speed.py's SmolLM-135M-shaped Llama with random weights (bf16 safetensors, `--layers`
decoder layers), LoRA r=16, alpha=32, dropout 0 on the 7 projections, AdamW lr 1e-4; rows of
`--seq` random token ids, 4 per micro-batch per process (a global batch of 8). Each contender is
`loratune train` under `torchrun --standalone --nproc_per_node 2` with the trainer's defaults, one
thread per process. Tokens/s is the trainer's own per-step figure (all ranks' tokens over the step's
time), median over the steps after the warm-up; peak RSS per rank is what the trainer records
(ru_maxrss of each process, loading included). The two contenders run one after the other, so load
from other jobs can favour either: the table gives the load average around each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import train_speed  # bench/ is on sys.path: this file is always run as a script

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- distributed:start -->", "<!-- distributed:end -->"
CONTENDERS = {"DDP": {}, "FSDP2": {"fsdp": True}}
BATCH = 4


def prepare(workdir: Path, layers: int, seq: int, n_rows: int) -> tuple[str, str]:
    """Write the random model (bf16 safetensors, tiny-llama tokenizer) and the rows; return both paths."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_dir = workdir / "model"
    torch.manual_seed(0)
    config = LlamaConfig(**{**train_speed.MODEL, "num_hidden_layers": layers})
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "src/loratune/presets/tiny-llama" / name, model_dir / name)
    rng = random.Random(0)
    rows = workdir / "rows.jsonl"
    with open(rows, "w") as fh:
        for _ in range(n_rows):
            ids = [rng.randrange(3, config.vocab_size) for _ in range(seq)]
            fh.write(json.dumps({"input_ids": ids}) + "\n")
    return str(model_dir), str(rows)


def run_contender(name: str, model_dir: str, rows: str, workdir: Path, steps: int, seq: int) -> dict:
    """Train `steps` steps under torchrun with 2 processes; return its metrics and wall time."""
    out = workdir / name
    config = {"model_name_or_path": model_dir, "train_file": rows, "output_dir": str(out),
              "target_modules": train_speed.PROJECTIONS, **train_speed.LORA, "learning_rate": train_speed.LR,
              "per_device_train_batch_size": BATCH, "max_seq_length": seq, "max_steps": steps,
              "logging_steps": 1, "save_steps": 0, "num_threads": 1, "disable_tqdm": True,
              **CONTENDERS[name]}
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loratune.cli.main", "train", str(path)]
    load_before, started = os.getloadavg()[0], time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    return {"name": name, "records": train, "wall_s": time.perf_counter() - started,
            "loads": (load_before, os.getloadavg()[0])}


def render(results: list[dict], args, command: str, started: str) -> str:
    rows = []
    base = None
    for res in results:
        rates = [r["tokens_per_s"] for r in res["records"][args.warmup_steps:]]
        tok_s = statistics.median(rates)
        peaks = res["records"][-1]["peak_rss_mib"]
        base = base or (tok_s, max(peaks))
        rows.append(f"| {res['name']} | {tok_s:,.0f} | {tok_s / base[0]:.2f}x | "
                    f"{' / '.join(f'{p:,.0f}' for p in peaks)} | {max(peaks) / base[1]:.2f}x | "
                    f"{len(rates)} | {(max(rates) - min(rates)) / tok_s:.0%} | {res['wall_s']:.0f} |")
    loads = ", ".join(f"{r['name']}: {r['loads'][0]:.1f}/{r['loads'][1]:.1f}" for r in results)
    return (
        "## Two processes: DDP vs FSDP2 (CPU, gloo)\n\n"
        f"`{command}` — {started}, {train_speed.machine()}.\n\n"
        f"SmolLM-135M-shaped Llama, {args.layers} layers, random bf16 weights; LoRA r=16, alpha=32, "
        f"dropout 0, 7 projections; rows of {args.seq} tokens, {BATCH} per process and step (global batch "
        f"{2 * BATCH}); `loratune train` under `torchrun --nproc_per_node 2`, one thread per process, "
        f"{args.steps} steps. Tokens/s: median over the steps after {args.warmup_steps} warm-up steps "
        "(all ranks' tokens); peak RSS per rank as the trainer records it (loading included).\n\n"
        "| contender | tokens/s | vs DDP | peak RSS per rank (MiB) | RSS vs DDP | steps | spread "
        "| wall (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows) + "\n\n"
        f"1-minute load average before/after each contender (2 cores): {loads}.\n\n"
        "FSDP2 gathers every decoder layer twice a step (forward and backward), each gather a rendezvous "
        "of the processes, where DDP all-reduces the adapter's gradients once; on CPU (gloo over "
        "loopback) that costs speed. Each rank keeps half of the decoder layers' weights; the root's "
        "(embeddings, tied LM head) are gathered for the whole step. FSDP2 is there to fit a base that "
        "DDP cannot hold (docs/distributed.md).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=train_speed.MODEL["num_hidden_layers"])
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python bench/distributed.py " + " ".join(sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="loratune-bench-dist-") as tmp:
        workdir = Path(tmp)
        model_dir, rows = prepare(workdir, args.layers, args.seq, n_rows=2 * BATCH * (args.steps + 1))
        results = [run_contender(name, model_dir, rows, workdir, args.steps, args.seq) for name in CONTENDERS]
    text = render(results, args, command.strip(), started)
    print(text)
    if not args.no_write:
        train_speed.write_section(text, ROOT / "BENCHMARKS.md", (MARK_START, MARK_END))


if __name__ == "__main__":
    main()
