"""The Dragon Hatching tasks as builtin sources (all local: the standard library, bfcl-eval,
icalfa; nothing is downloaded). Each reader returns rows for split ``train`` or ``test``.

``pydoc_text`` -- English prose from ``pydoc_data.topics`` (the help texts that ship with Python;
their content depends on the Python version, 3.11 here). Paragraphs that are prose are kept
(indented code and grammar blocks, and heading underlines, are dropped), reflowed onto one line
and packed in order into chunks of at most ``TEXT_CHUNK`` bytes. Split (fixed, documented): with
h = the SHA-256 of the topic's name read as a number, a topic is in ``test`` when h % 10 == 0, in
``validation`` when h % 10 == 1, else in ``train``; whole topics, and a paragraph that a topic
shares with a topic of an earlier split (test, then validation) is dropped, so no paragraph is in
two splits.
(The ``pydoc_topics`` builtin is the same source as 1200-character pieces, code blocks included.)

``bfcl_calls`` -- function calling: BFCL ``simple`` + ``live_simple``. ``bfcl_tools`` -- tool use
among several tools: BFCL ``multiple`` (choose among 2-4 functions) + ``parallel`` (several calls
in one answer). Split: BFCL's own (:func:`skillstream.tools.bfcl.split_of`, by id). The prompt
lists each function as a compact signature ``name(param: type, optional?: type)`` (BFCL's full
JSON schemas are 500-3000 bytes, more than a byte-level model's context here) and the request;
the target is one ``<function_call>{"name": ..., "arguments": {...}}</function_call>`` per call,
with the first possible value of each parameter and optional ones left out. ``bfcl_calls:N``
(``bfcl_tools:N``) keeps only the examples whose prompt + target are at most N bytes, so that they
fit a small context; that subset is shorter, hence easier, than the whole of BFCL -- say so when
reporting it. The record (id,
category, functions, answer key) rides in the example's ``meta`` for the ``function_call`` metric.

``nl2bash_fenced`` -- NL2Bash (the builtin ``nl2bash`` split) with the command in a fenced
```` ```bash ```` block: in skillstream/data/builtin.py, beside ``nl2bash``.

``arithmetic`` -- SYNTHETIC: procedurally generated two-step arithmetic word problems with a worked
solution (chain of thought) ending in ``Answer: N``; the ``final_answer`` metric compares N
exactly. Problem i of a split comes from ``random.Random("arithmetic:<split>:<i>")``; the test
split (``ARITH_TEST`` problems) is generated first, then ``validation`` (as many, skipping test
texts), then ``train`` (skipping both), so no problem text is in two splits.
"""
from __future__ import annotations

import hashlib
import json
import random
import re

from ..errors import UserError
from .readers import Row

TEXT_CHUNK = 320
ARITH_TRAIN, ARITH_TEST = 4000, 200
CALL_INSTRUCTION = "Call the function that answers the request."
TOOL_INSTRUCTION = "Use the tools: call the right function(s) for the request."
ARITH_INSTRUCTION = "Solve step by step."


def _check_split(name: str, split: str, splits=("train", "test")) -> None:
    if split not in splits:
        raise UserError(f"{name}: unknown split {split!r} (expected {' or '.join(map(repr, splits))})")


# -- English text --------------------------------------------------------------------------------
def topic_split(name: str) -> str:
    h = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def _prose_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or lines[0][:1].isspace():
            continue  # indented: code, grammar, tables
        lines = [ln for ln in lines if not re.fullmatch(r"[*=\-~^]{3,}", ln.strip())]
        prose = " ".join(ln.strip() for ln in lines)
        if len(prose) >= 40 and not prose.startswith(("*", "+", "|")):
            out.append(prose)
    return out


def _chunks(paragraphs: list[str], size: int) -> list[str]:
    pieces = []
    for p in paragraphs:  # a paragraph longer than the chunk is cut at spaces
        while len(p.encode()) > size:
            cut = p.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            pieces.append(p[:cut].strip())
            p = p[cut:].strip()
        if p:
            pieces.append(p)
    chunks, cur = [], ""
    for piece in pieces:
        joined = f"{cur} {piece}" if cur else piece
        if cur and len(joined.encode()) > size:
            chunks.append(cur)
            cur = piece
        else:
            cur = joined
    return chunks + ([cur] if cur else [])


def pydoc_text_rows(split: str) -> list[Row]:
    _check_split("pydoc_text", split, ("train", "validation", "test"))
    from pydoc_data.topics import topics
    # Some topics repeat paragraphs of others: a paragraph of a test topic is dropped from the
    # validation and train topics, one of a validation topic from the train topics.
    order = ("test", "validation", "train")
    taken: set[str] = set()
    for s in order[: order.index(split)]:
        taken |= {p for name in topics if topic_split(name) == s for p in _prose_paragraphs(topics[name])}
    rows = []
    for name in sorted(topics):
        if topic_split(name) != split:
            continue
        paragraphs = [p for p in _prose_paragraphs(topics[name]) if p not in taken]
        for i, chunk in enumerate(_chunks(paragraphs, TEXT_CHUNK)):
            rows.append(Row({"text": chunk}, f"pydoc_data.topics[{name!r}] chunk {i}"))
    return rows


