"""The trainer: `run(config, **overrides) -> TrainResult` and the config it reads.

Submodules: config (flat keys -> frozen sections), coerce (values by field type), loop (`fit`),
optim (AdamW + schedule), checkpoint (atomic checkpoint-<step>/), resume (what a checkpoint holds,
and resuming with any number of processes), metrics (metrics.jsonl, TensorBoard, loss.png),
distributed (torchrun/DDP), fsdp and fsdp_load (sharded training and loading, `fsdp: true`),
sampling (generations), api (`run`), loss (token loss, owned by ops).
Names are resolved lazily so `import loratune.train.loss` stays light.
"""

from __future__ import annotations

_EXPORTS = {
    "run": "loratune.train.api",
    "TrainResult": "loratune.train.api",
    "TrainConfig": "loratune.train.config",
    "build_config": "loratune.train.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loratune.train' has no attribute {name!r}")
