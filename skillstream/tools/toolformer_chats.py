"""The ``toolformer`` data builder: Toolformer-augmented conversations made inside a recipe, as chat
``tool_calls`` (MUSE's first stage trains on them beside BFCL).

    train:
      - {source: "bfcl:simple,multiple", split: train}
      - source: toolformer.jsonl                 # written to the run directory when the stage begins
        weight: 0.25
        build: {name: toolformer, corpus: arithmetic, split: train, limit: 400, tools: [calculator], tau: 0.1}

For each example of the ``corpus`` (any source with prompt/completion rows, e.g. the packaged
``arithmetic`` word problems with worked solutions, ``nl2bash``; or chat ``messages``, whose last
assistant turn is the answer) the answer text is augmented by :mod:`skillstream.tools.toolformer`
on the model as it is when the stage begins: candidate calls are executed by the real tools and
kept only when they lower the loss of what follows by at least ``tau`` (Toolformer's filter, with
the user's request as context). Candidates come from

* ``candidates: model`` (default) -- the model proposes them, as in the paper (few-shot prompt,
  likely positions, sampled calls);
* ``candidates: arithmetic`` -- every ``A op B =`` in the answer gives the calculator call
  ``calculator(expression='A op B')`` at that position: the heuristic proposal Toolformer's authors
  used for the calculator too (they kept only texts with numbers); execution and the filter decide
  as for model proposals, so a call that does not help is still dropped.

The augmented answer (`` <tool>CALL</tool><result>R</result>`` inline) becomes chat messages with
:func:`skillstream.tools.calls.inline_to_messages`: the user's request, then an assistant turn
with the text before each call and the call as ``tool_calls``, a ``tool`` turn with its result, and
the rest of the answer; the rows carry the tools' JSON schemas (``tools``), so they train like
BFCL's conversations (loss on the assistant turns only). Rows where no call was kept are left out
(Toolformer fine-tunes on the texts the filter annotated) and counted; a corpus that yields no
kept call at all stops the run in one line (nothing would be learnt about tools).

Returned counts (results.json ``stages[i].built``): rows read, rows written, rows without a kept
call, and the filter's totals (proposed, parsed, executed, failed, kept).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..config import SourceConfig
from ..data.examples import load_examples
from ..data.render import user_text
from ..errors import UserError
from ..files import write_jsonl
from .calls import ToolCall, inline_to_messages
from .toolformer import Candidate, augment_text, default_tools

CANDIDATES = ("model", "arithmetic")
SCHEMAS = {
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluates an arithmetic expression (numbers, + - * / // % **, "
                                             "sqrt, log, exp, sin, cos, tan, abs, round, min, max) and returns its value.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. '12 * 9'"}},
                       "required": ["expression"]}}},
    "python": {"type": "function", "function": {
        "name": "python", "description": "Runs Python code in a sandbox and returns what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}},
    "search": {"type": "function", "function": {
        "name": "search", "description": "Returns the most relevant paragraph of the Python documentation.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
}
_ARITHMETIC = re.compile(r"(-?\d+(?:\.\d+)?(?:\s*[-+*/]\s*-?\d+(?:\.\d+)?)+)\s*=(?= )")


def arithmetic_candidates(text: str) -> list[Candidate]:
    """A calculator call after each ``A op B =`` of the text (the position is the space after '=')."""
    return [Candidate(m.end(), ToolCall("calculator", {"expression": " ".join(m.group(1).split())}))
            for m in _ARITHMETIC.finditer(text)]


def _request_and_answer(ex) -> tuple[list[dict], str]:
    """(the conversation before the answer, the answer text) of a corpus example."""
    if ex.kind == "prompt_completion":
        return [{"role": "user", "content": user_text(ex)}], ex.completion
    if ex.kind == "messages":
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        content = ex.messages[last].get("content")
        if isinstance(content, str) and content and not ex.messages[last].get("tool_calls"):
            return ex.messages[:last], content
    raise UserError(f"{ex.where}: builder toolformer needs prompt/completion rows or messages ending in an "
                    f"assistant text answer ({ex.kind} given)")


def chat_row(context: list[dict], augmented: str, tools: list[str]) -> dict:
    """One training conversation from an augmented answer (inline calls -> chat tool_calls)."""
    messages = [dict(m) for m in context]
    for m in inline_to_messages(augmented):
        if isinstance(m.get("content"), str):
            m["content"] = m["content"].strip()
            if not m["content"] and m["role"] == "assistant":
                del m["content"]
        messages.append(m)
    return {"messages": messages, "tools": [SCHEMAS[t] for t in tools]}


def toolformer_chats(out: str | Path, *, model, tokenizer, renderer, recipe=None, corpus: str = "arithmetic",
                     split: str = "train", limit: int | None = None, tools: list[str] | None = None,
                     candidates: str = "model", tau: float = 0.1, positions: int = 3, threshold: float = 0.0,
                     samples: int = 2, max_calls: int = 3, span: int = 5, seed: int | None = None) -> dict:
    """Write Toolformer-augmented chat conversations to ``out`` (JSONL); returns the counts (module doc).
    Under ``--smoke`` (a wiring check) at most 4 texts, one position and one sample each, and every
    executed call is kept: the smoke model has learnt nothing by which a call could lower its loss."""
    import torch

    where = "builder toolformer"
    if candidates not in CANDIDATES:
        raise UserError(f"{where}: candidates must be one of {', '.join(CANDIDATES)} (got {candidates!r})")
    tools = list(tools or ["calculator"])
    if candidates == "arithmetic" and tools != ["calculator"]:
        raise UserError(f"{where}: candidates: arithmetic proposes calculator calls only (tools: [calculator])")
    executors = default_tools(tools)
    if recipe is not None and recipe.smoke:
        limit, positions, samples, tau = min(limit or 4, 4), 1, 1, float("-inf")
    examples = load_examples(SourceConfig(source=corpus, split=split, limit=limit))
    seed = seed if seed is not None else (recipe.seed if recipe is not None else 0)
    rows, totals, without = [], {"proposed": 0, "parsed": 0, "executed": 0, "failed": 0, "kept": 0}, 0
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for ex in examples:
            context, answer = _request_and_answer(ex)
            prefix = renderer.chat(context, add_generation_prompt=True)
            res = augment_text(model, tokenizer, answer, executors, tau=tau, context=prefix, positions=positions,
                               threshold=threshold, samples=samples, max_calls=max_calls, span=span,
                               candidates=arithmetic_candidates(answer) if candidates == "arithmetic" else None)
            totals = {k: totals[k] + v for k, v in res["stats"].items()}
            if not res["tool_calls"]:
                without += 1
                continue
            row = chat_row(context, res["augmented_text"], tools)
            row["utility"] = [round(c["utility"], 6) for c in res["tool_calls"]]
            rows.append(row)
    if not rows:
        raise UserError(f"{where}: no call was kept in {len(examples)} texts of {corpus!r} ({split}): "
                        f"{totals['proposed']} proposed, {totals['parsed']} parsed, {totals['executed']} executed, "
                        f"none lowered the loss by tau {tau}; lower tau, or use candidates: arithmetic")
    write_jsonl(Path(out), rows)
    return {"texts": len(examples), "rows": len(rows), "without_call": without, **totals}
