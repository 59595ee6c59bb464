"""Builtin BFCL data (Berkeley Function-Calling Leaderboard), read from the installed
``bfcl-eval`` package (``pip install --no-deps bfcl-eval``); nothing is downloaded or copied.

Categories: simple, live_simple, multiple, live_multiple, parallel, irrelevance. Each is the file
``BFCL_v<N>_<stem>.json`` (the newest N present; the stem is the category's name except
``simple_python`` for simple) with the answer key of the same name under ``possible_answer/``;
irrelevance has none -- its answer is "no call".

A record is ``{"id", "category", "question": [chat messages], "functions": [BFCL function
schemas], "ground_truth": [{function_name: {param: [possible values]}}]}``. BFCL's schemas use
its own type names (``dict``, ``float``, ``tuple``, ``any``); :func:`tool_schemas` turns them into
JSON Schema for a chat template's ``tools``.

Split (fixed and deterministic): an example is in ``test`` when the SHA-256 of its id, read as a
number, is divisible by 5 -- about 20% -- and in ``train`` otherwise. It depends on the id alone, so
it does not change with file order, the categories loaded, or a new release that adds examples.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

from ..data.readers import read_file
from ..errors import UserError
from ..evaluation.tool_ast import answer_to_calls
from ..files import package_dir
from .calls import calls_to_message

CATEGORIES = {
    "simple": "simple_python",
    "live_simple": "live_simple",
    "multiple": "multiple",
    "live_multiple": "live_multiple",
    "parallel": "parallel",
    "irrelevance": "irrelevance",
}
SPLITS = ("train", "test", "all")
DECLINE = "None of the given functions fits this request."  # the target answer of irrelevance examples


def data_dir() -> Path:
    return package_dir("bfcl_eval", "bfcl-eval==2026.3.23", "BFCL data") / "data"


def split_of(example_id: str) -> str:
    return "test" if int(hashlib.sha256(example_id.encode()).hexdigest(), 16) % 5 == 0 else "train"


def _data_file(folder: Path, stem: str) -> Path:
    versions = {}
    for path in folder.glob(f"BFCL_v*_{stem}.json"):
        m = re.fullmatch(rf"BFCL_v(\d+)_{re.escape(stem)}\.json", path.name)
        if m:
            versions[int(m.group(1))] = path
    if not versions:
        raise UserError(f"{folder}: no BFCL_v*_{stem}.json (is bfcl-eval installed?)")
    return versions[max(versions)]


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for row in read_file(path, suffix=".jsonl"):  # BFCL's .json files hold one object per line
        missing = [k for k in keys if k not in row.data]
        if missing:
            raise UserError(f"{row.where}: missing key {missing[0]!r}")
        rows.append(row.data)
    return rows


def _messages(question: list, path: Path, example_id: str) -> list[dict]:
    """BFCL's question is a list of turns, each a list of messages; single-turn here."""
    turns = question if question and isinstance(question[0], list) else [question]
    messages = [m for turn in turns for m in turn]
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise UserError(f"{path}: example {example_id!r}: question messages need 'role' and 'content'")
    return messages


def load_category(category: str, folder: Path | None = None) -> list[dict]:
    """All records of one category, in file order."""
    if category not in CATEGORIES:
        raise UserError(f"unknown BFCL category {category!r} (expected one of {', '.join(CATEGORIES)})")
    folder = folder or data_dir()
    path = _data_file(folder, CATEGORIES[category])
    rows = _read_jsonl(path, ("id", "question", "function"))
    answers: dict[str, list] = {}
    if category != "irrelevance":
        answer_path = _data_file(folder / "possible_answer", CATEGORIES[category])
        answers = {r["id"]: r["ground_truth"] for r in _read_jsonl(answer_path, ("id", "ground_truth"))}
    records = []
    for row in rows:
        if category != "irrelevance" and row["id"] not in answers:
            raise UserError(f"{answer_path}: no answer for example {row['id']!r}")
        records.append(
            {
                "id": row["id"],
                "category": category,
                "question": _messages(row["question"], path, row["id"]),
                "functions": row["function"],
                "ground_truth": answers.get(row["id"], []),
            }
        )
    return records


def load_bfcl(categories: list[str] | None = None, split: str = "train", folder: Path | None = None) -> list[dict]:
    """Records of the given categories (all six by default) in the given split (see module doc).

    Several categories are interleaved, one record of each in turn (a category that runs out drops
    out), so that the first N records -- a source's `limit: N` -- sample every category alike instead
    of taking N from the first one."""
    if split not in SPLITS:
        raise UserError(f"unknown BFCL split {split!r} (expected one of {', '.join(SPLITS)})")
    per_category = [[r for r in load_category(category, folder) if split == "all" or split_of(r["id"]) == split]
                    for category in categories or list(CATEGORIES)]
    return [r for turn in itertools.zip_longest(*per_category) for r in turn if r is not None]


# -- chat-template form ------------------------------------------------------------------------
_JSON_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def _json_schema(spec):
    if isinstance(spec, list):
        return [_json_schema(s) for s in spec]
    if not isinstance(spec, dict):
        return spec
    out = {}
    for key, value in spec.items():
        if key == "type" and isinstance(value, str) and value in _JSON_SCHEMA_TYPES:
            if _JSON_SCHEMA_TYPES[value] is not None:  # "any": no type constraint at all
                out[key] = _JSON_SCHEMA_TYPES[value]
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: _json_schema(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _json_schema(value)
        else:
            out[key] = value
    return out


def tool_schemas(functions: list[dict]) -> list[dict]:
    """BFCL functions as the ``tools`` list of a chat template (JSON Schema type names)."""
    return [
        {
            "type": "function",
            "function": {
                "name": f["name"],
                "description": f.get("description", ""),
                "parameters": _json_schema(f.get("parameters") or {"type": "object", "properties": {}}),
            },
        }
        for f in functions
    ]


def to_trl_example(record: dict) -> dict:
    """A record as a TRL conversational example: the question, then the assistant's calls (the
    first possible value of each parameter), plus its ``tools``. Irrelevance examples end with an
    assistant message that declines instead."""
    calls = answer_to_calls(record["ground_truth"], record["functions"])
    answer = calls_to_message(calls) if calls else {"role": "assistant", "content": DECLINE}
    return {"messages": [*record["question"], answer], "tools": tool_schemas(record["functions"])}


def bfcl_rows(categories: list[str] | None, split: str):
    """Rows of the builtin data source ``bfcl``: TRL conversational examples (``messages``,
    ``tools``) that keep what the ``tool_call`` metric checks against (``functions``,
    ``ground_truth``, ``category``, ``id``)."""
    from ..data.readers import Row

    rows = []
    for record in load_bfcl(categories, split):
        example = to_trl_example(record)
        rows.append(Row({**example, "functions": record["functions"], "ground_truth": record["ground_truth"],
                         "category": record["category"], "id": record["id"]}, f"BFCL {record['id']}"))
    return rows
