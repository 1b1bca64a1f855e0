"""Reading YAML written by someone else: bounded size, nesting and alias expansion.

`yaml.safe_load` runs no code, but it is not bounded: a "billion laughs" document of a few hundred
bytes defines an anchor, then lists that repeat it, then lists that repeat those. The loaded objects
share references, so loading is cheap, but anything that walks them (checking keys, coercing a
`target_modules` list, printing a value) walks the whole expansion: 10**9 items from 1 KiB.
`load_yaml` composes the node graph (linear in the text), measures what it expands to, counting a
node once for every path that reaches it, and refuses past the bounds before anything is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from loratune.errors import ConfigError

MAX_YAML_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_EXPANDED = 1_000_000
"""Nodes plus scalar characters the document may expand to (a real training config: a few hundred)."""


def load_yaml(text: str, *, source: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct one YAML document; return (its node graph, the Python value).

    Raises:
        ConfigError: over MAX_YAML_BYTES, nested over MAX_DEPTH, expanding (through aliases) to over
            MAX_EXPANDED, or yaml.YAMLError's message with its line and column.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"the YAML document has {len(text):,} characters; at most {MAX_YAML_BYTES:,} are "
                          "accepted", source=source)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses NUL and other control characters already
        node = loader.get_single_node()
        if node is None:
            return None, None
        size = _expanded_size(node, {}, 0, source)
        if size > MAX_EXPANDED:
            raise ConfigError(f"the YAML document expands to over {MAX_EXPANDED:,} nodes and characters "
                              "through its aliases (*name); a training config needs a few hundred. Write the "
                              "values out, or use fewer nested aliases", source=source)
        return node, loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"the YAML document nests deeper than {MAX_DEPTH} levels", source=source) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, found before parsing
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"invalid YAML (line {line}): the character U+{exc.character:04X} is not allowed "
                          "in YAML", source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"invalid YAML{where}: {problem}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int], depth: int, source: str) -> int:
    """Nodes plus scalar characters below `node`, a shared node counted at every use."""
    key = id(node)
    if key in memo:
        return memo[key]
    if depth > MAX_DEPTH:  # also what a recursive alias (&a [*a]) runs into
        raise ConfigError(f"the YAML document nests deeper than {MAX_DEPTH} levels (or an alias refers to "
                          "itself)", source=source)
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, depth + 1, source) for child in node.value)
    else:
        size = 1 + sum(_expanded_size(k, memo, depth + 1, source) + _expanded_size(v, memo, depth + 1, source)
                       for k, v in node.value)
    memo[key] = size
    return size
