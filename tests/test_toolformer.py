"""Toolformer augmentation: real executors (calculator, sandboxed Python, BM25 search), the loss
filter checked against a hand computation, insertion, and the CLI end to end."""
import json

import pytest
import torch

from conftest import run_cli
from skillstream.models.backbone import load_backbone
from skillstream.tools.calls import ToolCall, parse_inline
from skillstream.tools.toolformer import (
    BM25, Candidate, ToolError, augment_text, calculate, call_text, default_tools, loss_weights, position_probs,
    pydoc_index, python_tool, search_tool, strip_markup, utility,
)

TEXT = "The number in the next term is 18 + 12 x 3 = 54."
AT = TEXT.index(" 54")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", seed=0)


def test_calculator_computes_arithmetic_and_refuses_everything_else():
    assert calculate("18 + 12 x 3") == "54"
    assert calculate("400 / 1400") == "0.285714"
    assert calculate("sqrt(16) + 2**10 - 7 % 4") == "1025"
    for hostile in ["__import__('os').system('id')", "(1).__class__", "open('/etc/passwd')", "2**100000",
                    "10**99 * 10**99", "[x for x in range(10**9)]", "1/0", "9" * 300, "lambda: 1"]:
        with pytest.raises(ToolError):
            calculate(hostile)


def test_search_is_bm25_over_python_docs():
    index = pydoc_index()
    assert len(index.docs) > 1000
    top = index.search("context manager with statement", k=3)
    assert top and all("with" in d.lower() or "context" in d.lower() for _, d in top)
    small = BM25(["the cat sat on the mat", "dogs bark at night", "a cat and a dog"])
    assert [d for _, d in small.search("cat mat", k=2)] == ["the cat sat on the mat", "a cat and a dog"]
    assert search_tool(["alpha beta", "gamma delta"]).run({"query": "delta"}) == "gamma delta"
    with pytest.raises(ToolError):
        search_tool(["alpha"]).run({"query": "zzz"})


def test_python_tool_runs_in_the_sandbox():
    from skillstream.sandbox import SandboxUnavailable, run_python
    try:
        run_python("print(1)", timeout_s=5)
    except SandboxUnavailable:
        pytest.skip("no network isolation on this machine")
    tool = python_tool(timeout_s=2)
    assert tool.run({"code": "print(sum(range(10)))"}) == "45"
    with pytest.raises(ToolError):
        tool.run({"code": "while True: pass"})
    with pytest.raises(ToolError):
        tool.run({"code": "import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)"})


def _hand_weighted_loss(model, tok, prefix: str, following: list[int]) -> float:
    ids = tok(prefix, add_special_tokens=True)["input_ids"] + following
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    w = loss_weights(len(following[:5]))
    total = 0.0
    for t, tok_id in enumerate(following[:5]):
        pos = len(ids) - len(following) + t - 1
        total += -w[t] * float(logits[pos].log_softmax(-1)[tok_id])
    return total


def test_utility_is_toolformers_filter_computed_by_hand(tiny):
    model, tok = tiny
    call = ToolCall("calculator", {"expression": "18 + 12 * 3"})
    u = utility(model, tok, "", TEXT, AT, call, "54")
    following = tok(TEXT[AT:], add_special_tokens=False)["input_ids"]
    plus = _hand_weighted_loss(model, tok, TEXT[:AT] + call_text(call, "54"), following)
    none = _hand_weighted_loss(model, tok, TEXT[:AT], following)
    empty = _hand_weighted_loss(model, tok, TEXT[:AT] + call_text(call, ""), following)
    assert u["with_result"] == pytest.approx(plus, rel=1e-4)
    assert u["no_call"] == pytest.approx(none, rel=1e-4)
    assert u["no_result"] == pytest.approx(empty, rel=1e-4)
    assert u["utility"] == pytest.approx(min(none, empty) - plus, abs=1e-4)
    assert loss_weights(3) == pytest.approx([1 / 2.4, 0.8 / 2.4, 0.6 / 2.4])


def test_calls_are_executed_filtered_by_tau_and_inserted(tiny):
    model, tok = tiny
    tools = default_tools(["calculator"])
    good = Candidate(AT, ToolCall("calculator", {"expression": "18 + 12 * 3"}))
    broken = Candidate(AT, ToolCall("calculator", {"expression": "1/0"}))
    other_tool = Candidate(3, ToolCall("search", {"query": "x"}))
    u = utility(model, tok, "", TEXT, AT, good.call, "54")["utility"]

    kept = augment_text(model, tok, TEXT, tools, tau=u - 1e-3, candidates=[good, broken, other_tool])
    assert kept["stats"] == {"proposed": 3, "parsed": 3, "executed": 1, "failed": 2, "kept": 1}
    [c] = kept["tool_calls"]
    assert (c["name"], c["arguments"], c["position"], c["result"]) == ("calculator", {"expression": "18 + 12 * 3"}, AT, "54")
    assert c["utility"] == pytest.approx(u, abs=1e-5)
    assert kept["augmented_text"] == TEXT[:AT] + " <tool>calculator(expression='18 + 12 * 3')</tool><result>54</result>" + TEXT[AT:]
    assert strip_markup(kept["augmented_text"]) == TEXT
    calls, errors = parse_inline(kept["augmented_text"])
    assert [c.name for c in calls] == ["calculator"] and not errors

    dropped = augment_text(model, tok, TEXT, tools, tau=u + 1e-3, candidates=[good])
    assert dropped["tool_calls"] == [] and dropped["augmented_text"] == TEXT


def test_position_probabilities_cover_every_word_boundary(tiny):
    model, tok = tiny
    probs = position_probs(model, tok, "Input: x\nOutput:", TEXT)
    assert [off for off, _ in probs] == [i for i, ch in enumerate(TEXT) if ch == " " and i > 0]
    assert all(0 < p < 1 for _, p in probs)


def test_cli_writes_augmented_jsonl(tmp_path):
    rows = [{"text": TEXT},
            {"messages": [{"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "6 x 7 is 42."}]}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("toolformer", str(inp), str(tmp_path / "out.jsonl"), "--model", "tiny", "--tau", "-100",
                "--tools", "calculator", "--positions", "1", "--samples", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 2
    assert out[0]["original_text"] == TEXT and strip_markup(out[0]["augmented_text"]) == TEXT
    assert out[1]["original_text"] == "6 x 7 is 42." and out[1]["messages"][0] == rows[1]["messages"][0]
    for row in out:
        assert row["stats"]["proposed"] >= row["stats"]["parsed"] >= row["stats"]["kept"]
        for c in row["tool_calls"]:
            assert {"name", "arguments", "position", "result", "utility"} <= set(c)
    bad = run_cli("toolformer", str(inp), str(tmp_path / "o2.jsonl"), "--model", "tiny", "--tools", "calculator,web",
                  cwd=tmp_path)
    assert bad.returncode == 2 and "unknown tool 'web'" in bad.stderr
