"""The training state in a checkpoint, and continuing a run from it with any number of processes.

`save` writes one of two formats (checkpoint.py names the files):
  full     (one process, DDP): `training_state.pt` holds the trainable weights and the optimizer.
  sharded  (fsdp: true): every rank writes its shards of both with torch.distributed.checkpoint
           into `distributed/`; `training_state.pt` keeps the rest.
Both hold the scheduler, every rank's RNG state, the data position and the logging window, and
`restore` reads either format into a sharded or unsharded model.

World size: rank r runs micro-batches r, r+N, r+2N, ... of one global plan (data.plan_batches),
and dropout draws from a generator keyed by the global micro-batch index (loop.py), so the data
position is really "micro-batches of the global plan consumed". A run saved by N processes
resumes with M: the position is converted, and with the same global batch (N x
gradient_accumulation_steps micro-batches per step) it follows the uninterrupted trajectory.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from loratune.errors import LoratuneError
from loratune.train import checkpoint as ckpt
from loratune.train.config import TrainConfig
from loratune.train.distributed import DistEnv, gather_objects
from loratune.train.optim import apply_hyperparameters, trainable_parameters

logger = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: optimizer steps done, and this rank's next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0


@dataclass
class LogWindow:
    """Losses and input tokens since the last metrics line, checkpointed so a resumed run logs the
    same means as an uninterrupted one."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0  # training time the window had run when it was checkpointed


def micro_batches_per_step(cfg: TrainConfig, env: DistEnv) -> int:
    """Micro-batches of the global plan one optimizer step consumes (the global batch)."""
    return env.world_size * cfg.optim.gradient_accumulation_steps


def save(model, optimizer, scheduler, pos: Position, window: LogWindow, cfg: TrainConfig, env: DistEnv,
         config_yaml: str, plan: str) -> str:
    """Write checkpoint-<step>; every rank calls this (RNG states are gathered, shards written by all).

    `plan`: the batch plan's id (data.plan_id), which `restore` compares with the resuming run's.
    """
    # Gathered as torch.save bytes: all_gather_object cannot pickle tensors on every torch version.
    buf = io.BytesIO()
    torch.save(ckpt.rng_state(), buf)
    rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in gather_objects(buf.getvalue(), env)]
    state = {
        "scheduler": scheduler.state_dict(),
        "rng": rngs,
        "position": asdict(pos),
        "world_size": env.world_size,
        "micro_batches_per_step": micro_batches_per_step(cfg, env),
        "log_window": asdict(window),
        "plan": plan,
    }
    info = {**state["position"], "world_size": env.world_size, "learning_rate": scheduler.get_last_lr()[0]}
    files = {"state": state, "info": info, "config_yaml": config_yaml}
    if cfg.distributed.fsdp:
        return _save_sharded(model, optimizer, cfg, env, pos.step, files)
    path = None
    if env.is_main:
        state["trainable"] = {n: p.detach().cpu() for n, p in trainable_parameters(model)}
        state["optimizer"] = optimizer.state_dict()
        path = ckpt.save_checkpoint(cfg.loop.output_dir, pos.step, write_adapter=model.save_pretrained,
                                    save_total_limit=cfg.loop.save_total_limit, **files)
    return gather_objects(path, env)[0]


def _save_sharded(model, optimizer, cfg: TrainConfig, env: DistEnv, step: int, files: dict) -> str:
    import torch.distributed.checkpoint as dcp

    from loratune import adapter_io
    from loratune.train.fsdp import adapter_tensors

    alone = not torch.distributed.is_initialized()  # one process without a group: no collectives
    tensors = adapter_tensors(model)  # gathered on every rank, written by the main one
    sharded = _sharded_state(model, optimizer)
    config = model.peft_config["default"]
    files["state"]["sharded"] = ckpt.SHARDED_DIR
    return ckpt.save_sharded_checkpoint(
        cfg.loop.output_dir, step, write_shards=lambda d: dcp.save(sharded, checkpoint_id=d, no_dist=alone),
        share=lambda path: gather_objects(path, env)[0], is_main=env.is_main,
        size_hint=4 * ckpt.tensor_bytes(tensors), save_total_limit=cfg.loop.save_total_limit,
        write_adapter=lambda d: adapter_io.save_adapter(d, config, tensors), **files)


