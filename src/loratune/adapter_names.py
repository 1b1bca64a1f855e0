"""What a valid adapter name is: one rule for the library (`add_adapter`, `load_adapter`, ...) and
the server (`lora_name`); and how an argument naming one adapter or several is read (`adapter_list`).

A name is 1-128 characters from [A-Za-z0-9._-], not "." or "..", so it is always safe as a folder
name (`save_pretrained` writes a non-default adapter into a sub-folder of that name) and takes
what vLLM users write, such as "sql.v2". "__base__" is reserved: a mixed batch uses it for rows
that get no adapter. Inside a layer, where torch module names cannot hold ".", the weights are
stored under `layers.module_key(name)`.
"""

from __future__ import annotations

import re

from .errors import ConfigError
from .module_patterns import shown

BASE_ADAPTER = "__base__"  # the name a mixed batch uses for "no adapter" rows
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
ADAPTER_NAME_RULE = "1-128 characters from [A-Za-z0-9._-], not '.' or '..'"


def adapter_name_problem(name: object) -> str | None:
    """Return why `name` cannot name an adapter, or None when it can."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
        text = repr(name)
        if len(text) > 80:  # a hostile name can be megabytes long
            text = f"{text[:80]}... ({len(name) if isinstance(name, str) else len(text)} characters)"
        return f"invalid adapter name {text}: use {ADAPTER_NAME_RULE}"
    if name == BASE_ADAPTER:
        return f"adapter name {name!r} is reserved for the base model (mixed batches use it for no adapter)"
    return None


def adapter_list(value: object, argument: str) -> list[str]:
    """One adapter name or a list of them (PEFT takes both) as a list; ConfigError for anything else."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{argument} must be an adapter name or a list of them, got {shown(value)}")
    return list(names)
