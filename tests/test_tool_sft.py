"""Tool-calling conversations: rendering (fallback and native templates), SFT loss masking on the
assistant turns only, the tool_call metric, and one-line errors for bad tool data."""
import copy
import json

import pytest
import yaml

from conftest import run_cli
from skillstream.config import SourceConfig
from skillstream.data.examples import load_examples
from skillstream.data.render import IGNORE, Renderer
from skillstream.data.tool_chat import TOOLS_HEADER, template_supports_tools
from skillstream.errors import UserError
from skillstream.evaluation.runner import evaluate_examples
from skillstream.evaluation.tool_ast import answer_to_calls
from skillstream.evaluation.intervals import wilson
from skillstream.evaluation.tool_metrics import score_outputs
from skillstream.models.backbone import load_backbone, load_tokenizer
from skillstream.objectives.lm import LMObjective
from skillstream.tools.calls import parse_model_output, render_inline

NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def bfcl_train():
    return load_examples(SourceConfig(source="bfcl:simple,parallel,irrelevance", split="train"))


def _trainable(tok, item) -> str:
    return tok.decode([t for t in item.labels if t != IGNORE])


def _prompt_part(tok, item) -> str:
    first = next(i for i, t in enumerate(item.labels) if t != IGNORE)
    return tok.decode(item.input_ids[:first])


def test_bfcl_source_loads_conversations_with_tools_and_answer_keys(bfcl_train):
    cats = {e.meta["category"] for e in bfcl_train}
    assert cats == {"simple", "parallel", "irrelevance"}
    ex = bfcl_train[0]
    assert ex.kind == "messages" and ex.tools[0]["type"] == "function"
    assert ex.messages[-1]["tool_calls"] and ex.meta["ground_truth"]
    assert len(load_examples(SourceConfig(source="bfcl", split="test"))) == 490  # all six categories
    with pytest.raises(UserError, match="unknown BFCL category 'simpel'"):
        load_examples(SourceConfig(source="bfcl:simpel"))


def test_sft_loss_only_on_the_assistant_tool_call_and_schemas_in_the_prompt(tok, bfcl_train):
    assert not template_supports_tools(tok)  # SmolLM2's template ignores tools: our fallback renders them
    renderer = Renderer(tok, 2048)
    ex = next(e for e in bfcl_train if e.meta["category"] == "parallel")
    item = LMObjective().tokenize(ex, renderer)
    calls = [c["function"] for c in ex.messages[-1]["tool_calls"]]
    target = "".join(render_inline(c) for c in answer_to_calls(ex.meta["ground_truth"], ex.meta["functions"]))
    assert _trainable(tok, item) == target + "<|im_end|>\n"
    prompt = _prompt_part(tok, item)
    assert TOOLS_HEADER.splitlines()[0] in prompt
    for tool in ex.tools:  # every schema, with its parameters, is in the (untrained) prompt
        assert json.dumps(tool["function"]) in prompt
    assert ex.messages[0]["content"] in prompt
    parsed = parse_model_output(target)
    assert [c.name for c in parsed.calls] == [c["name"] for c in calls] and not parsed.format_errors


def test_multi_turn_tool_results_are_context_and_every_assistant_turn_is_learned(tok, bfcl_train):
    renderer = Renderer(tok, 2048)
    ex = copy.deepcopy(bfcl_train[0])
    call = ex.messages[-1]
    ex.messages = ex.messages + [{"role": "tool", "name": call["tool_calls"][0]["function"]["name"], "content": "RESULT-25"},
                                 {"role": "assistant", "content": "It is 25."}]
    item = renderer.tokenize(ex)
    learned = _trainable(tok, item)
    assert "RESULT-25" not in learned and "It is 25.<|im_end|>" in learned and learned.startswith("<tool>")
    assert "RESULT-25" in tok.decode(item.input_ids)


def test_native_templates_get_tools_and_tool_calls_unchanged(bfcl_train):
    tok = load_tokenizer("tiny")
    tok.chat_template = NATIVE_TEMPLATE
    assert template_supports_tools(tok)
    renderer = Renderer(tok, 2048)
    ex = bfcl_train[0]
    item = renderer.tokenize(ex)
    name = ex.tools[0]["function"]["name"]
    assert _prompt_part(tok, item).startswith(f"<|im_start|>system\nTOOLS: {name}<|im_end|>")
    args = ex.messages[-1]["tool_calls"][0]["function"]["arguments"]
    assert _trainable(tok, item) == f"CALL {name} {json.dumps(args)}<|im_end|>\n"
    assert TOOLS_HEADER.splitlines()[0] not in tok.decode(item.input_ids)


