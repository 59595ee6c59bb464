"""The builtin ``tool_workflows`` source: multi-step tool dialogues made from the package's
``arithmetic`` word problems (data/dragon_tasks.py), for the ``tool_workflow`` metric
(evaluation/tool_workflow.py).

Each problem's worked solution has two steps (``12 * 9 = 108. 108 - 5 = 103.``); the dialogue is the
request, a call to ``add`` / ``subtract`` / ``multiply`` / ``divide`` with the first step's two
integers, its ``tool`` result, a call for the second step on that result, its result, and the
answer ``Answer: N``. Every number is computed by the generator, none written by hand. Splits
train / validation / test are the arithmetic splits (no problem text in two of them).
"""
from __future__ import annotations

import re

from .dragon_tasks import arithmetic_rows
from .readers import Row

_OPS = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}
_WORDS = {"add": "a + b", "subtract": "a - b", "multiply": "a * b", "divide": "a / b (exact integer division)"}
_STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)\.")


def _tool(name: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"Returns {_WORDS[name]} for two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "first operand"},
                                                        "b": {"type": "integer", "description": "second operand"}},
                       "required": ["a", "b"]}}}


WORKFLOW_TOOLS = [_tool(n) for n in ("add", "subtract", "multiply", "divide")]


def _call(name: str, a: int, b: int) -> dict:
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"a": a, "b": b}}}]}


def workflow_rows(split: str) -> list[Row]:
    """The builtin ``tool_workflows`` source (see the module doc)."""
    rows = []
    for r in arithmetic_rows(split):
        steps = _STEP.findall(r.data["completion"])
        answer = r.data["references"][0]
        question = r.data["prompt"]
        messages = [{"role": "user", "content": f"{question} Use the tools for each step, then reply 'Answer: N'."}]
        for a, op, b, result in steps:
            name = _OPS[op]
            messages += [_call(name, int(a), int(b)), {"role": "tool", "name": name, "content": result}]
        messages.append({"role": "assistant", "content": f"Answer: {answer}"})
        rows.append(Row({"messages": messages, "tools": WORKFLOW_TOOLS}, r.where))
    return rows


