"""`run`: the whole training job from a config to an adapter on disk, callable from Python.

    from loratune.train import run
    result = run("examples/quickstart.yaml", max_steps=20)
    print(result.adapter_dir, result.metrics_path)

It loads the tokenizer, data and frozen base, injects the adapter, calls `loop.fit`, and on the
main process writes the final adapter (PEFT format), `train_config.yaml`, `metrics.jsonl` and
`loss.png` into `output_dir`. The CLI (`loratune train`) is a thin wrapper around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from loratune.atomic import atomic_file, nearest_existing
from loratune.errors import ConfigError, InsufficientMemoryError
from loratune.memory import rss_bytes
from loratune.train import checkpoint as ckpt
from loratune.train.build import base_source, build_model, build_sharded_model
from loratune.train.config import TrainConfig, build_config, canonical_keys, read_yaml
from loratune.train.distributed import (
    DistEnv,
    barrier,
    init_distributed,
    peer_loss_explained,
    shutdown_distributed,
    together,
)
from loratune.train.metrics import PLOT_FILE, MetricsLog, plot_losses

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the outputs are and how the run went (numbers are global, over all processes).

    Holds every field of the loop's FitOutcome under the same name (`run` passes them through).
    """

    output_dir: str
    adapter_dir: str | None
    metrics_path: str
    plot_path: str | None
    config_path: str
    step: int
    total_steps: int
    interrupted: bool
    last_checkpoint: str | None
    train_tokens: int
    runtime_s: float
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    eval_exact_match: float | None = None  # with eval_metric: exact_match, at the last eval
    sample: dict[str, str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0
    resumed_from: str | None = None
    peak_rss_mib: list[float] = field(default_factory=list)  # per rank, at the last step


def build_train_config(config: TrainConfig | dict | str | os.PathLike | None,
                       overrides: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a TrainConfig, a dict of flat keys, or a YAML path, plus overrides."""
    overrides = canonical_keys(overrides)  # a flag wins over the config under either name
    if isinstance(config, TrainConfig):
        return config.replace(**overrides) if overrides else config
    if config is None:
        return build_config(dict(overrides))
    if isinstance(config, dict):
        return build_config({**canonical_keys(config), **overrides})
    path = os.fspath(config)
    return build_config({**canonical_keys(read_yaml(path)), **overrides}, source=path)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (flat keys), as written to train_config.yaml."""
    return yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False, default_flow_style=None)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(config: TrainConfig | dict | str | os.PathLike | None = None, **overrides: Any) -> TrainResult:
    """Train an adapter as `config` says; flat-key overrides win over the config.

    Raises:
        ConfigError: invalid keys or values (all listed at once).
        DataError: a malformed data row (file and line named).
        TrainingDivergedError: NaN/Inf loss; the last good checkpoint is kept.
    """
    from loratune.ops.runtime import tuned_cpu_runtime

    cfg = build_train_config(config, overrides)
    env = init_distributed(alone=cfg.distributed.fsdp)
    try:
        # flush denormals, allocator thresholds, threads: process-wide (ops.runtime says what is put back).
        # Loading hands freed blocks back (a base quantized as it loads frees its float weights);
        # _run keeps them from the first step on, unless sharded (ops.runtime says why).
        with tuned_cpu_runtime(threads=cfg.loop.num_threads or None, allocator="return"), \
                out_of_memory_explained(cfg), peer_loss_explained(env):
            return _run(cfg, env)
    finally:
        shutdown_distributed(env)


_OOM_TEXT = ("out of memory", "not enough memory", "DefaultCPUAllocator", "can't allocate memory")


@contextlib.contextmanager
def out_of_memory_explained(cfg: TrainConfig):
    """Turn an out-of-memory failure anywhere in training into InsufficientMemoryError with a hint."""
    try:
        yield
    except InsufficientMemoryError:
        raise
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not any(t in str(exc) for t in _OOM_TEXT):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InsufficientMemoryError(
            f"training ran out of memory ({first}); with r={cfg.lora.r}, "
            f"per_device_train_batch_size={cfg.optim.per_device_train_batch_size} and "
            f"max_seq_length={cfg.data.max_seq_length}: lower one of them, or set "
            "gradient_checkpointing: true") from None


def _run(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    from loratune.train.loop import fit

    out = cfg.loop.output_dir
    cfg, tokenizer, datasets, model, root, resume_path = _prepare(cfg, env)
    config_yaml = config_to_yaml(cfg)
    metrics = MetricsLog(out, enabled=env.is_main, tensorboard=cfg.loop.report_to == "tensorboard",
                         resume_step=_checkpoint_step(resume_path))
    try:
        outcome = fit(model, tokenizer, datasets, cfg, env, resume_path=resume_path, metrics=metrics,
                      config_yaml=config_yaml, runner=root)
    finally:
        metrics.close()
        if env.is_main:
            plot_losses(metrics.records, os.path.join(out, PLOT_FILE))

    adapter_dir, sample = None, None
    if env.is_main:
        with atomic_file(os.path.join(out, ckpt.CONFIG_FILE)) as fh:
            fh.write(config_yaml)
    if not outcome.interrupted:
        adapter_dir, sample = _save_final(model, root, tokenizer, datasets, cfg, env)
    barrier(env)
    losses = [r["loss"] for r in metrics.records if isinstance(r.get("loss"), float)]
    plot = os.path.join(out, PLOT_FILE)
    return TrainResult(
        **vars(outcome),  # step, total_steps, interrupted, last_checkpoint, train_tokens, ..., history
        output_dir=out, adapter_dir=adapter_dir, metrics_path=metrics.path,
        plot_path=plot if os.path.exists(plot) else None, config_path=os.path.join(out, ckpt.CONFIG_FILE),
        first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None, sample=sample,
    )


def _prepare(cfg: TrainConfig, env: DistEnv):
    """Load the data and the model and make output_dir ready, on every rank:
    (cfg, tokenizer, datasets, model, FSDP root or None, resume_path).

    Each rank loads on its own; when that fails on one rank (a data file it cannot read, too little
    memory), every rank stops with a message naming it (distributed.together).
    """
    from loratune.data import build_datasets, check_vocab
    from loratune.ops.runtime import keep_freed_memory
    from loratune.quant.smoothing import calibration_rows
    from loratune.tools.evaluation import model_vocab_size
    from loratune.tools.loading import load_tokenizer

    out = cfg.loop.output_dir
    sharded = cfg.distributed.fsdp and env.joined
    root = None
    with together(env, "loading the data and the model"):
        check_train_output_dir(out)
        resume_path = ckpt.resolve_resume(cfg.loop.resume_from_checkpoint, out)
        seed_everything(cfg.loop.seed)
        tokenizer = load_tokenizer(base_source(cfg))
        datasets = build_datasets(cfg.data, tokenizer, cfg.loop.seed,
                                  eval_answers=cfg.loop.eval_metric == "exact_match")
        before_model = rss_bytes() or 0  # the libraries and the data: the memory estimate starts from them
        if not sharded:
            calibration = (calibration_rows(datasets.train, cfg.data.max_seq_length)
                           if cfg.model.base_compute == "int8" else None)
            model = build_model(cfg, env, calibration)
    if sharded:  # collective: outside `together`, whose ranks must not meet in other collectives
        model, root = build_sharded_model(cfg, env)
    # Only once model and data are known good on every rank does output_dir change; the main rank
    # clears it before any rank goes on (`together` ends in a collective).
    with together(env, "checking the model against the data"):
        check_vocab(datasets, model_vocab_size(model))
        cfg = fit_memory(cfg, model, datasets, before_model)
        if not sharded:
            keep_freed_memory()
        if env.is_main:
            os.makedirs(out, exist_ok=True)
            ckpt.remove_incomplete(out)
            if resume_path is None:
                ckpt.remove_stale(out)
            else:
                ckpt.remove_newer(out, resume_path)
    return cfg, tokenizer, datasets, model, root, resume_path


def _save_final(model, root, tokenizer, datasets, cfg: TrainConfig, env: DistEnv):
    """Write the final adapter into output_dir and generate the before/after sample: (adapter_dir, sample)
    on the main rank, (None, None) elsewhere. A sharded run gathers the adapter, and every rank generates."""
    from loratune.train import fsdp

    out = cfg.loop.output_dir
    if cfg.distributed.fsdp:
        fsdp.save_adapter(model, out, env)
    elif env.is_main:
        model.save_pretrained(out)
    sample = None
    if env.is_main or fsdp.is_sharded(root):
        with fsdp.gathered_root(root):
            sample = before_after_sample(model, tokenizer, datasets)
    return (out, sample) if env.is_main else (None, None)


def fit_memory(cfg: TrainConfig, model, datasets, before_model: int = 0) -> TrainConfig:
    """Resolve an automatic max_tokens_per_batch from the model; refuse a run that cannot fit in memory.

    `before_model` is what the process held before the model was built (bytes): the estimated peak
    starts from it plus the model, or from what is resident now where that is more.

    Raises:
        InsufficientMemoryError: the largest micro-batch, with the adapter's optimizer state, needs
            more memory than is free (the message has the estimate).
    """
    from loratune.train import memory

    dc, op = cfg.data, cfg.optim
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad),
                 torch.float32)
    per_token = memory.activation_bytes_per_token(
        model.config, dtype, lora_dropout=cfg.lora.lora_dropout,
        gradient_checkpointing=cfg.model.gradient_checkpointing)
    if dc.packing and dc.max_tokens_per_batch == 0:
        cfg = cfg.replace(max_tokens_per_batch=memory.auto_token_budget(per_token, dc.max_seq_length))
        logger.info("max_tokens_per_batch: %d (auto: %.2f MiB of activations per token)",
                    cfg.data.max_tokens_per_batch, per_token / 2**20)
    longest = max((min(len(ex["input_ids"]), dc.max_seq_length) for ex in datasets.train), default=0)
    if dc.packing:
        biggest = max(longest, min(cfg.data.max_tokens_per_batch, op.per_device_train_batch_size * longest))
    else:
        biggest = op.per_device_train_batch_size * longest
    peak = memory.check_training_fits(model, longest_batch_tokens=biggest, per_token=per_token,
                                      what=f"training on micro-batches of up to {biggest} tokens",
                                      device=next(model.parameters()).device,
                                      checkpointed=cfg.model.gradient_checkpointing,
                                      before_model=before_model)
    logger.info("estimated peak memory of training: %.1f GiB (micro-batches of up to %d tokens)",
                peak / 2**30, biggest)
    return cfg