# -- BFCL function calls -------------------------------------------------------------------------
def _type_name(spec: dict) -> str:
    t = spec.get("type", "any")
    if t == "array" and isinstance(spec.get("items"), dict):
        return f"array[{_type_name(spec['items'])}]"
    return str(t)


def signature(function: dict) -> str:
    params = function.get("parameters") or {}
    required = set(params.get("required") or [])
    args = [f"{name}{'' if name in required else '?'}: {_type_name(spec if isinstance(spec, dict) else {})}"
            for name, spec in (params.get("properties") or {}).items()]
    return f"{function['name']}({', '.join(args)})"


def render_call_json(calls) -> str:
    return "".join(f"<function_call>{json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)}"
                   f"</function_call>" for c in calls)


def _bfcl_rows(categories: list[str], split: str, max_bytes: str | int | None = None) -> list[Row]:
    from ..evaluation.tool_ast import answer_to_calls
    from ..tools.bfcl import load_bfcl
    rows = []
    for r in load_bfcl(categories, split):
        request = "\n".join(str(m["content"]) for m in r["question"] if m["role"] == "user")
        prompt = "Functions:\n" + "\n".join(signature(f) for f in r["functions"]) + f"\nRequest: {request}"
        target = render_call_json(answer_to_calls(r["ground_truth"], r["functions"], omit_optional=True))
        if max_bytes and len(prompt.encode()) + len(target.encode()) > int(max_bytes):
            continue
        rows.append(Row({"prompt": prompt, "completion": target, "id": r["id"], "category": r["category"],
                         "functions": r["functions"], "ground_truth": r["ground_truth"]}, f"BFCL {r['id']}"))
    return rows


def bfcl_calls_rows(split: str, max_bytes: str | None = None) -> list[Row]:
    _check_split("bfcl_calls", split)
    return _bfcl_rows(["simple", "live_simple"], split, max_bytes)


def bfcl_tools_rows(split: str, max_bytes: str | None = None) -> list[Row]:
    _check_split("bfcl_tools", split)
    return _bfcl_rows(["multiple", "parallel"], split, max_bytes)


# -- synthetic arithmetic with worked steps ------------------------------------------------------
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mo", "Nia"]
ITEMS = ["apples", "books", "coins", "pens", "stamps", "marbles", "cards", "shells", "stickers", "eggs"]


def arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked solution ending in 'Answer: N', N)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b)
        q = f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} are left?"
        steps, ans = [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c
    elif kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c = rng.randint(1, a * b)
        q = f"A shop has {a} boxes with {b} {item} in each. It sells {c} {item}. How many {item} are left?"
        steps, ans = [f"{a} * {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c
    elif kind == 2:
        a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 50)
        q = f"{name} buys {b} bags of {a} {item} and already had {c}. How many {item} does {name} have?"
        steps, ans = [f"{b} * {a} = {a * b}.", f"{a * b} + {c} = {a * b + c}."], a * b + c
    else:
        k, qn = rng.randint(2, 9), rng.randint(2, 12)
        a, c = k * qn, rng.randint(1, 20)
        q = f"{name} shares {a} {item} equally among {k} friends. Each friend already had {c}. How many does each have now?"
        steps, ans = [f"{a} / {k} = {qn}.", f"{qn} + {c} = {qn + c}."], qn + c
    return q, " ".join(steps) + f" Answer: {ans}", ans


def _arith_split(split: str, n: int, exclude: set[str]) -> list[tuple[str, str, int]]:
    problems, i = [], 0
    while len(problems) < n:
        p = arithmetic_problem(random.Random(f"arithmetic:{split}:{i}"))
        i += 1
        if p[0] not in exclude:
            problems.append(p)
    return problems


def arithmetic_rows(split: str) -> list[Row]:
    _check_split("arithmetic", split, ("train", "validation", "test"))
    test = [arithmetic_problem(random.Random(f"arithmetic:test:{i}")) for i in range(ARITH_TEST)]
    problems = test
    if split != "test":
        seen = {q for q, _, _ in test}
        validation = _arith_split("validation", ARITH_TEST, seen)
        problems = validation if split == "validation" else \
            _arith_split("train", ARITH_TRAIN, seen | {q for q, _, _ in validation})
    return [Row({"prompt": q, "completion": sol, "references": [str(ans)]}, f"arithmetic {split} #{i}")
            for i, (q, sol, ans) in enumerate(problems)]


# name -> (reader, default instruction, default metric), merged into data.builtin.BUILTINS
DRAGON_BUILTINS = {
    "pydoc_text": (pydoc_text_rows, None, "perplexity"),
    "bfcl_calls": (bfcl_calls_rows, CALL_INSTRUCTION, "function_call"),
    "bfcl_tools": (bfcl_tools_rows, TOOL_INSTRUCTION, "function_call"),
    "arithmetic": (arithmetic_rows, ARITH_INSTRUCTION, "final_answer"),
}
