"""The training loop: `fit` reads top to bottom, one optimizer step per iteration.

Loss normalisation: every micro-batch backpropagates its *sum* of token losses; once a step's
micro-batches are done, the gradients are multiplied by world_size / N, where N is the number of
trained tokens in the whole step over all ranks (DDP already averaged over ranks, hence the
world_size). So a step's gradient is that of the mean loss per trained token, however the tokens
are split into micro-batches and processes; a run with gradient accumulation, or under torchrun,
follows the same trajectory as one big batch.

Data position: the batch plan of an epoch is a pure function of (seed, epoch, rank), so a
checkpoint only stores (epoch, batch_index) and resume re-plans and skips. Dropout draws from a
generator seeded by (seed, epoch, index of the micro-batch in the global plan), so the masks do not
depend on how many processes share the plan, nor on where a run was resumed (resume.py).

Sharded runs (fsdp: true) get their FSDP root from the caller (`runner`, fsdp.py): every rank then
runs every forward, evaluation and generation included, and the gradients are shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from loratune.data import collate, plan_batches, plan_id, split_by_tokens
from loratune.errors import LoratuneError, TrainingDivergedError
from loratune.memory import peak_rss_bytes
from loratune.tools.evaluation import default_max_new_tokens, exact_match, loss_sum_over, perplexity
from loratune.train import fsdp, resume
from loratune.train.config import TrainConfig
from loratune.train.distributed import (
    DistEnv,
    all_reduce_min,
    all_reduce_sum,
    broadcast_flag,
    data_parallel,
    gather_objects,
)
from loratune.train.loss import LossModule, token_loss_sum
from loratune.train.metrics import MetricsLog
from loratune.train.optim import build_optimizer, build_scheduler, trainable_parameters, warmup_steps_for
from loratune.train.resume import LogWindow, Position
from loratune.train.sampling import sample_generations

logger = logging.getLogger(__name__)
EVAL_SAMPLES = 2


@dataclass
class FitOutcome:
    """What `fit` hands back to `run`."""

    step: int
    total_steps: int
    interrupted: bool
    last_checkpoint: str | None
    train_tokens: int
    runtime_s: float
    eval_loss: float | None = None
    eval_exact_match: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0  # steps already done when this run began (> 0 when resumed)
    resumed_from: str | None = None
    peak_rss_mib: list[float] = field(default_factory=list)  # per rank, at the last step


def fit(
    model: nn.Module,
    tokenizer,
    datasets,
    cfg: TrainConfig,
    env: DistEnv,
    *,
    resume_path: str | None,
    metrics: MetricsLog,
    config_yaml: str,
    runner: nn.Module | None = None,
) -> FitOutcome:
    """Train the trainable parameters of `model` on `datasets.train`; return where it stopped.

    `runner` is the FSDP root around `model` of a sharded run (fsdp.shard_model); without one the
    model is trained as it is, wrapped in DDP under torchrun.

    Raises:
        TrainingDivergedError: a NaN/Inf loss or gradient; the step is not applied and the last
            good checkpoint is left in place.
    """
    op, lp, dc = cfg.optim, cfg.loop, cfg.data
    train_set, eval_set = datasets.train, datasets.eval
    lengths = [len(ex["input_ids"]) for ex in train_set]
    plan_digest = plan_id(lengths, op.per_device_train_batch_size, lp.seed)  # kept in checkpoints

    def plan(epoch: int) -> list[list[int]]:
        batches = plan_batches(lengths, op.per_device_train_batch_size, lp.seed, epoch, env.world_size,
                               env.rank)
        return batches[: all_reduce_min(len(batches), env)]  # every rank runs the same number of steps

    first_epoch = plan(0)
    steps_per_epoch = math.ceil(len(first_epoch) / op.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise LoratuneError("the training set yields no batch; add data")
    total_steps = lp.max_steps if lp.max_steps > 0 else math.ceil(lp.num_train_epochs * steps_per_epoch)

    optimizer = build_optimizer(model, op.learning_rate, op.weight_decay)
    scheduler = build_scheduler(optimizer, op.lr_scheduler_type,
                                warmup_steps_for(total_steps, op.warmup_ratio, op.warmup_steps),
                                total_steps)
    pos, window = Position(), LogWindow()
    if resume_path is not None:
        pos, window = resume.restore(resume_path, model, optimizer, scheduler, cfg, env, plan_digest)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, pos.step, pos.epoch,
                    pos.batch_index)
    params = [p for _, p in trainable_parameters(model)]
    logger.info("training %d steps (%d per epoch x %d process(es)), %s trainable parameters, %d examples",
                total_steps, steps_per_epoch, env.world_size, f"{sum(p.numel() for p in params):,}",
                len(train_set))
    if runner is None:
        runner = LossModule(model, token_loss_sum)
        if env.enabled:
            runner = data_parallel(runner, env)
    model.train()

    stop = _InterruptFlag(announce=env.is_main)
    bar = tqdm(total=total_steps, initial=pos.step, disable=not env.is_main or lp.disable_tqdm,
               desc="training", unit="step", dynamic_ncols=True)
    start_step, window_start = pos.step, time.perf_counter() - window.elapsed_s
    started, seen_tokens, last_ckpt, evals, peaks = time.perf_counter(), 0, resume_path, {}, []
    batches = first_epoch if pos.epoch == 0 else plan(pos.epoch)
    with stop.installed():
        while pos.step < total_steps:
            if pos.batch_index >= len(batches):  # next epoch
                pos.epoch, pos.batch_index = pos.epoch + 1, 0
                batches = plan(pos.epoch)
                continue
            group = batches[pos.batch_index: pos.batch_index + op.gradient_accumulation_steps]
            first = (lp.seed, pos.epoch, pos.batch_index * env.world_size + env.rank)  # global index
            loss_sum, n_trained, n_input = _accumulate(runner, train_set, lengths, group, dc, tokenizer, env,
                                                       first)
            loss_sum, n_trained, n_input = all_reduce_sum([loss_sum, n_trained, n_input], env)
            loss = loss_sum / max(n_trained, 1)
            grad_norm = _normalise_and_clip(params, n_trained, op.max_grad_norm, env)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                metrics.write({"step": pos.step + 1, "loss": str(loss), "grad_norm": str(grad_norm),
                               "diverged": True})
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
                raise _diverged(what, value, pos.step + 1, last_ckpt)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos.step, pos.batch_index = pos.step + 1, pos.batch_index + len(group)
            seen_tokens += int(n_input)
            window.losses.append(loss)
            window.tokens += int(n_input)

            now = time.perf_counter()
            tokens_per_s = window.tokens / max(now - window_start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            epoch_float = pos.epoch + pos.batch_index / max(len(batches), 1)
            if pos.step % lp.logging_steps == 0 or pos.step == total_steps:
                record = {"step": pos.step, "loss": sum(window.losses) / len(window.losses),
                          "learning_rate": lr, "tokens_per_s": tokens_per_s,
                          "epoch": round(epoch_float, 4), "grad_norm": grad_norm}
                if pos.step == total_steps:  # the last record also says how much memory each rank used
                    peaks = [round(b / 2**20, 1) for b in gather_objects(peak_rss_bytes(), env)]
                    record["peak_rss_mib"] = peaks
                metrics.write(record)
                window, window_start = LogWindow(), now
            if eval_set is not None and len(eval_set) and (
                (lp.eval_steps and pos.step % lp.eval_steps == 0) or pos.step == total_steps
            ):
                evals = _evaluate_and_log(model, tokenizer, datasets, cfg, env, metrics, pos.step, runner)
                window_start = time.perf_counter()  # eval time is not training throughput
            interrupted = broadcast_flag(stop.requested, env)
            saving = ((lp.save_steps and pos.step % lp.save_steps == 0 and pos.step < total_steps)
                      or interrupted)
            # never save NaN/inf weights
            if (saving or pos.step == total_steps) and not _all_finite(params, env):
                bar.close()
                metrics.write({"step": pos.step, "weights": "non-finite", "diverged": True})
                raise _diverged("the LoRA weights", "NaN or inf", pos.step, last_ckpt, applied=True)
            if saving:
                window.elapsed_s = time.perf_counter() - window_start
                last_ckpt = resume.save(model, optimizer, scheduler, pos, window, cfg, env, config_yaml,
                                        plan_digest)
            if interrupted:
                if env.is_main:
                    logger.warning("interrupted: saved %s; resume with --resume_from_checkpoint true",
                                   last_ckpt)
                break
    bar.close()
    return FitOutcome(step=pos.step, total_steps=total_steps, interrupted=pos.step < total_steps,
                      last_checkpoint=last_ckpt, train_tokens=seen_tokens,
                      runtime_s=time.perf_counter() - started, eval_loss=evals.get("eval_loss"),
                      eval_exact_match=evals.get("eval_exact_match"),
                      history=list(metrics.records),
                      start_step=start_step, resumed_from=resume_path, peak_rss_mib=peaks)


def _accumulate(runner: nn.Module, train_set, lengths: list[int], group: list[list[int]], dc, tokenizer,
                env: DistEnv, first: tuple[int, int, int]):
    """Forward/backward each micro-batch of one step; return (loss sum, trained tokens, input tokens).

    Gradients hold the un-normalised sum; DDP and FSDP sync only on the last pass. A packed
    micro-batch over `max_tokens_per_batch` runs as several passes (`split_by_tokens`), all in this
    step. Under FSDP, whose every forward gathers weights from all ranks, each rank makes as many
    passes as the busiest one: a rank with fewer repeats its first pass with the loss times zero (DDP
    ranks only meet in the last pass's backward, so they make their own count, at least one: a rank
    whose micro-batches are all empty runs one such spare pass). `first` is (seed, epoch, global index
    of the group's first micro-batch): it keys each pass's dropout.
    """
    seed, epoch, index = first
    passes = [(index + i * env.world_size, piece, j) for i, indices in enumerate(group)
              for j, piece in enumerate(_pieces(indices, lengths, dc))]
    # At least one pass, so that a rank with only an empty micro-batch still meets the others in the
    # gradient sync.
    n_passes = -all_reduce_min(-len(passes), env) if fsdp.is_sharded(runner) else max(len(passes), 1)
    spare = passes[0][:2] if passes else (index, [0])  # -1 below: a spare pass, weighed zero
    passes += [spare + (-1,)] * (n_passes - len(passes))
    loss_sum, n_trained, n_input = 0.0, 0, 0
    for n, (micro_index, indices, piece) in enumerate(passes):
        batch = collate([train_set[j] for j in indices], packing=dc.packing,
                        pad_token_id=tokenizer.pad_token_id, max_seq_length=dc.max_seq_length)
        batch = {k: v.to(env.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with _gradient_sync(runner, n == n_passes - 1, env), \
                _micro_batch_rng(seed, epoch, micro_index, max(piece, 0), env.device):
            micro_loss, micro_tokens = runner(batch)
            (micro_loss * (piece >= 0)).backward()
        if piece < 0:
            continue
        loss_sum += float(micro_loss.detach())
        n_trained += int(micro_tokens)
        mask = batch.get("attention_mask")
        n_input += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return loss_sum, n_trained, n_input


def _pieces(indices: list[int], lengths: list[int], dc) -> list[list[int]]:
    """A micro-batch as the passes it runs in: packed ones cut to max_tokens_per_batch, padded ones whole."""
    if not indices:  # a rank's empty micro-batch at the end of an epoch (data.plan_batches)
        return []
    if not dc.packing:
        return [indices]
    return split_by_tokens(indices, lengths, dc.max_seq_length, dc.max_tokens_per_batch)


def _gradient_sync(runner: nn.Module, last: bool, env: DistEnv):
    """Average gradients over ranks only in the last micro-batch's backward (DDP or FSDP)."""
    if fsdp.is_sharded(runner):
        runner.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last or not env.enabled else runner.no_sync()


@contextlib.contextmanager
def _micro_batch_rng(seed: int, epoch: int, index: int, piece: int, device: torch.device):
    """Draw this pass's random numbers (dropout) from a generator keyed by its micro-batch's place in the
    global plan and its piece of that micro-batch, and leave the process's generators as they were."""
    name = f"loratune-dropout:{seed}:{epoch}:{index}" + (f":{piece}" if piece else "")
    key = hashlib.blake2b(name.encode(), digest_size=8).digest()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int.from_bytes(key, "little") >> 1)
        yield


