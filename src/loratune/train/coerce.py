"""Coerce YAML and command-line values to a dataclass field's type, or say what was expected.

PyYAML reads `1e-4` as a string and a flag's value is always a string, so a value is converted by
the type the field declares: bool ("true"/"yes"/"1"), int, float, str, `X | None` ("null"/"none"),
lists ("a,b" or a YAML list), `str | list[str]` (a comma means a list), dicts ("k=v,k2=v2") and
Literal choices. Impossible values raise ValueError with the expected type and the value given.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NONE_WORDS = ("none", "null", "~")


def coerce(value: Any, tp: Any, choices: tuple | None = None) -> Any:
    """Convert a YAML or command-line value to the field type `tp`; raise ValueError if impossible."""
    out = _coerce(value, tp)
    if choices is not None and out not in choices:
        raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return out


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        items = [_coerce(v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return _coerce_dict(value, typing.get_args(tp))
    if tp is Any:
        return value
    return _coerce_scalar(value, tp)


def _coerce_union(value: Any, options: tuple) -> Any:
    if type(None) in options and (value is None or (isinstance(value, str) and value.lower() in NONE_WORDS)):
        return None
    rest = [o for o in options if o is not type(None)]
    # Try the most specific reading first: bool before str, list before str (a comma means a list).
    order = sorted(rest, key=lambda o: {bool: 0, int: 1, float: 2}.get(o, 3 if typing.get_origin(o) else 4))
    if isinstance(value, str) and "," not in value:
        order = [o for o in order if typing.get_origin(o) not in (list, tuple)] + \
                [o for o in order if typing.get_origin(o) in (list, tuple)]
    for option in order:
        try:
            return _coerce(value, option)
        except ValueError:
            continue
    names = " or ".join(_type_name(o) for o in options)
    raise ValueError(f"expected {names}, got {value!r}")


def _coerce_scalar(value: Any, tp: type) -> Any:
    if value is None:
        raise ValueError(f"expected {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ValueError(f"expected {_type_name(tp)}, got {value!r}")


def _coerce_dict(value: Any, args: tuple) -> dict:
    key_tp, val_tp = args or (str, Any)
    if isinstance(value, str):  # from a flag: "a=b,c=d"
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"expected key=value pairs separated by commas, got {value!r}")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    return {_coerce(k, key_tp): _coerce(v, val_tp) for k, v in value.items()}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
