"""The table, the targets and the learning curve of bench/quality.py, as Markdown (pure functions).

A row is a dict: task, contender, and either "error" or dtype, test / test_ood ({"correct", "n"}),
steps (optimizer steps), final_loss, train_s, tokens_per_s, peak_rss_mib, size_bytes, curve (None
where a column does not apply: the base model trains nothing). Exact match is shown in percent;
targets compare percentage points.

Targets (issue #15): loratune's exact match at least TRL + PEFT's minus 2 points on every task and
split, in at most half its wall time; NF4 QLoRA at most 3 points below LoRA; LoRA at most 3 points
below full fine-tuning. The time to reach the curve threshold is reported as a ratio, no target.
"""

from __future__ import annotations

from train_speed import write_section as _write_section

SPLITS = ("test", "test_ood")
MARKS = ("<!-- quality:start -->", "<!-- quality:end -->")
TARGETS = {"vs_trl_points": 2.0, "vs_trl_time": 0.5, "nf4_points": 3.0, "full_points": 3.0}
CURVE_NAMES = ("loratune", "trl-peft")


def table_row(task: str, contender: str, trained: dict | None, scores: dict, tokens: float) -> dict:
    """One row of the table from a training result (None for the base model) and its scores."""
    row = {"task": task, "contender": contender, "dtype": trained["dtype"] if trained else "-",
           **{s: {"correct": scores[s]["correct"], "n": scores[s]["n"]} for s in SPLITS},
           "final_loss": None, "train_s": None, "tokens_per_s": None, "peak_rss_mib": None,
           "size_bytes": None, "steps": None, "curve": []}
    if trained:
        keys = ("final_loss", "train_s", "peak_rss_mib", "size_bytes", "steps", "curve")
        row |= {k: trained[k] for k in keys}
        row["tokens_per_s"] = tokens / trained["train_s"] if trained["train_s"] else None
    return row


def percent(cell: dict) -> float:
    return 100.0 * cell["correct"] / cell["n"] if cell["n"] else 0.0


def format_size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "-"
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> list[str]:
    """The main table: one line per task and contender (a failed one says where its log is)."""
    lines = ["| task | contender | dtype | test EM | test_ood EM | steps | final train loss | train wall (s) "
             "| tokens/s | peak RSS (MiB) | size on disk |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['contender']} | failed: {r['error']} ||||||||")
            continue
        em = [f"{percent(r[s]):.1f}% ({r[s]['correct']}/{r[s]['n']})" for s in SPLITS]
        lines.append(f"| {r['task']} | {r['contender']} | {r['dtype']} | {em[0]} | {em[1]} "
                     f"| {_num(r['steps'], 'd')} | {_num(r['final_loss'], '.4f')} "
                     f"| {_num(r['train_s'], '.0f')} | {_num(r['tokens_per_s'], '.0f')} "
                     f"| {_num(r['peak_rss_mib'], '.0f')} "
                     f"| {format_size(r['size_bytes'])} |")
    return lines


