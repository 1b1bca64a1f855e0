"""bench/quality.py: its flags, its plan, the targets it checks and the BENCHMARKS.md section it writes.

The default tests cover the pure pieces offline; the slow test runs `bench/quality.py --quick` end to
end on the packaged SmolLM2-135M-Instruct (every contender trains a couple of steps and is scored).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import quality_report as report  # noqa: E402
from quality_trl import prompt_completion  # noqa: E402

ROWS = {"test": {"correct": 90, "n": 100}, "test_ood": {"correct": 30, "n": 60}}


def _row(contender: str, test: int, ood: int, train_s: float | None = 100.0, task: str = "orders") -> dict:
    trained = None if train_s is None else {
        "dtype": "bf16", "final_loss": 0.05, "train_s": train_s, "peak_rss_mib": 3000.0,
        "size_bytes": 19_593_064, "steps": 60, "curve": []}
    scores = {"test": {"correct": test, "n": 100}, "test_ood": {"correct": ood, "n": 60}}
    return report.table_row(task, contender, trained, scores, tokens=48_000)


# ----- flags ---------------------------------------------------------------------------------------

def test_the_full_run_covers_every_task_and_contender_with_all_rows():
    args = quality.parse_args([])
    assert args.tasks == ["orders", "sql"]
    assert args.contenders == list(quality.CONTENDERS)
    assert (args.rows, args.test_rows, args.epochs, args.threads) == (0, 0, None, 0)
    assert args.curve_task == "orders" and not args.no_write


def test_quick_is_small_touches_no_benchmarks_file_and_a_given_flag_wins():
    args = quality.parse_args(["--quick", "--test_rows", "3"])
    assert args.tasks == ["orders"]
    assert (args.rows, args.test_rows, args.epochs, args.threads) == (16, 3, 1.0, 1)
    assert args.no_write


def test_bad_flags_are_reported_together(capsys):
    with pytest.raises(SystemExit) as exc:
        quality.parse_args(["--tasks", "orders,poems", "--contenders", "loratune,axolotl", "--rows", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "poems" in err and "axolotl" in err and "--rows must be >= 0" in err


def test_curve_none_turns_the_learning_curve_off():
    assert quality.parse_args(["--curve_task", "none"]).curve_task is None


# ----- the plan ------------------------------------------------------------------------------------

def test_task_settings_are_the_yaml_plus_the_trainer_defaults():
    hp = quality.task_settings("orders", epochs=None)
    assert hp["learning_rate"] == 1e-3 and hp["num_train_epochs"] == 1 and hp["r"] == 64
    assert hp["lr_scheduler_type"] == "cosine" and hp["warmup_ratio"] == 0.03  # not in the YAML: defaults
    assert quality.task_settings("orders", epochs=2.0)["num_train_epochs"] == 2.0


def test_steps_and_curve_points_follow_rows_batch_and_epochs():
    hp = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_train_epochs": 2.0}
    assert quality.total_steps(240, hp) == 60
    assert quality.total_steps(20, hp) == 6  # 8 + 8 + 4 rows per epoch
    assert quality.total_steps(240, {**hp, "gradient_accumulation_steps": 4}) == 16
    assert quality.curve_eval_steps(60, 4) == 15
    assert quality.curve_eval_steps(2, 4) == 1


def test_write_subset_keeps_the_first_rows(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(5)) + "\n")
    assert quality.write_subset(src, tmp_path / "a.jsonl", 2) == 2
    assert [json.loads(line)["i"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [0, 1]
    assert quality.write_subset(src, tmp_path / "b.jsonl", 0) == 5


def test_messages_become_a_conversational_prompt_completion_row():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert prompt_completion(row) == {"prompt": [{"role": "user", "content": "q"}],
                                      "completion": [{"role": "assistant", "content": "a"}]}


# ----- targets -------------------------------------------------------------------------------------

def test_targets_allow_exactly_their_margin_and_not_more():
    rows = [_row("loratune", 88, 30, train_s=50.0), _row("trl-peft", 90, 31, train_s=100.0),
            _row("loratune-nf4", 85, 27), _row("full", 91, 33)]
    got = {target: ok for target, ok, _ in report.verdicts(rows)}
    assert got["orders test: loratune >= TRL + PEFT - 2"]  # -2.0 points: met
    assert got["orders test_ood: loratune >= TRL + PEFT - 2"]  # -1.7 points
    assert got["orders test: NF4 QLoRA >= LoRA - 3"]  # -3.0
    assert not got["orders test_ood: NF4 QLoRA >= LoRA - 3"]  # -5.0
    assert got["orders test: LoRA >= full fine-tuning - 3"]  # -3.0
    assert not got["orders test_ood: LoRA >= full fine-tuning - 3"]  # -5.0
    assert got["orders: loratune wall time <= 0.5x TRL + PEFT's"]  # 0.50x


def test_a_slower_loratune_misses_the_time_target_and_missing_contenders_check_nothing():
    rows = [_row("loratune", 90, 30, train_s=51.0), _row("trl-peft", 90, 30, train_s=100.0)]
    got = {target: ok for target, ok, _ in report.verdicts(rows)}
    assert not got["orders: loratune wall time <= 0.5x TRL + PEFT's"]
    assert report.verdicts([_row("loratune", 90, 30), {"task": "orders", "contender": "trl-peft",
                                                       "error": "exit 1"}]) == []


def test_time_to_threshold_is_the_first_point_at_or_above_it():
    points = [{"step": 30, "train_s": 200.0, "exact_match": 0.9}, {"step": 15, "train_s": 100.0,
                                                                    "exact_match": 0.5}]
    assert report.time_to_threshold(points, 0.9) == 200.0
    assert report.time_to_threshold(points, 0.95) is None


def test_curve_gives_the_ratio_at_the_best_level_both_reach_when_one_misses_the_threshold():
    curves = {"loratune": [{"step": 15, "train_s": 60.0, "exact_match": 0.6},
                           {"step": 30, "train_s": 120.0, "exact_match": 0.8}],
              "trl-peft": [{"step": 15, "train_s": 150.0, "exact_match": 0.7},
                           {"step": 30, "train_s": 300.0, "exact_match": 0.9}]}
    text = "\n".join(report.format_curve("orders", curves, rows=30, threshold=0.9))
    assert "| 15 | 60 | 60% | 150 | 70% |" in text
    assert "Time to reach 90% exact match on those rows: loratune not reached, trl-peft 300 s." in text
    assert "Time to reach 80% exact match on those rows: loratune 120 s, trl-peft 300 s; " \
           "loratune / TRL = 0.40x." in text


# ----- the table and BENCHMARKS.md -------------------------------------------------------------------

def _meta() -> dict:
    hp = quality.task_settings("orders", epochs=None)
    plan = {"task": "orders", "hp": hp, "counts": {"train": 240, "test": 100, "test_ood": 60}, "steps": 60,
            "tokens": 24086, "curve": {"rows": 30, "threshold": 0.9}}
    return {"command": "python bench/quality.py", "started": "2026-12-07 03:00 UTC", "machine": "CPU X",
            "threads": 0, "load": (0.5, 1.0), "minutes": 50.0, "plans": [plan], "full_learning_rate": None}


def test_table_rows_show_exact_match_with_counts_and_failures_with_their_log():
    rows = [_row("base", 0, 0, train_s=None), _row("loratune", 90, 30),
            {"task": "orders", "contender": "full", "error": "exit 1, see x/log.txt"}]
    lines = report.format_table(rows)
    assert lines[2] == "| orders | base | - | 0.0% (0/100) | 0.0% (0/60) | - | - | - | - | - | - |"
    assert lines[3] == ("| orders | loratune | bf16 | 90.0% (90/100) | 50.0% (30/60) | 60 | 0.0500 | 100 "
                        "| 480 | 3000 | 18.7 MiB |")
    assert "failed: exit 1, see x/log.txt" in lines[4]


def test_the_section_replaces_only_its_own_part_of_benchmarks_md(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- train_speed:start -->\nspeed\n<!-- train_speed:end -->\n")
    rows = [_row("loratune", 90, 30, train_s=50.0), _row("trl-peft", 90, 30, train_s=100.0)]
    report.write_section(report.render(rows, {}, _meta()), path)
    first = path.read_text()
    assert first.startswith("# Benchmarks\n\n<!-- train_speed:start -->\nspeed\n<!-- train_speed:end -->\n")
    assert "<!-- quality:start -->\n## Learning quality" in first and first.endswith("<!-- quality:end -->\n")
    assert "- met: orders: loratune wall time <= 0.5x TRL + PEFT's (50 s vs 100 s = 0.50x)" in first
    report.write_section("## again\n", path)
    second = path.read_text()
    assert second.count("<!-- quality:start -->") == 1 and "## again" in second and "Learning" not in second
    assert "speed" in second


# ----- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_run_trains_and_scores_every_contender(tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed: pip install -e '.[bench]'")
    from loratune.errors import ConfigError
    from loratune.tools.loading import model_dir

    try:
        model_dir(quality.PRESET)
    except ConfigError as exc:
        pytest.skip(str(exc))
    proc = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == list(quality.CONTENDERS)
    assert all("error" not in r and r["test"]["n"] == 6 and r["test_ood"]["n"] == 6 for r in rows)
    assert all(r["train_s"] > 0 and r["size_bytes"] > 0 for r in rows if r["contender"] != "base")
    assert {r["contender"] for r in rows if r["curve"]} == {"loratune", "trl-peft"}
    assert "| orders | trl-peft |" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("task", ["orders", "sql"])
def test_trl_trains_on_the_same_tokens_and_answer_mask_as_loratune(task, tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed: pip install -e '.[bench]'")
    from loratune.data import DataConfig
    from loratune.data.build import tokenize_rows
    from loratune.data.sources import read_file
    from loratune.errors import ConfigError
    from loratune.tools.loading import load_tokenizer, model_dir

    try:
        folder = model_dir(quality.PRESET)
    except ConfigError as exc:
        pytest.skip(str(exc))
    data = tmp_path / "train.jsonl"
    quality.write_subset(quality.ROOT / "examples/tasks" / task / "train.jsonl", data, 8)
    tokenizer = load_tokenizer(quality.PRESET)
    ours, _, _ = tokenize_rows(read_file(data), DataConfig(max_seq_length=256), tokenizer)
    theirs = _trl_examples(folder, [json.loads(line) for line in data.read_text().splitlines()], tmp_path)
    assert [ex["input_ids"] for ex in theirs] == [ex["input_ids"] for ex in ours]
    trained = [[label != -100 for label in ex["labels"]] for ex in theirs]
    assert trained == [[label != -100 for label in ex["labels"]] for ex in ours]


def _trl_examples(folder: str, rows: list[dict], tmp_path: Path) -> list[dict]:
    """The tokenized rows an SFTTrainer set up as bench/quality_trl.py sets it up would train on."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(tmp_path / "trl"), max_length=256, packing=False, use_cpu=True,
                       completion_only_loss=True, gradient_checkpointing=False, bf16=False, report_to="none")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                         args=config, train_dataset=Dataset.from_list([prompt_completion(r) for r in rows]),
                         processing_class=AutoTokenizer.from_pretrained(folder),
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    return list(trainer.train_dataset)
