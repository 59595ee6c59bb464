"""The ``tool_workflow`` metric: multi-step tool dialogues (a call, its result, then the answer or
a next call), checked step by step.

A dialogue is a chat ``messages`` example with ``tools``: after the user's request, every
assistant turn is one **step** -- either tool calls (each followed by its ``tool`` result) or the
final answer. For each step the model continues the *reference* conversation up to that step
(earlier steps and their tool results as the data has them, so a step is scored on its own and a
wrong first call does not hide how the model uses a right result). A call step passes when the
answer's calls pass our BFCL AST checker against the reference calls (the same rules as the
``tool_call`` metric: names, required arguments, types, values); the final step passes when the
last ``Answer: N`` of the output equals the reference's exactly (``final_answer``'s rule), or,
when the reference answer has no ``Answer:``, when the output is the reference text (stripped).

Reported, with Wilson 95% intervals: ``workflow_success`` (the main score: every step of the
dialogue passed), ``first_call_accuracy``, ``final_answer_accuracy``, ``step_accuracy`` (over all
steps), ``failed_at`` (how many dialogues failed first at step 1, 2, ...), ``n``, ``steps``.

The builtin ``tool_workflows`` source (``source: tool_workflows``, splits train / validation /
test; skillstream/data/tool_workflows.py) makes such dialogues from the package's ``arithmetic`` word problems (their worked steps, so
every number is computed, not written by hand): the request, a call to ``add`` / ``subtract`` /
``multiply`` / ``divide`` with the first step's two integers, its result, a call for the second step
on that result, its result, and ``Answer: N``. A reference call whose ``tool`` result is missing is
refused before the run starts, in one line naming the row.
"""
from __future__ import annotations

from ..data.examples import Example
from ..errors import UserError
from ..tools.calls import parse_model_output
from .generation import generate
from .task_metrics import final_answer
from .tool_ast import check
from .intervals import wilson


def workflow_steps(ex: Example) -> list[int]:
    """Indices of the assistant turns (the steps); refuses a dialogue a step of which cannot be scored."""
    if ex.kind != "messages" or not ex.tools:
        raise UserError(f"{ex.where}: metric 'tool_workflow' needs chat 'messages' with 'tools' ({ex.kind} given)")
    msgs, steps = ex.messages, []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        steps.append(i)
        calls = m.get("tool_calls") or []
        for k, call in enumerate(calls):
            name = call.get("function", call)["name"]
            result = msgs[i + 1 + k] if i + 1 + k < len(msgs) else None
            if result is None or result["role"] != "tool" or result.get("content") in (None, ""):
                raise UserError(f"{ex.where}: messages[{i}]: the call to {name!r} has no tool result "
                                f"(expected a 'tool' message with content at messages[{i + 1 + k}])")
    if not steps or msgs[steps[-1]].get("tool_calls"):
        raise UserError(f"{ex.where}: metric 'tool_workflow' needs a dialogue that ends in the assistant's answer")
    if len(steps) < 2:
        raise UserError(f"{ex.where}: metric 'tool_workflow' needs at least one tool-call step before the answer")
    return steps


def require_workflow_examples(task: str, examples: list[Example]) -> None:
    """Checked before a run starts: every dialogue can be scored step by step."""
    for ex in examples:
        workflow_steps(ex)


def step_prompts(ex: Example) -> list[Example]:
    """One example per step: the reference conversation up to it, the step as its last assistant turn."""
    return [Example("messages", messages=ex.messages[:i + 1], tools=ex.tools, where=ex.where)
            for i in workflow_steps(ex)]


def step_passes(output: str, reference: dict, tools: list[dict]) -> bool:
    """Whether the model's output at one step does what the reference step did (module doc)."""
    if reference.get("tool_calls"):
        parsed = parse_model_output(output)
        if parsed.format_errors:
            return False
        ground_truth = []
        for call in reference["tool_calls"]:
            fn = call.get("function", call)
            ground_truth.append({fn["name"]: {k: [v] for k, v in (fn.get("arguments") or {}).items()}})
        functions = [t.get("function", t) for t in tools]
        category = "parallel" if len(ground_truth) > 1 else "simple"
        return check(parsed.calls, functions, ground_truth, category).valid
    gold = reference.get("content") or ""
    gold_answer = final_answer(gold)
    if gold_answer is not None:
        return final_answer(output) == gold_answer
    return output.strip() == gold.strip()


def score_workflows(outputs: list[list[str]], examples: list[Example]) -> dict:
    """Metrics of already generated step outputs (``outputs[i][j]``: dialogue i, step j)."""
    success, first, final, steps_ok, failed_at, rows = [], [], [], [], {}, []
    for outs, ex in zip(outputs, examples):
        idx = workflow_steps(ex)
        if len(outs) != len(idx):
            raise ValueError(f"{ex.where}: {len(outs)} outputs for {len(idx)} steps")
        passed = [step_passes(o, ex.messages[i], ex.tools) for o, i in zip(outs, idx)]
        steps_ok += passed
        first.append(passed[0])
        final.append(passed[-1])
        success.append(all(passed))
        fail = next((j + 1 for j, p in enumerate(passed) if not p), None)
        if fail is not None:
            failed_at[str(fail)] = failed_at.get(str(fail), 0) + 1
        rows.append({"passed": passed, "failed_at": fail})
    n = len(examples)

    def share(xs):
        return sum(xs) / len(xs) if xs else 0.0

    return {"workflow_success": share(success), "outcomes": [int(x) for x in success], "first_call_accuracy": share(first),
            "final_answer_accuracy": share(final), "step_accuracy": share(steps_ok),
            "failed_at": failed_at, "n": n, "steps": len(steps_ok),
            "ci95": {"workflow_success": wilson(sum(success), n), "first_call_accuracy": wilson(sum(first), n),
                     "final_answer_accuracy": wilson(sum(final), n), "step_accuracy": wilson(sum(steps_ok), len(steps_ok))},
            "per_example": rows}


def evaluate_workflows(model, tok, renderer, examples: list[Example], batch_size: int, max_new_tokens: int) -> dict:
    """Greedy answers at every step of every dialogue (one batched generation), scored."""
    prompts = [step_prompts(ex) for ex in examples]
    flat = [renderer.prompt_text(p) for ps in prompts for p in ps]
    generated = generate(model, tok, flat, max_new_tokens, batch_size)
    outputs, at = [], 0
    for ps in prompts:
        outputs.append(generated[at:at + len(ps)])
        at += len(ps)
    out = score_workflows(outputs, examples)
    out["samples"] = [{"prompt": ex.messages[0].get("content", "")[:300], "outputs": [o[:200] for o in outs],
                       "passed": r["passed"]} for ex, outs, r in zip(examples[:5], outputs[:5], out["per_example"][:5])]
    del out["per_example"]
    return out