def restore(path: str, model, optimizer, scheduler, cfg: TrainConfig, env: DistEnv,
            plan: str) -> tuple[Position, LogWindow]:
    """Load weights, optimizer, scheduler, RNG, data position and logging window from a checkpoint.

    Checkpoints written before the logging window was stored resume with an empty window. A
    checkpoint whose batch plan is not `plan` (other data, batch size or seed) is resumed with a
    warning: its position then points into another plan.

    The learning rate and weight decay are this run's config's, not the checkpoint's.

    Raises:
        LoratuneError: training_state.pt is not a training state, or the checkpoint's trainable
            tensors (or optimizer state) are not this model's.
    """
    state = ckpt.load_training_state(path, validate=state_problems)
    if "trainable" in state:
        _restore_full(path, state, model, optimizer)
    else:
        _restore_sharded(os.path.join(path, state.get("sharded", ckpt.SHARDED_DIR)), model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    apply_hyperparameters(optimizer, scheduler, cfg.optim.learning_rate, cfg.optim.weight_decay)
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    pos = convert_position(Position(**state["position"]), state, cfg, env)
    if state.get("plan", plan) != plan and env.is_main:
        logger.warning("checkpoint %s was written with another batch plan (the training data, "
                       "per_device_train_batch_size or seed differ, or an older loratune planned "
                       "differently): training continues at step %d, micro-batch %d of epoch %d of this "
                       "run's plan, which is not where the checkpoint's run stood", path, pos.step,
                       pos.batch_index * env.world_size, pos.epoch)
    return pos, LogWindow(**state.get("log_window", {}))


def state_problems(state: dict) -> list[str]:
    """What a loaded training_state.pt lacks to be resumed from (empty when it is whole).

    Checked before anything is restored, so a state from another program or version fails with the
    file named instead of a KeyError halfway through.
    """
    problems = [f"no {key!r}" for key in ("scheduler", "rng", "position", "world_size") if key not in state]
    if "trainable" in state and "optimizer" not in state:
        problems.append("'trainable' weights without an 'optimizer' state")
    if "trainable" not in state and "sharded" not in state and "optimizer" in state:
        problems.append("an 'optimizer' state without 'trainable' weights")
    for key, cls in (("position", Position), ("log_window", LogWindow)):
        if key not in state:
            continue
        value, names = state[key], {f.name for f in fields(cls)}
        if not isinstance(value, dict) or not set(value) <= names:
            problems.append(f"{key!r} is not a mapping of {', '.join(sorted(names))}")
        elif key == "position" and not all(isinstance(value.get(n), int) for n in names):
            problems.append(f"'position' needs integer {', '.join(sorted(names))}, got {value}")
    rngs = state.get("rng", [{}])
    if not isinstance(state.get("world_size", 1), int) or not isinstance(rngs, list) or not rngs:
        problems.append("'world_size' must be an integer and 'rng' a non-empty list")
    if not isinstance(state.get("scheduler", {}), dict):
        problems.append("'scheduler' is not a mapping")
    return problems


def convert_position(pos: Position, state: dict, cfg: TrainConfig, env: DistEnv) -> Position:
    """This rank's position from one saved by a run with another number of processes."""
    saved_ws, now = state["world_size"], micro_batches_per_step(cfg, env)
    saved_batch = state.get("micro_batches_per_step", now)
    if saved_batch != now:
        logger.warning("the checkpoint took %d micro-batches per optimizer step, this run takes %d "
                       "(processes x gradient_accumulation_steps): training continues, but not on the "
                       "uninterrupted run's trajectory; set gradient_accumulation_steps to %s to keep it",
                       saved_batch, now, f"{saved_batch / env.world_size:g}")
    if saved_ws == env.world_size:
        return pos
    consumed = pos.batch_index * saved_ws  # micro-batches of this epoch's global plan already used
    index, extra = divmod(consumed, env.world_size)
    logger.info("checkpoint written by %d process(es), resuming with %d: continuing at micro-batch %d of "
                "epoch %d", saved_ws, env.world_size, index * env.world_size, pos.epoch)
    if extra:
        logger.warning("%d micro-batch(es) of the checkpoint's last step do not divide over %d processes "
                       "and are trained again", extra, env.world_size)
    return Position(step=pos.step, epoch=pos.epoch, batch_index=index)


def _restore_full(path: str, state: dict, model, optimizer) -> None:
    """Load a full-format state (one process or DDP wrote it) into a sharded or unsharded model."""
    from loratune.train.fsdp import is_sharded_model

    params = dict(trainable_parameters(model))
    saved = state["trainable"]
    check_fits(path, {n: p.shape for n, p in params.items()}, {n: t.shape for n, t in saved.items()})
    if not is_sharded_model(model):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:  # torch's checks on groups and sizes
            raise LoratuneError(f"checkpoint {path}: its optimizer state does not fit this model/config "
                                f"({exc}); resume with the config the checkpoint was written with") from None
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # The saved optimizer numbers parameters in the optimizer's order; name them for the sharded load.
    name_of = {id(p): n for n, p in params.items()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_optim = state["optimizer"]
    by_name = {"state": {names[i]: s for i, s in saved_optim["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in saved_optim["param_groups"]]}
    result = set_state_dict(model, optimizer, model_state_dict=saved, optim_state_dict=by_name,
                            options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True,
                                                     strict=False))
    _check_only_frozen_missing(result, model)


def _sharded_state(model, optimizer) -> dict:
    """{"model": trainable weights, "optimizer": its state}, keyed by parameter name, as shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optim}


def _restore_sharded(directory: str, model, optimizer) -> None:
    """Load a sharded-format state into a sharded or unsharded model, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    target = _sharded_state(model, optimizer)
    stored = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    prefix = "model."
    saved = {k[len(prefix):]: v.size for k, v in stored.items() if k.startswith(prefix)}
    check_fits(os.path.dirname(directory), {n: t.shape for n, t in target["model"].items()}, saved)
    dcp.load(target, checkpoint_id=directory, no_dist=not torch.distributed.is_initialized())
    result = set_state_dict(model, optimizer, model_state_dict=target["model"],
                            optim_state_dict=target["optimizer"],
                            options=StateDictOptions(ignore_frozen_params=True, strict=False))
    _check_only_frozen_missing(result, model)


def _check_only_frozen_missing(result, model) -> None:
    """The state holds only the trainable weights: every missing key must be a frozen one."""
    trainable = dict(trainable_parameters(model))
    assert not result.unexpected_keys, f"unexpected keys {result.unexpected_keys[:5]}"
    assert not [k for k in result.missing_keys if k in trainable], "trainable weights left unloaded"


def check_fits(path: str, params: dict[str, torch.Size], saved: dict[str, torch.Size]) -> None:
    """Raise if the checkpoint's trainable tensors are not exactly this model's (names and shapes)."""
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise LoratuneError(f"checkpoint {path} does not fit this model/config: missing {missing[:5]}, "
                            f"unexpected {extra[:5]}")
    wrong = [f"{name} is {tuple(saved[name])} in the checkpoint but {tuple(shape)} in this model"
             for name, shape in params.items() if tuple(saved[name]) != tuple(shape)]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise LoratuneError(f"checkpoint {path} does not fit this model/config: {wrong[0]}{more}; "
                            "resume with the r, target_modules and modules_to_save the checkpoint was "
                            "written with")