def _normalise_and_clip(params: list[nn.Parameter], n_trained: float, max_grad_norm: float,
                        env: DistEnv) -> float:
    """Turn summed gradients into per-trained-token ones, clip, and return the pre-clip norm.

    DDP and FSDP have already averaged over ranks, hence world_size / N rather than 1 / N. Sharded
    gradients give a sharded norm, made whole (a collective) before it is returned.
    """
    if n_trained > 0:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], env.world_size / n_trained)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _diverged(what: str, value, step: int, last_ckpt: str | None,
              applied: bool = False) -> TrainingDivergedError:
    keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    done = "stopped before saving them" if applied else "stopped without applying that step"
    return TrainingDivergedError(
        f"{what} became {value} at step {step}; {done}; {keep}. "
        "Try a lower learning_rate or max_grad_norm, then resume with --resume_from_checkpoint true."
    )


def _all_finite(params: list[nn.Parameter], env: DistEnv) -> bool:
    """True when no trainable weight holds NaN or inf on any rank (checked before anything is saved)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    return not broadcast_flag(not all(bool(torch.isfinite(t).all()) for t in local), env)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, eval_set, cfg: TrainConfig, env: DistEnv, *,
             sharded: bool = False) -> float:
    """Mean next-token loss per trained token over the eval set (all ranks together).

    Sharded: every rank must run as many forwards as the others, so a rank with one batch fewer
    scores a batch again and drops the result.
    """
    op, dc = cfg.optim, cfg.data
    lengths = [len(ex["input_ids"]) for ex in eval_set]
    # Plan for one process and deal the batches out, so every eval example counts exactly once
    # (the training plan drops a ragged tail to keep ranks in step; eval must not).
    planned = [piece for indices in plan_batches(lengths, op.per_device_train_batch_size, cfg.loop.seed)
               for piece in _pieces(indices, lengths, dc)]
    batches = planned[env.rank::env.world_size]
    spare = math.ceil(len(planned) / env.world_size) - len(batches) if sharded else 0
    score = partial(loss_sum_over, model, pad_token_id=tokenizer.pad_token_id, packing=dc.packing,
                    max_seq_length=dc.max_seq_length, device=env.device)
    loss_sum, n_tokens = score([eval_set[j] for j in indices] for indices in batches)
    if spare:
        score([[eval_set[j] for j in planned[0]]] * spare)
    loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], env)
    return loss_sum / max(n_tokens, 1)


def evaluate_exact_match(model: nn.Module, tokenizer, rows, cfg: TrainConfig, env: DistEnv, *,
                         sharded: bool = False) -> float:
    """Share of eval rows answered exactly right by greedy decoding (all ranks together).

    Each rank answers every world_size-th row; the counts are summed, so every row counts once.
    The answer length comes from all rows, so it does not depend on how they are dealt out.
    Sharded: every rank decodes as many batches as the others (a short rank answers a row again and
    does not count it), and generation keeps the ranks stepping together.
    """
    max_new = cfg.loop.eval_max_new_tokens or default_max_new_tokens(tokenizer, rows)
    mine = rows[env.rank::env.world_size]
    spare = math.ceil(len(rows) / env.world_size) - len(mine) if sharded else 0
    asked = mine + rows[:spare]
    result = exact_match(model, tokenizer, asked, max_new_tokens=max_new,
                         batch_size=cfg.optim.per_device_train_batch_size) if asked else None
    correct = sum(r.correct for r in result.records[:len(mine)]) if result else 0
    correct, n = all_reduce_sum([correct, len(mine)], env)
    return correct / max(n, 1)


def _evaluate_and_log(model, tokenizer, datasets, cfg, env, metrics: MetricsLog, step: int,
                      runner: nn.Module) -> dict[str, float]:
    """Evaluate, write the eval record, and return its eval_* numbers."""
    eval_set, sharded = datasets.eval, fsdp.is_sharded(runner)
    with fsdp.gathered_root(runner):
        eval_loss = evaluate(model, tokenizer, eval_set, cfg, env, sharded=sharded)
        record: dict[str, Any] = {"step": step, "eval_loss": eval_loss,
                                  "perplexity": perplexity(eval_loss)}
        if cfg.loop.eval_metric == "exact_match":
            record["eval_exact_match"] = evaluate_exact_match(model, tokenizer, datasets.eval_answers, cfg,
                                                              env, sharded=sharded)
        if env.is_main or sharded:  # sharded: every rank runs the generation, the main one logs it
            samples = sample_generations(model, tokenizer,
                                         [eval_set[i] for i in range(min(EVAL_SAMPLES, len(eval_set)))])
            record["samples"] = samples
    if env.is_main:
        for s in record["samples"]:
            logger.info("sample @ step %d: %r -> %r", step, s["prompt"], s["completion"])
    metrics.write(record)
    logger.info("step %d: eval_loss %.4f, perplexity %.2f%s", step, eval_loss, record["perplexity"],
                f", exact match {record['eval_exact_match']:.3f}" if "eval_exact_match" in record else "")
    return {k: v for k, v in record.items() if k.startswith("eval_")}


class _InterruptFlag:
    """Turns the first Ctrl-C into a request to stop at the end of the current step.

    A second Ctrl-C interrupts immediately (the default behaviour is restored after the first).
    `announce`: say so in the log (under torchrun every process gets the signal; one says it).
    """

    def __init__(self, announce: bool = True):
        self.requested, self.announce = False, announce

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        if self.announce:
            logger.warning("Ctrl-C: finishing this step and saving a checkpoint (press again to abort)")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)
