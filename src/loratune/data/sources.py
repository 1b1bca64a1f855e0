"""Read raw rows from a data file or a `datasets` dataset, each tagged with where it came from.

Every row carries `where` ("train.jsonl line 17", "data.csv line 4", "train.parquet row 9",
"squad[train] row 12") so any later problem can name it. JSON, JSONL and CSV are read with the
standard library, which knows line numbers (a pyarrow parse error does not say which line was
bad); Parquet and hub datasets go through the `datasets` library. Malformed lines are returned as
problems, not raised, so that `build_datasets` can report them together with bad fields.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratune.errors import ConfigError, DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    where: str
    record: dict[str, Any]


@dataclass
class RawRows:
    """The rows of one source, plus the problems found while reading it (bad JSON, non-objects)."""

    name: str
    rows: list[Row]
    problems: list[str]


def read_file(path: str | Path, *, field_name: str = "train_file") -> RawRows:
    """Read a .jsonl / .json / .csv / .parquet file into rows.

    Raises:
        ConfigError: the file does not exist or has an unsupported suffix.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field_name} {str(path)!r} is a directory, not a data file" if p.is_dir()
                          else f"{field_name} {str(path)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".csv":
        return _read_csv(p)
    if suffix == ".parquet":
        return _read_with_datasets("parquet", p)
    raise ConfigError(f"{field_name} {str(path)!r}: unsupported file type {suffix!r}; expected one of "
                      f"{', '.join(FILE_SUFFIXES)}")


def _read_jsonl(p: Path, text: str | None = None) -> RawRows:
    rows, problems = [], []
    text = _read_text(p) if text is None else text
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{p.name} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        except RecursionError:
            problems.append(f"{where}: invalid JSON (nested too deeply to read)")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        rows.append(Row(where, record))
    return RawRows(p.name, rows, problems)


def _read_json(p: Path) -> RawRows:
    """A JSON array of objects, {"data": [...]}, a column dict, or JSON Lines saved as .json."""
    text = _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _read_jsonl(p, text)
        return RawRows(p.name, [],
                       [f"{p.name} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"])
    except RecursionError:
        return RawRows(p.name, [], [f"{p.name}: invalid JSON (nested too deeply to read)"])
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        n = len(next(iter(data.values())))
        if any(len(v) != n for v in data.values()):
            return RawRows(p.name, [], [f"{p.name}: columns have different lengths"])
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        return RawRows(p.name, [], [f"{p.name}: expected a list of objects, got {type(data).__name__}"])
    rows, problems = [], []
    for i, record in enumerate(data, start=1):
        where = f"{p.name} item {i}"
        if isinstance(record, dict):
            rows.append(Row(where, record))
        else:
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
    return RawRows(p.name, rows, problems)


def _read_csv(p: Path) -> RawRows:
    """Rows by line; a line the csv module cannot parse is a problem, and reading goes on after it."""
    text = _read_text(p)
    # csv refuses fields over 128 KiB by default (a process-wide setting, put back below); a long
    # document in one cell is a real row, as pandas and `datasets` read it, and no field can be
    # longer than the file that is already in memory.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))
    try:
        return _csv_rows(p, text)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(p: Path, text: str) -> RawRows:
    rows, problems = [], []
    consumed = 0  # physical lines handed to the reader so far; a quoted field can span several

    def lines():
        nonlocal consumed
        for line in io.StringIO(text, newline=""):  # newline="": csv sees quoted newlines
            consumed += 1
            yield line

    reader = csv.DictReader(lines())
    start = 2
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(f"{p.name} line {start}: unreadable CSV ({exc})")
            start = consumed + 1
            continue
        where, start = f"{p.name} line {start}", consumed + 1
        if None in record:
            problems.append(f"{where}: more fields than the header has columns")
            continue
        rows.append(Row(where, {k: v for k, v in record.items() if v is not None}))
    return RawRows(p.name, rows, problems)


def _lines(text: str) -> list[str]:
    """Split at \n, \r\n or \r only: str.splitlines also splits at U+2028, U+0085 and others, which
    JSON allows inside strings."""
    return io.StringIO(text, newline="").readlines()


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{p.name} line {line}: not valid UTF-8 ({exc.reason})") from exc


def _read_with_datasets(builder: str, p: Path) -> RawRows:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # pyarrow and datasets raise many types; the message is what matters
        raise DataError(f"{p.name}: cannot read as {builder}: {exc}") from exc
    return RawRows(p.name, [Row(f"{p.name} row {i}", r) for i, r in enumerate(ds, start=1)], [])


def read_dataset(name: str, config_name: str | None, split: str) -> RawRows:
    """Read one split of a `datasets` dataset (hub name or local dataset directory).

    Raises:
        ConfigError: the dataset or split cannot be loaded (offline, unknown name, unknown split).
    """
    import datasets

    try:
        if _saved_to_disk(name):  # a folder written by save_to_disk, which load_dataset refuses
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"it has no split {split!r}; its splits: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # network, missing split, bad config name: all are the user's to fix
        raise ConfigError(f"cannot load dataset {name!r} (config {config_name!r}, split {split!r}): "
                          f"{exc}") from exc
    label = f"{name}[{split}]"
    return RawRows(label, [Row(f"{label} row {i}", r) for i, r in enumerate(ds, start=1)], [])


def _saved_to_disk(name: str) -> bool:
    """True for a directory `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    p = Path(name)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())