def test_tool_call_metrics_on_known_answers(bfcl_train):
    simple = next(e for e in bfcl_train if e.meta["category"] == "simple" and len(e.meta["ground_truth"][0]) == 1
                  and len(next(iter(e.meta["ground_truth"][0].values()))) >= 2)
    irrelevant = next(e for e in bfcl_train if e.meta["category"] == "irrelevance")
    gold = answer_to_calls(simple.meta["ground_truth"], simple.meta["functions"])[0]
    wrong_value = type(gold)(gold.name, {**gold.arguments, next(iter(gold.arguments)): "zzz-wrong"})
    n_args = len(set(gold.arguments) | set(next(iter(simple.meta["ground_truth"][0].values()))))
    outputs = [render_inline(gold),                                   # right
               "<tool>no_such_function(x=1)</tool>",                  # wrong tool
               render_inline(wrong_value),                            # one wrong value
               f"<tool>{gold.name}(x=</tool>",                        # malformed
               "None of these functions can help with that.",         # irrelevance: declines
               f"<tool>{irrelevant.tools[0]['function']['name']}()</tool>"]  # irrelevance: calls anyway
    out = score_outputs(outputs, [simple] * 4 + [irrelevant] * 2)
    assert out["ast_accuracy"] == pytest.approx(2 / 6)
    assert out["format_validity"] == pytest.approx(5 / 6)
    assert out["tool_selection"] == pytest.approx(2 / 4)
    assert out["argument_accuracy"] == pytest.approx((1 + 0 + (n_args - 1) / n_args + 0) / 4)
    assert out["irrelevance_accuracy"] == pytest.approx(1 / 2)
    assert out["n_relevant"] == 4 and out["n_irrelevant"] == 2
    lo, hi = out["ci95"]["ast_accuracy"]
    assert lo < 2 / 6 < hi and [round(x, 4) for x in wilson(5, 10)] == [0.2366, 0.7634]
    assert out["errors"]["format"] == 1 and out["errors"]["irrelevance_call"] == 1


def test_tool_call_metric_runs_through_the_evaluation_runner():
    model, tok = load_backbone("tiny", seed=0)
    examples = load_examples(SourceConfig(source="bfcl:simple,irrelevance", split="test", limit=3))
    out = evaluate_examples(model, tok, Renderer(tok, 1024), examples, "tool_call", batch_size=3, max_new_tokens=8)
    assert out["metric"] == "ast_accuracy" and 0 <= out["score"] <= 1
    assert {"format_validity", "tool_selection", "argument_accuracy", "ci95"} <= set(out)
    assert len(out["samples"]) == 3


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOOL = {"type": "function", "function": {"name": "area", "description": "d",
                                         "parameters": {"type": "object", "properties": {"r": {"type": "number"}},
                                                        "required": ["r"]}}}


def _chat(name="area", tools=(TOOL,)):
    return {"messages": [{"role": "user", "content": "area of r=2?"},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"r": 2}}}]}],
            "tools": list(tools)}


@pytest.mark.parametrize("row, message", [
    (_chat(name="volume"), "line 2: messages[1]: call to unknown tool 'volume' (tools: area)"),
    (_chat(tools=[{"type": "function", "function": {"name": "area", "parameters": {"type": "object", "properties": {"r": {"type": "strng"}}}}}]),
     "line 2: tools: area.parameters.properties.r.type 'strng' is not a JSON Schema type"),
    (_chat(tools=[{"type": "function", "function": {"name": "area", "parameters": {"type": "object", "properties": {}, "required": ["r"]}}}]),
     "names 'r', which is not among its properties"),
    ({**_chat(), "tools": "[{not json"}, "line 2: tools: not valid JSON"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "A"}],
      "rejected": [{"role": "assistant", "content": "A"}]}, "line 2: 'chosen' and 'rejected' are identical"),
    ({"chosen": "A", "rejected": "B"}, "line 2: plain preference rows need a string 'prompt'"),
])
def test_bad_tool_and_preference_rows_get_one_line_naming_file_and_row(tmp_path, row, message):
    good = _chat() if "messages" in row else {"prompt": "p", "chosen": "A", "rejected": "B"}
    path = _write(tmp_path / "data.jsonl", [good, row])
    with pytest.raises(UserError) as e:
        load_examples(SourceConfig(source=str(path)))
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_cli_stops_with_status_2_on_identical_pairs(tmp_path):
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "A", "rejected": "B"},
                                             {"prompt": "p", "chosen": "same", "rejected": "same"}])
    recipe = {"name": "bad", "model": "tiny", "report_to": [], "objective": {"name": "dpo"},
              "data": {"train": [{"source": str(pairs)}]}, "train": {"steps": 1}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    r = run_cli("train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {pairs} line 2: 'chosen' and 'rejected' are identical; a pair must differ"
    assert not (tmp_path / "run").exists()
