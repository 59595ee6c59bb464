"""Verifier-built preference pairs: pass/fail pairing, gold fallback, unknown tools counted, user
pairs merged (and checked), reproducible sampling."""
import json

import pytest

from skillstream.config import SourceConfig
from skillstream.data.examples import load_examples
from skillstream.data.render import Renderer
from skillstream.errors import UserError
from skillstream.evaluation.tool_ast import answer_to_calls
from skillstream.models.backbone import load_backbone
from skillstream.objectives.preference_pairs import build_pairs, verifier_pairs
from skillstream.tools.calls import calls_to_message, render_inline


@pytest.fixture(scope="module")
def examples():
    return load_examples(SourceConfig(source="bfcl:simple", split="train", limit=3))


def test_pairs_a_passing_answer_with_a_failing_one(examples):
    ex = examples[0]
    gold = answer_to_calls(ex.meta["ground_truth"], ex.meta["functions"])
    wrong = type(gold[0])(gold[0].name, {k: "zzz" for k in gold[0].arguments})
    gold1 = answer_to_calls(examples[1].meta["ground_truth"], examples[1].meta["functions"])[0]
    wrong1 = type(gold1)(gold1.name, {k: "zzz" for k in gold1.arguments})
    samples = [[render_inline(gold[0]), render_inline(wrong), "<tool>nope(x=1)</tool>", render_inline(gold[0])],
               [render_inline(wrong1)] * 2,          # nothing passes: the data's answer is chosen
               [render_inline(answer_to_calls(examples[2].meta["ground_truth"], examples[2].meta["functions"])[0])]]
    rows, counts = build_pairs(examples, samples, pairs_per_prompt=2)
    assert counts["prompts"] == 3 and counts["samples"] == 7 and counts["passed"] == 3
    assert counts["unknown_tool"] == 1 and counts["no_failing"] == 1 and counts["gold_chosen"] == 1
    first = [r for r in rows if r["id"] == ex.meta["id"]]
    assert len(first) == 2  # two distinct failures, each against the (deduplicated) passing answer
    assert first[0]["chosen"] == [calls_to_message(gold)] and first[0]["chosen_source"] == "sample"
    assert first[0]["rejected"] == [calls_to_message([wrong])] and first[0]["rejected_error"] in ("value_error", "type_error")
    assert first[1]["rejected"] == [{"role": "assistant", "content": "<tool>nope(x=1)</tool>"}]  # unknown tool: raw text
    second = [r for r in rows if r["id"] == examples[1].meta["id"]]
    assert second[0]["chosen_source"] == "gold" and second[0]["chosen"] == [examples[1].messages[-1]]
    assert all(r["prompt"] == e.messages[:-1] and r["tools"] == e.tools
               for r in rows for e in examples if e.meta["id"] == r["id"])


def test_builder_samples_reproducibly_and_merges_user_pairs(tmp_path):
    model, tok = load_backbone("tiny", seed=0)
    renderer = Renderer(tok, 1024)
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    kw = dict(model=model, tokenizer=tok, renderer=renderer, prompts="bfcl:simple", limit=3, k=2,
              max_new_tokens=8, seed=7)
    counts = verifier_pairs(tmp_path / "a.jsonl", merge=[str(user)], **kw)
    verifier_pairs(tmp_path / "b.jsonl", merge=[str(user)], **kw)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert counts["samples"] == 6 and counts["merged"] == 1
    pairs = load_examples(SourceConfig(source=str(tmp_path / "a.jsonl")))
    assert len(pairs) == counts["pairs"] + 1 and pairs[-1].prompt == "2+2?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(UserError, match=f"{bad} line 1: 'chosen' and 'rejected' are identical"):
        verifier_pairs(tmp_path / "c.jsonl", merge=[str(bad)], **kw)
    with pytest.raises(UserError, match="temperature must be > 0"):
        verifier_pairs(tmp_path / "d.jsonl", temperature=0, **kw)


def test_min_margin_keeps_strong_preferences_and_counts_the_dropped(examples):
    ex = examples[0]  # calculate_triangle_area(base=10, height=5, unit='units')
    gold = answer_to_calls(ex.meta["ground_truth"], ex.meta["functions"])[0]
    one_wrong = type(gold)(gold.name, {**gold.arguments, "base": "zzz"})  # 2 of 3 arguments right: score 1/3
    malformed = "<tool>calculate_triangle_area(base=</tool>"               # score 0
    samples = [[render_inline(gold), render_inline(one_wrong), malformed]]
    rows, counts = build_pairs(examples[:1], samples, pairs_per_prompt=2)
    assert [r["score_margin"] for r in rows] == [pytest.approx(2 / 3, abs=1e-6), 1.0] and counts["dropped_margin"] == 0
    rows, counts = build_pairs(examples[:1], samples, pairs_per_prompt=2, min_margin=0.8)
    assert counts["pairs"] == 1 and counts["dropped_margin"] == 1
    assert rows[0]["rejected"] == [{"role": "assistant", "content": malformed}] and rows[0]["score_margin"] == 1.0
    # a threshold no pair reaches: one line, not an empty training set
    with pytest.raises(UserError, match=r"min_margin 0.9 dropped every pair \(1\)"):
        build_pairs(examples[:1], [[render_inline(gold), render_inline(one_wrong)]], min_margin=0.9)
    with pytest.raises(UserError, match=r"min_margin must be in \[0, 1\]"):
        verifier_pairs("unused.jsonl", model=None, tokenizer=None, renderer=None, min_margin=2)