def verdicts(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """(target, met, figures) for every target whose contenders ran without error, per task and split."""
    found = {(r["task"], r["contender"]): r for r in rows if "error" not in r}
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lt, trl = found.get((task, "loratune")), found.get((task, "trl-peft"))
        nf4, full = found.get((task, "loratune-nf4")), found.get((task, "full"))
        for split in SPLITS:
            if lt and trl:
                out.append(_points(f"{task} {split}: loratune >= TRL + PEFT - {TARGETS['vs_trl_points']:g}",
                                   lt[split], trl[split], TARGETS["vs_trl_points"]))
            if lt and nf4:
                out.append(_points(f"{task} {split}: NF4 QLoRA >= LoRA - {TARGETS['nf4_points']:g}",
                                   nf4[split], lt[split], TARGETS["nf4_points"]))
            if lt and full:
                out.append(_points(f"{task} {split}: LoRA >= full fine-tuning - {TARGETS['full_points']:g}",
                                   lt[split], full[split], TARGETS["full_points"]))
        if lt and trl and lt["train_s"] and trl["train_s"]:
            ratio = lt["train_s"] / trl["train_s"]
            out.append((f"{task}: loratune wall time <= {TARGETS['vs_trl_time']:g}x TRL + PEFT's",
                        ratio <= TARGETS["vs_trl_time"],
                        f"{lt['train_s']:.0f} s vs {trl['train_s']:.0f} s = {ratio:.2f}x"))
    return out


def _points(target: str, mine: dict, ref: dict, margin: float) -> tuple[str, bool, str]:
    diff = percent(mine) - percent(ref)
    return target, diff >= -margin, f"{percent(mine):.1f}% vs {percent(ref):.1f}% ({diff:+.1f} points)"


def time_to_threshold(points: list[dict], threshold: float) -> float | None:
    """Training seconds at the first curve point whose exact match reaches `threshold` (None: never)."""
    for p in sorted(points, key=lambda p: p["step"]):
        if p["exact_match"] >= threshold:
            return p["train_s"]
    return None


def format_curve(task: str, curves: dict[str, list[dict]], rows: int, threshold: float) -> list[str]:
    """The learning-curve table (training seconds and exact match per eval step) and the time ratio."""
    names = [n for n in CURVE_NAMES if curves.get(n)]
    steps = sorted({p["step"] for n in names for p in curves[n]})
    lines = [f"Learning curve on {task} (greedy exact match on the first {rows} test rows, training "
             "seconds at each eval, scoring time excluded):", "",
             "| step | " + " | ".join(f"{n} s | {n} EM" for n in names) + " |",
             "|---:|" + "---:|---:|" * len(names)]
    for step in steps:
        cells = []
        for n in names:
            p = next((p for p in curves[n] if p["step"] == step), None)
            cells += ["-", "-"] if p is None else [f"{p['train_s']:.0f}", f"{100 * p['exact_match']:.0f}%"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", _reach_line(curves, names, threshold)]
    # Where one never reaches the threshold, the best level both reach still gives a ratio.
    level = min((max(p["exact_match"] for p in curves[n]) for n in names), default=0.0)
    if len(names) == 2 and 0 < level < threshold:
        lines += ["", _reach_line(curves, names, level)]
    return lines


def _reach_line(curves: dict[str, list[dict]], names: list[str], level: float) -> str:
    reach = {n: time_to_threshold(curves[n], level) for n in names}
    said = ", ".join(f"{n} {'not reached' if t is None else f'{t:.0f} s'}" for n, t in reach.items())
    ratio = ""
    if len(names) == 2 and None not in reach.values() and reach["trl-peft"]:
        ratio = f"; loratune / TRL = {reach['loratune'] / reach['trl-peft']:.2f}x"
    return f"Time to reach {100 * level:.0f}% exact match on those rows: {said}{ratio}."


def render(rows: list[dict], curves: dict[str, dict[str, list[dict]]], meta: dict) -> str:
    """The whole BENCHMARKS.md section."""
    plans = meta["plans"]
    threads = (f"{meta['threads']} thread(s) per training process" if meta["threads"]
               else "torch's default thread count")
    lines = ["## Learning quality on the real model: SmolLM2-135M-Instruct (CPU)", "",
             f"`{meta['command']}` — {meta['started']}, {meta['machine']}, {threads}; "
             f"{meta['minutes']:.0f} minutes in all.", ""]
    lines += [f"- {task_line(p)}" for p in plans]
    full_lr = meta.get("full_learning_rate")
    lines += ["", "Every contender: the same rows, epochs, batch, learning rate and schedule, loss on the "
              "answer tokens only; the full fine-tune uses "
              + (f"lr {full_lr:g}." if full_lr else "the same learning rate.")
              + " Exact match: loratune's scorer on every model (greedy, answer stripped, equal to the "
              "expected one). Wall time: job start to saved weights; tokens/s: real tokens x epochs / "
              "wall time; final train loss: the mean over the last logging window.", ""]
    lines += format_table(rows)
    checked = verdicts(rows)
    lines += ["", "Targets:" if checked else "Targets: none checked (a contender they compare is missing).",
              ""]
    lines += [f"- {'met' if ok else 'MISSED'}: {target} ({figures})" for target, ok, figures in checked]
    for task, per in curves.items():
        plan = next(p for p in plans if p["task"] == task)
        lines += [""] + format_curve(task, per, plan["curve"]["rows"], plan["curve"]["threshold"])
    load = meta["load"]
    lines += ["", f"1-minute load average before/after: {load[0]:.1f}/{load[1]:.1f}. The training jobs run "
              "one after another: above the core count, other jobs shared the CPU and the times of some "
              "contenders may be inflated more than others'."]
    return "\n".join(lines) + "\n"


def task_line(plan: dict) -> str:
    """What one task trained on and with which settings."""
    h, n = plan["hp"], plan["counts"]
    return (f"{plan['task']}: {n['train']} training rows ({plan['tokens']} tokens), epochs "
            f"{h['num_train_epochs']:g} = {plan['steps']} steps of batch "
            f"{h['per_device_train_batch_size']} x {h['gradient_accumulation_steps']}, lr "
            f"{h['learning_rate']:g} {h['lr_scheduler_type']} (warmup {h['warmup_ratio']:g}), LoRA "
            f"r={h['r']} alpha={h['lora_alpha']:g} dropout {h['lora_dropout']:g} {h['target_modules']}; "
            f"test {n['test']} rows, test_ood {n['test_ood']} rows.")


def write_section(text: str, path) -> None:
    """Replace the quality section of BENCHMARKS.md (append it if absent), keeping the others."""
    _write_section(text, path, MARKS)
