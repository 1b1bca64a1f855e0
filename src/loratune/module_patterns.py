"""Regexes over module names that come from configs and adapter files, matched in bounded time.

target_modules (a string), exclude_modules, layers_pattern and the keys of rank_pattern /
alpha_pattern are regexes written by whoever wrote the config, so they may be hostile: a pattern
such as `(a|aa)+b` backtracks exponentially. Python's `re` holds the GIL for a whole match and
cannot be interrupted, so one such pattern would stall every thread of the process (a server's
event loop included). Here a pattern is

- checked when a config is validated (`pattern_problem`): at most MAX_PATTERN_CHARS, and its
  counted repeats expand to at most MAX_EXPANSION states (`((a{1000}){1000}){1000}` would take
  hours to compile);
- matched with the `regex` package in its `re`-compatible V0 mode, which releases the GIL while it
  matches and stops at a timeout. All matches inside one `match_budget()` share one deadline;
  running out raises ConfigError naming the pattern, and that pattern is refused from then on.

Semantics are `re`'s (PEFT's): `fullmatch` for target_modules, `match` for the others.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import time
from collections.abc import Iterator

import regex

from .errors import ConfigError

MAX_PATTERN_CHARS = 1000
MAX_EXPANSION = 10_000
MATCH_BUDGET_S = 2.0
"""Seconds all matches of one budget may take together (real patterns take microseconds)."""

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("module_pattern_deadline",
                                                                          default=None)
_too_slow: set[str] = set()

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as _sre
    import sre_parse as _sre_parse


def shown(value: object, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters (hostile values can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def first_few(items: list[str], n: int = 5, sep: str = ", ") -> str:
    """The first `n` items joined, and how many more there are (error messages over long lists)."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return sep.join(items[:n]) + more


def pattern_problem(what: str, pattern: object) -> str | None:
    """Return why `pattern` cannot be used as a module-name regex, or None when it can."""
    if not isinstance(pattern, str):
        return f"{what} must be a string, got {shown(pattern)}"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"{what} is a regex of {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are accepted"
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"{what} is not a valid regular expression: {exc}"
    if _expansion(parsed) > MAX_EXPANSION:
        return (f"{what} {shown(pattern)} repeats too much: its counted repeats expand to over "
                f"{MAX_EXPANSION:,} states")
    return None


def _expansion(items) -> int:
    """How many states the pattern compiles to, counting a repeat {m,n} as n copies of its body."""
    total = 0
    for op, av in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) or op is getattr(_sre, "POSSESSIVE_REPEAT", None):
            lo, hi, sub = av
            total += _expansion(sub) * max(1, lo if hi == _sre.MAXREPEAT else hi)
        elif op is _sre.SUBPATTERN:
            total += _expansion(av[-1])
        elif op is _sre.BRANCH:
            total += sum(_expansion(b) for b in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total += _expansion(av[1])
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            total += _expansion(av)
        elif op is _sre.GROUPREF_EXISTS:
            total += _expansion(av[1]) + (_expansion(av[2]) if av[2] else 0)
        else:
            total += 1
        if total > MAX_EXPANSION:
            return total
    return total


@contextlib.contextmanager
def match_budget(seconds: float | None = None) -> Iterator[None]:
    """Let every match inside the block share one deadline (an enclosing budget wins).

    `seconds` defaults to MATCH_BUDGET_S as it is when the block starts.
    """
    if _deadline.get() is not None:
        yield
        return
    token = _deadline.set(time.monotonic() + (MATCH_BUDGET_S if seconds is None else seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


def fullmatch(pattern: str, name: str) -> bool:
    """re.fullmatch(pattern, name) is not None, in bounded time."""
    return _run(pattern, name, "fullmatch")


def match(pattern: str, name: str) -> regex.Match | None:
    """re.match(pattern, name), in bounded time."""
    return _run(pattern, name, "match")


def search(pattern: str, name: str) -> bool:
    """re.search(pattern, name) is not None, in bounded time."""
    return _run(pattern, name, "search") is not None


def _run(pattern: str, name: str, how: str):
    if pattern in _too_slow:
        raise _slow_error(pattern)
    compiled = _compile(pattern)
    deadline = _deadline.get()
    left = MATCH_BUDGET_S if deadline is None else deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        found = getattr(compiled, how)(name, timeout=left)
    except TimeoutError:
        if len(_too_slow) > 1000:
            _too_slow.clear()
        _too_slow.add(pattern)
        raise _slow_error(pattern) from None
    return found is not None if how == "fullmatch" else found


@functools.lru_cache(maxsize=512)
def _compile(pattern: str) -> regex.Pattern:
    problem = pattern_problem("module pattern", pattern)
    if problem:
        raise ConfigError(problem)
    try:
        return regex.compile(pattern, regex.V0)
    except regex.error as exc:
        raise ConfigError(f"module pattern {shown(pattern)} is not supported: {exc}") from None


def _slow_error(pattern: str) -> ConfigError:
    return ConfigError(f"the module-name regex {shown(pattern)} took over {MATCH_BUDGET_S:g}s to match "
                       "the model's module names: it backtracks (nested quantifiers such as (a+)+ or "
                       "(a|aa)* do); write it without them")
