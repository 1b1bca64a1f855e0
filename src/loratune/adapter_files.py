"""The files of an adapter directory, and finding one of them locally or on the hub.

An adapter directory holds `adapter_config.json` (`CONFIG_NAME`), `adapter_model.safetensors`
(or PEFT's older `adapter_model.bin`) and a README.md. Reading and checking their contents is
config.py (the JSON) and adapter_io.py (the tensors); both find the files here.
"""

from __future__ import annotations

import os
import re

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
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
