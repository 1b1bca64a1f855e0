"""The processes of bench/quality.py: one job each, read from a JSON file, answered in another.

    python bench/quality_workers.py JOB.json     # run by bench/quality.py, never by hand

A job is {"kind": "train", "contender": ...} or {"kind": "score", ...}; the result JSON goes to
job["result"] and always holds the process's peak RSS. Training jobs time themselves with an
`EvalClock`, so the seconds spent scoring learning-curve points are not counted as training.
The loratune contenders live here; TRL in quality_trl.py, the full fine-tune in quality_full.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from train_speed import peak_rss_mib  # bench/ is on sys.path: the driver runs this file as a script


class EvalClock:
    """Wall time since the job started with the evals taken out, and the curve points they measured."""

    def __init__(self):
        self.start = time.perf_counter()
        self.eval_s = 0.0
        self.points: list[dict] = []

    def restart(self) -> None:
        """Start counting now (after the imports, which no contender's wall time includes)."""
        self.start, self.eval_s, self.points = time.perf_counter(), 0.0, []

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_s

    def measure(self, step: int, evaluate) -> float:
        """Call `evaluate()` (returns exact match in [0, 1]) off the clock; record the point; return it."""
        at, t = self.train_seconds(), time.perf_counter()
        value = evaluate()
        self.eval_s += time.perf_counter() - t
        self.points.append({"step": step, "train_s": at, "exact_match": value})
        return value


def size_on_disk(folder: str) -> int:
    """Bytes of the weight files in `folder` (*.safetensors): the adapter, or the full model."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def train_loratune(job: dict, clock: EvalClock) -> dict:
    """`loratune.train.run` on the task's YAML, with only the bench's data, epochs and output changed.

    The curve points come from the trainer's own eval keys; `loop._evaluate_and_log` is wrapped
    (the trainer has no eval hook) to take their time off the clock and read the exact match.
    """
    from loratune.train import loop, run

    evaluate_and_log = loop._evaluate_and_log

    def timed(model, tokenizer, datasets, cfg, env, metrics, step, *rest):
        out = {}

        def evaluate() -> float:
            out.update(evaluate_and_log(model, tokenizer, datasets, cfg, env, metrics, step, *rest))
            return out["eval_exact_match"]

        clock.measure(step, evaluate)
        return out

    loop._evaluate_and_log = timed
    overrides = {"train_file": job["train_file"], "output_dir": job["out_dir"],
                 "num_train_epochs": job["hp"]["num_train_epochs"], "save_steps": 0, "disable_tqdm": True}
    if job["contender"] == "loratune-nf4":
        overrides["load_in_4bit"] = True
    if job["threads"]:
        overrides["num_threads"] = job["threads"]
    if job["curve"]:
        overrides |= {"eval_file": job["curve"]["file"], "eval_steps": job["curve"]["eval_steps"],
                      "eval_metric": "exact_match"}
    clock.restart()
    result = run(job["yaml"], **overrides)
    train_s = clock.train_seconds()
    dtype = "nf4 + " if job["contender"] == "loratune-nf4" else ""
    return {"train_s": train_s, "final_loss": result.final_loss, "steps": result.step,
            "model_dir": result.adapter_dir, "size_bytes": size_on_disk(result.adapter_dir),
            "dtype": dtype + ("bf16" if job["bf16"] else "fp32"), "curve": clock.points}


def score(job: dict) -> dict:
    """Exact match of one model on each file, as `loratune eval --metric exact_match` computes it.

    Every row's answer is written next to the result (answers_<split>.jsonl) for reading misses.
    """
    from loratune.tools.evaluation import exact_match, load_answer_rows
    from loratune.tools.load_trained import load_model

    loaded = load_model(job["model"], job["adapter"], dtype="auto")
    out = {}
    for split, path in job["files"].items():
        rows = load_answer_rows(path, loaded.tokenizer)
        start = time.perf_counter()
        result = exact_match(loaded.model, loaded.tokenizer, rows, batch_size=job["batch_size"])
        out[split] = {"correct": result.correct, "n": result.n, "seconds": time.perf_counter() - start}
        answers = Path(job["result"]).with_name(f"answers_{split}.jsonl")
        answers.write_text("".join(json.dumps({"expected": r.expected, "answer": r.answer,
                                               "correct": r.correct}) + "\n" for r in result.records))
    return out


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    if job["kind"] == "score":
        out = score(job)
    else:
        clock = EvalClock()
        if job["contender"] == "trl-peft":
            from quality_trl import train_trl
            out = train_trl(job, clock)
        elif job["contender"] == "full":
            from quality_full import train_full
            out = train_full(job, clock)
        else:
            out = train_loratune(job, clock)
    out["peak_rss_mib"] = peak_rss_mib()
    Path(job["result"]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
