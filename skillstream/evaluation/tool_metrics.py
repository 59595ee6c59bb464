"""The ``tool_call`` metric: generate an answer to each tool-calling conversation and check it.

For each example the model continues the conversation up to its last assistant turn (tool schemas
rendered as in :mod:`skillstream.data.tool_chat`); the answer is read with
:func:`~skillstream.tools.calls.parse_model_output` (never raises) and checked with our BFCL AST
checker (:mod:`skillstream.evaluation.tool_ast`). Reported, each with a 95% confidence interval:

* ``ast_accuracy`` (the main score): the answer is well formed and passes BFCL's rules for its
  category (for irrelevance examples: no call at all);
* ``format_validity``: share of answers with no malformed call (prose counts as well formed);
* ``tool_selection``: over examples that expect calls, the right functions called the right
  number of times, arguments aside;
* ``argument_accuracy``: over the same examples, BFCL-AST partial credit per expected call
  (:func:`~skillstream.evaluation.tool_ast.argument_accuracy`);
* ``irrelevance_accuracy``: over examples where no function fits, no call was attempted.

Intervals: Wilson score intervals for the shares, a normal interval for the mean argument credit.

Ground truth comes from the row's ``functions``/``ground_truth``/``category`` (the builtin
``bfcl`` source keeps them); for other tool-calling data it is the reference assistant turn's
calls (each argument's value as the one possible value), checked against the ``tools`` schemas.
"""
from __future__ import annotations


from ..data.examples import Example
from ..errors import UserError
from ..tools.calls import parse_model_output
from .generation import generate
from .intervals import mean_interval, wilson
from .tool_ast import argument_accuracy, check, tool_selection_correct

def answer_key(ex: Example) -> tuple[list[dict], list[dict], str]:
    """(functions, ground_truth, category) of a tool-calling example."""
    meta = ex.meta or {}
    if "ground_truth" in meta and "functions" in meta:
        return meta["functions"], meta["ground_truth"], str(meta.get("category", "simple"))
    if ex.kind != "messages" or not ex.tools:
        raise UserError(f"{ex.where}: metric 'tool_call' needs tool-calling conversations (messages + tools)")
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    calls = []
    for c in ex.messages[last].get("tool_calls") or []:
        fn = c.get("function", c)
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            import json
            args = json.loads(args) if args.strip() else {}
        calls.append({fn["name"]: {k: [v] for k, v in args.items()}})
    functions = [t.get("function", t) for t in ex.tools]
    category = "irrelevance" if not calls else "parallel" if len(calls) > 1 else "simple"
    return functions, calls, category


def require_tool_examples(task: str, examples: list[Example]) -> None:
    """Checked before a run starts: every example can be scored."""
    for ex in examples:
        if ex.kind != "messages":
            raise UserError(f"data.eval[{task}]: metric 'tool_call' needs chat 'messages' examples ({ex.where} is {ex.kind})")
        answer_key(ex)


def score_outputs(outputs: list[str], examples: list[Example]) -> dict:
    """Metrics of already generated answers (see the module doc)."""
    valid, ast_ok, selection, args, irrelevance, rows = [], [], [], [], [], []
    for out, ex in zip(outputs, examples):
        functions, ground_truth, category = answer_key(ex)
        parsed = parse_model_output(out)
        well_formed = not parsed.format_errors
        result = check(parsed.calls, functions, ground_truth, category)
        passed = well_formed and result.valid
        valid.append(well_formed)
        ast_ok.append(passed)
        if "irrelevance" in category:
            irrelevance.append(well_formed and not parsed.calls)
        else:
            selection.append(tool_selection_correct(parsed.calls, ground_truth))
            args.append(argument_accuracy(parsed.calls, functions, ground_truth))
        rows.append({"passed": passed, "error": None if passed else
                     ("format: " + "; ".join(parsed.format_errors) if not well_formed else result.error),
                     "error_kind": None if passed else ("format" if not well_formed else result.error_kind)})

    def share(xs):
        return sum(xs) / len(xs) if xs else None

    n = len(examples)
    return {
        "ast_accuracy": share(ast_ok) or 0.0,
        "format_validity": share(valid) or 0.0,
        "tool_selection": share(selection),
        "argument_accuracy": share(args),
        "irrelevance_accuracy": share(irrelevance),
        "n": n, "n_relevant": len(selection), "n_irrelevant": len(irrelevance),
        "ci95": {"ast_accuracy": wilson(sum(ast_ok), n), "format_validity": wilson(sum(valid), n),
                 "tool_selection": wilson(sum(selection), len(selection)),
                 "argument_accuracy": mean_interval(args),
                 "irrelevance_accuracy": wilson(sum(irrelevance), len(irrelevance))},
        "errors": _count(r["error_kind"] for r in rows if r["error_kind"]),
        "outcomes": [int(x) for x in ast_ok],
        "per_example": rows,
    }


def _count(kinds) -> dict:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return out


def evaluate_tool_calls(model, tok, renderer, examples: list[Example], batch_size: int, max_new_tokens: int) -> dict:
    outputs = generate(model, tok, [renderer.prompt_text(ex) for ex in examples], max_new_tokens, batch_size)
    out = score_outputs(outputs, examples)
    out["samples"] = [{"prompt": next((m.get("content") or "" for m in reversed(ex.messages[:-1])
                                       if m["role"] == "user"), "")[:300],
                       "output": o[:300], "passed": r["passed"], "error": r["error"]}
                      for ex, o, r in zip(examples[:5], outputs[:5], out["per_example"][:5])]
    del out["per_example"]
    return out
