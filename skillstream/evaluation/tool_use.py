"""The ``tool_use`` metric: does the model call the calculator where it helps (Toolformer's
evaluation on arithmetic, with the tool really run)?

    eval:
      - {name: arithmetic_tools, source: arithmetic, split: test, metric: tool_use, max_new_tokens: 48}

Each held-out word problem (prompt/completion rows whose worked solution ends in ``Answer: N``, as
the packaged ``arithmetic`` source has them) is asked with the ``calculator`` tool's schema
available. The model answers greedily; when its answer contains a calculator call, the call is run
by the real calculator (:func:`skillstream.tools.toolformer.calculate`), the call and its result
are appended to the conversation (assistant ``tool_calls``, then a ``tool`` turn), and the model
continues -- at most ``ROUNDS`` calls per problem. Reported, with Wilson 95% intervals:

* ``answer_accuracy`` (the main score): the last ``Answer: N`` of the model's turns equals the
  reference's exactly;
* ``call_rate``: share of problems where the model called the calculator at least once;
* ``helpful_call_rate``: share of problems with a call whose result is one of the numbers the
  reference solution computes (``... = N``): a call made where it helps;
* ``call_validity``: share of the calls that the calculator could run; ``calls``: how many.
"""
from __future__ import annotations

import re

from ..data.examples import Example
from ..data.render import user_text
from ..errors import UserError
from ..tools.calls import calls_to_message, parse_model_output
from ..tools.toolformer import ToolError, calculate
from ..tools.toolformer_chats import SCHEMAS
from .generation import generate
from .task_metrics import final_answer
from .intervals import wilson

ROUNDS = 4
_RESULT = re.compile(r"=\s*(-?\d+(?:\.\d+)?)")


def reference_results(ex: Example) -> set[str]:
    """The numbers the reference solution computes (after each '='), and its answer."""
    return set(_RESULT.findall(ex.completion)) | {final_answer(ex.completion)}


def require_tool_use_examples(task: str, examples: list[Example]) -> None:
    for ex in examples:
        if ex.kind != "prompt_completion" or final_answer(ex.completion or "") is None:
            raise UserError(f"data.eval[{task}]: metric 'tool_use' needs prompt/completion rows whose completion "
                            f"ends in 'Answer: N' (the arithmetic source), {ex.where} is not one")


def _run(call) -> str | None:
    if call.name != "calculator":
        return None
    try:
        return calculate(call.arguments.get("expression")) if set(call.arguments) == {"expression"} else None
    except ToolError:
        return None


def converse(respond, renderer, examples: list[Example]) -> tuple[list[list[str]], list[list[str | None]]]:
    """Every problem answered with the calculator run between turns (module doc). ``respond(prompts)``
    gives one model answer per prompt text. Returns the model's turns and each call's result (None:
    the calculator could not run it) per problem."""
    tools = [SCHEMAS["calculator"]]
    convs = [[{"role": "user", "content": user_text(ex)}] for ex in examples]
    texts = [[] for _ in examples]
    results = [[] for _ in examples]
    active = list(range(len(examples)))
    while active:
        outs = respond([renderer.chat(convs[i], add_generation_prompt=True, tools=tools) for i in active])
        still = []
        for i, out in zip(active, outs):
            texts[i].append(out)
            calls = parse_model_output(out).calls
            if not calls or len(results[i]) >= ROUNDS:
                continue
            call = calls[0]  # one call a turn: its result comes back before the next
            result = _run(call)
            results[i].append(result)
            convs[i] += [calls_to_message([call], out.split("<tool>")[0].strip()),
                         {"role": "tool", "name": call.name, "content": result if result is not None else "error"}]
            still.append(i)
        active = still
    return texts, results


def score_tool_use(texts: list[list[str]], results: list[list[str | None]], examples: list[Example]) -> dict:
    """The metric (module doc) from the model's turns and its calls' results."""
    answered = [final_answer(" ".join(t)) == final_answer(ex.completion) for t, ex in zip(texts, examples)]
    called = [bool(r) for r in results]
    helpful = [any(x is not None and x in reference_results(ex) for x in r) for r, ex in zip(results, examples)]
    calls = [x for r in results for x in r]
    valid = [x is not None for x in calls]
    n = len(examples)
    return {"answer_accuracy": sum(answered) / n, "outcomes": [int(x) for x in answered], "call_rate": sum(called) / n, "helpful_call_rate": sum(helpful) / n,
            "call_validity": sum(valid) / len(calls) if calls else None, "calls": len(calls), "n": n,
            "ci95": {"answer_accuracy": wilson(sum(answered), n), "call_rate": wilson(sum(called), n),
                     "helpful_call_rate": wilson(sum(helpful), n), "call_validity": wilson(sum(valid), len(calls))}}


def evaluate_tool_use(model, tok, renderer, examples: list[Example], batch_size: int, max_new_tokens: int) -> dict:
    texts, results = converse(lambda prompts: generate(model, tok, prompts, max_new_tokens, batch_size),
                              renderer, examples)
    out = score_tool_use(texts, results, examples)
    out["samples"] = [{"prompt": ex.prompt[:300], "turns": [t[:200] for t in ts], "results": r}
                      for ex, ts, r in zip(examples[:5], texts[:5], results[:5])]
    return out
