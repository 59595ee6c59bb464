"""The tool_workflow metric: multi-step tool dialogues (call -> result -> next call -> result ->
answer) checked step by step on hand-made outputs, including a dialogue that fails at its second
step; the packaged tool_workflows source; a call without its tool result refused in one line."""
import json

import pytest
import yaml

from conftest import run_cli
from skillstream.config import SourceConfig
from skillstream.data.examples import Example, load_examples
from skillstream.data.render import Renderer
from skillstream.errors import UserError
from skillstream.evaluation.tool_workflow import evaluate_workflows, score_workflows, step_prompts, workflow_steps
from skillstream.models.backbone import load_backbone


@pytest.fixture(scope="module")
def dialogue():
    # arithmetic test #0: "A shop has 2 boxes with 10 eggs in each. It sells 20 eggs. How many eggs are left?"
    ex = load_examples(SourceConfig(source="tool_workflows", split="test", limit=1))[0]
    calls = [m["tool_calls"][0]["function"] for m in ex.messages if m.get("tool_calls")]
    assert calls == [{"name": "multiply", "arguments": {"a": 2, "b": 10}},
                     {"name": "subtract", "arguments": {"a": 20, "b": 20}}]
    assert [m["content"] for m in ex.messages if m["role"] == "tool"] == ["20", "0"]
    assert ex.messages[-1] == {"role": "assistant", "content": "Answer: 0"}
    return ex


def test_each_step_is_checked_on_its_own(dialogue):
    right = ["<tool>multiply(a=2, b=10)</tool>", '{"name": "subtract", "arguments": {"a": 20, "b": 20}}',
             "Answer: 0"]
    second_wrong = ["<tool>multiply(a=2, b=10)</tool>", "<tool>add(a=20, b=20)</tool>", "Answer: 0"]
    first_wrong = ["<tool>multiply(a=10, b=2)</tool>", "<tool>subtract(a=20, b=20)</tool>", "The answer is 0."]
    out = score_workflows([right, second_wrong, first_wrong], [dialogue] * 3)
    assert out["per_example"] == [{"passed": [True, True, True], "failed_at": None},
                                  {"passed": [True, False, True], "failed_at": 2},
                                  {"passed": [False, True, False], "failed_at": 1}]
    assert out["workflow_success"] == pytest.approx(1 / 3) and out["first_call_accuracy"] == pytest.approx(2 / 3)
    assert out["final_answer_accuracy"] == pytest.approx(2 / 3) and out["step_accuracy"] == pytest.approx(6 / 9)
    assert out["failed_at"] == {"2": 1, "1": 1} and out["n"] == 3 and out["steps"] == 9
    lo, hi = out["ci95"]["workflow_success"]
    assert lo < 1 / 3 < hi


def test_steps_continue_the_reference_conversation(dialogue):
    prompts = step_prompts(dialogue)
    assert [len(p.messages) for p in prompts] == [2, 4, 6]
    assert prompts[1].messages[-2] == {"role": "tool", "name": "multiply", "content": "20"}  # the result it builds on


def test_the_metric_runs_on_a_model(dialogue):
    model, tok = load_backbone("tiny", seed=0)
    out = evaluate_workflows(model, tok, Renderer(tok, 1024), [dialogue, dialogue], batch_size=4, max_new_tokens=4)
    assert out["n"] == 2 and out["steps"] == 6 and len(out["samples"][0]["outputs"]) == 3
    assert out["workflow_success"] == 0.0  # four random tokens pass no step


def test_a_call_without_its_result_is_one_line(dialogue, tmp_path):
    broken = [m for m in dialogue.messages if not (m["role"] == "tool" and m["content"] == "0")]
    with pytest.raises(UserError, match=r"messages\[3\]: the call to 'subtract' has no tool result"):
        workflow_steps(Example("messages", messages=broken, tools=dialogue.tools, where="x.jsonl line 1"))
    data = tmp_path / "dialogues.jsonl"
    data.write_text(json.dumps({"messages": broken, "tools": dialogue.tools}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "wf", "model": "tiny", "train": {"steps": 0},
                                      "data": {"eval": [{"name": "wf", "source": str(data), "metric": "tool_workflow"}]}}))
    r = run_cli("train", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"{data} line 1: messages[3]: the call to 'subtract' has no tool result "
        "(expected a 'tool' message with content at messages[4])")
    assert not (tmp_path / "run").exists()
