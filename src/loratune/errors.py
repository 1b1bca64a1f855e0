"""The exceptions loratune raises at its boundaries.

Every error a user can cause (bad config, bad adapter file, bad data row, bad request) is a
`LoratuneError`, and its message names the file, field, key or request at fault plus a hint.
The CLI turns these into a one-paragraph message and exit code 2, never a traceback.
"""

from __future__ import annotations


class LoratuneError(Exception):
    """Base class for errors caused by user input rather than by a bug in loratune."""


class ConfigError(LoratuneError, ValueError):
    """A configuration (LoraConfig, training YAML, CLI flags) is invalid."""

    def __init__(self, problems: str | list[str], *, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            msg = f"{where}{self.problems[0]}"
        else:
            msg = f"{where}{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class TargetNotFoundError(LoratuneError, ValueError):
    """A `target_modules` entry matches no module of the model."""


class AdapterError(LoratuneError, ValueError):
    """An adapter directory or file is missing, malformed, or does not fit the model."""


class UnsupportedFeatureError(LoratuneError, NotImplementedError):
    """An adapter config asks for a feature loratune cannot honour; the feature is named."""


class DataError(LoratuneError, ValueError):
    """A training data file or row is malformed; the message names the file and line."""


class MergeError(LoratuneError, RuntimeError):
    """A merge would corrupt the base weights (NaN/Inf, quantized weights)."""


class TrainingDivergedError(LoratuneError, RuntimeError):
    """The loss or gradient became NaN/Inf; the run stopped without applying that step."""


class InsufficientMemoryError(LoratuneError, MemoryError):
    """An allocation would not fit in the memory available (estimated up front, or an OOM caught)."""


class DiskFullError(LoratuneError, OSError):
    """A save ran out of disk space; the message names the folder and the bytes it needed."""


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's message on one line (a library's multi-line message joined), cut to `limit`."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else f"{text[:limit]}..."