def check_train_output_dir(path: str) -> None:
    """Raise ConfigError if `path` cannot become a directory this process writes to.

    It cannot when it, or a parent, is a file, or when the nearest existing folder refuses writes.
    Called before the model and data load, so a bad output_dir fails in a second, not after.
    """
    probe = nearest_existing(path)
    if not os.path.isdir(probe):
        where = ("is an existing file" if probe == os.path.abspath(path)
                 else f"is inside {probe!r}, which is a file")
        raise ConfigError(f"output_dir {path!r} {where}; choose a directory (it is created if missing)")
    try:  # writing is the only reliable test: os.access says yes to root on a read-only file system
        os.rmdir(tempfile.mkdtemp(prefix=".loratune-write-test-", dir=probe))
    except OSError as exc:
        raise ConfigError(f"output_dir {path!r} cannot be written: {probe!r} does not allow it "
                          f"({exc.strerror or exc}); choose a directory you can write to") from None


def before_after_sample(model, tokenizer, datasets) -> dict[str, str] | None:
    """Generate for one example prompt with the adapter disabled (before) and enabled (after)."""
    from loratune.train.sampling import example_prompt_ids, sample_completion

    source = datasets.eval if datasets.eval is not None and len(datasets.eval) else datasets.train
    if source is None or not len(source):
        return None
    ids = example_prompt_ids(source[0])
    with model.disable_adapter():
        before = sample_completion(model, tokenizer, ids)
    after = sample_completion(model, tokenizer, ids)
    return {"prompt": tokenizer.decode(ids, skip_special_tokens=False), "before": before, "after": after}


def _checkpoint_step(path: str | None) -> int | None:
    if path is None:
        return None
    return ckpt.read_info(path)["step"]
