"""The files of an adapter directory, and finding one of them locally or on the hub.

An adapter directory holds `adapter_config.json` (`CONFIG_NAME`), `adapter_model.safetensors`
(or PEFT's older `adapter_model.bin`) and a README.md. Reading and checking their contents is
config.py (the JSON, read with `read_json_file`: bounded size and depth, strict UTF-8) and adapter_io.py
(the tensors); both find the files here.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20  # PEFT's adapter_config.json is a few hundred bytes
MAX_JSON_DEPTH = 64
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"


def resolve_adapter_file(path: str, filename: str, *, subfolder: str | None = None,
                         revision: str | None = None) -> str | None:
    """Return a local path to `filename` of an adapter (local directory or hub repo), or None."""
    path = os.fspath(path)
    local_dir = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(path):
        candidate = os.path.join(local_dir, filename)
        return candidate if os.path.isfile(candidate) else None
    if os.path.exists(path):  # a file: most often one of the adapter's own files
        parent = os.path.dirname(os.path.abspath(path))
        hint = (f"did you mean its directory {parent}?" if os.path.isfile(os.path.join(parent, CONFIG_NAME))
                else f"pass the adapter directory (the one holding {CONFIG_NAME})")
        raise AdapterError(f"{path}: is a file, not an adapter directory; {hint}")
    if not _HUB_ID.fullmatch(path):
        raise AdapterError(f"{path}: no such adapter directory")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(path, filename, subfolder=subfolder, revision=revision)
        except EntryNotFoundError:
            return None
    except AdapterError:
        raise
    except Exception as err:  # offline, unknown repo, auth: all mean "cannot get this adapter"
        raise AdapterError(f"{path}: no such local directory, and it could not be fetched from the hub "
                           f"({type(err).__name__})") from None


def read_json_file(path: str | os.PathLike, *, what: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """Read a small JSON file written by someone else: bounded size and nesting, strict UTF-8.

    Raises:
        AdapterError: naming the file and what is wrong (too big, not UTF-8, not JSON, too deep).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as err:
        raise AdapterError(f"{what}: cannot read {path} ({err.strerror or type(err).__name__})") from None
    if len(raw) > limit:
        raise AdapterError(f"{path}: {what} is over {limit:,} bytes; this is not an adapter config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterError(f"{path}: {what} is not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                           f"{err.start})") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise AdapterError(f"{path}: {what} nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except (RecursionError, ValueError) as err:  # ValueError: e.g. an integer of 5,000 digits
        raise AdapterError(f"{path}: {what} cannot be parsed ({type(err).__name__})") from None


def _json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings (checked before parsing, which recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
