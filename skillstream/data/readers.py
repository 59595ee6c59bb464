"""Read rows from files, folders, builtins and Hugging Face datasets.

Every row keeps where it came from (`file line N` / `file row N`), so a bad row is reported as
one line naming the file, the line and the problem — never dropped silently.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass
class Row:
    data: dict
    where: str  # "train.jsonl line 7": used in every error about this row


def read_text(path: str | Path) -> str:
    """The text of a file the user wrote (a recipe, a data file, labels.json, stream.yaml), decoded
    as UTF-8. A file that is not UTF-8, or cannot be read, is a UserError naming the file and where:
    every reader of such files goes through here."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file") from None
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start} (line {line}, byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None


def _json_rows(path: Path) -> list[Row]:
    try:
        items = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path} item {i}: expected an object, got {type(item).__name__}")
        rows.append(Row(item, f"{path} item {i}"))
    return rows


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    with io.StringIO(read_text(path), newline=None) as f:  # the lines a text-mode open() would give
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise UserError(f"{path} line {n}: expected a JSON object, got {type(item).__name__}")
            rows.append(Row(item, f"{path} line {n}"))
    return rows


def _csv_rows(path: Path) -> list[Row]:
    with io.StringIO(read_text(path), newline="") as f:  # csv wants newline="" (quoted line breaks)
        reader = csv.DictReader(f)
        rows = []
        for item in reader:
            if None in item:  # more cells than header columns
                raise UserError(f"{path} line {reader.line_num}: more fields than the header has columns")
            rows.append(Row(dict(item), f"{path} line {reader.line_num}"))
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]})") from None
    return [Row(item, f"{path} row {i}") for i, item in enumerate(table.to_pylist())]


def _hf_rows(spec: str, split: str) -> list[Row]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # hub/network/missing-split errors come in many types
        raise UserError(f"dataset 'hf:{spec}' split {split!r}: cannot load ({str(e).strip().splitlines()[0]})") from None
    return [Row(dict(item), f"hf:{spec}[{split}] row {i}") for i, item in enumerate(ds)]


FILE_READERS = {".json": _json_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def read_file(path: Path, suffix: str | None = None) -> list[Row]:
    """Rows of one file, read by its suffix (or by `suffix`, for files named otherwise)."""
    reader = FILE_READERS.get((suffix or path.suffix).lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl, .json, .csv or .parquet)")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return reader(path)


def read_split(source: str, split: str) -> list[Row]:
    """Rows of one split of a source that is a file, a split folder, or 'hf:NAME[:CONFIG]'."""
    if source.startswith("hf:"):
        return _hf_rows(source[3:], split)
    path = Path(source)
    if path.is_dir():
        for suffix in FILE_READERS:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return read_file(candidate)
        raise UserError(f"{path}: no {split}.jsonl/.json/.csv/.parquet in this folder")
    if path.suffix.lower() in FILE_READERS:
        return read_file(path)
    raise UserError(f"data source {source!r}: not a file, a folder or 'hf:NAME' (and not a builtin)")
