"""The toolformer builder: Toolformer-augmented answers converted to chat tool_calls, the loss
filter deciding which calls stay, a stage training on BFCL mixed with them, and a corpus that
yields no kept call refused in one line."""
import json

import pytest

from skillstream.data.render import Renderer
from skillstream.errors import UserError
from skillstream.models.backbone import load_backbone
from skillstream.run import train
from skillstream.tools.calls import ToolCall
from skillstream.tools.toolformer_chats import SCHEMAS, arithmetic_candidates, toolformer_chats


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_backbone("tiny", seed=0)
    return dict(model=model, tokenizer=tok, renderer=Renderer(tok, 1024))


def test_arithmetic_candidates_sit_after_each_equals_sign():
    text = "4 * 3 = 12. 12 - 12 = 0. Answer: 0"
    cands = arithmetic_candidates(text)
    assert [(c.position, c.call) for c in cands] == [(7, ToolCall("calculator", {"expression": "4 * 3"})),
                                                     (21, ToolCall("calculator", {"expression": "12 - 12"}))]
    assert text[:7] == "4 * 3 =" and text[7:] == " 12. 12 - 12 = 0. Answer: 0"


def test_augmented_answers_become_tool_call_conversations(tiny, tmp_path):
    out = tmp_path / "tf.jsonl"
    counts = toolformer_chats(out, **tiny, corpus="arithmetic", limit=3, candidates="arithmetic", tau=-100)
    assert counts == {"texts": 3, "rows": 3, "without_call": 0, "proposed": 6, "parsed": 6, "executed": 6,
                      "failed": 0, "kept": 6}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # arithmetic train #0: "A shop has 4 boxes with 3 books in each. It sells 12 books. ..." -> "4 * 3 = 12. 12 - 12 = 0. Answer: 0"
    call = lambda e: {"type": "function", "function": {"name": "calculator", "arguments": {"expression": e}}}  # noqa: E731
    assert rows[0]["messages"][1:] == [
        {"role": "assistant", "content": "4 * 3 =", "tool_calls": [call("4 * 3")]},
        {"role": "tool", "name": "calculator", "content": "12"},
        {"role": "assistant", "content": "12. 12 - 12 =", "tool_calls": [call("12 - 12")]},
        {"role": "tool", "name": "calculator", "content": "0"},
        {"role": "assistant", "content": "0. Answer: 0"}]
    assert rows[0]["messages"][0]["role"] == "user" and "4 boxes with 3 books" in rows[0]["messages"][0]["content"]
    assert rows[0]["tools"] == [SCHEMAS["calculator"]]
    # the filter decides: a tau between the two calls' utilities keeps only the more useful one
    u = rows[0]["utility"]
    toolformer_chats(tmp_path / "half.jsonl", **tiny, corpus="arithmetic", limit=1, candidates="arithmetic",
                     tau=sum(u) / 2)
    half = json.loads((tmp_path / "half.jsonl").read_text())
    assert half["utility"] == [max(u)] and sum(bool(m.get("tool_calls")) for m in half["messages"]) == 1


def test_no_kept_call_is_one_line(tiny, tmp_path):
    with pytest.raises(UserError, match=r"builder toolformer: no call was kept in 1 texts of 'arithmetic' \(train\): "
                                        r"2 proposed, 2 parsed, 2 executed, none lowered the loss by tau 1000"):
        toolformer_chats(tmp_path / "x.jsonl", **tiny, limit=1, candidates="arithmetic", tau=1000)
    with pytest.raises(UserError, match="candidates must be one of model, arithmetic"):
        toolformer_chats(tmp_path / "y.jsonl", **tiny, candidates="guess")


def test_a_stage_trains_on_bfcl_mixed_with_toolformer_conversations(tmp_path):
    recipe = {"name": "tf", "seed": 0, "model": "tiny", "report_to": [], "lora": {"r": 4, "alpha": 8},
              "data": {"max_length": 512, "train": [
                  {"source": "bfcl:simple", "split": "train", "limit": 8},
                  {"source": "toolformer.jsonl", "weight": 0.5,
                   "build": {"name": "toolformer", "corpus": "arithmetic", "limit": 4, "candidates": "arithmetic",
                             "tau": -100}}]},
              "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 100}}
    train(recipe, out=tmp_path / "run", show_progress=False)
    built = json.loads((tmp_path / "run" / "results.json").read_text())["stages"][0]
    assert built["built"]["toolformer.jsonl"]["rows"] == 4 and built["examples"] == 12 and built["steps"] == 2
    assert len((tmp_path / "run" / "toolformer.jsonl").read_text().splitlines()) == 4
