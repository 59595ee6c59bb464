"""Loading data: every format, the builtin NL2Bash split, and one-line errors for bad rows."""
from __future__ import annotations

import json
import math

import pytest

from conftest import write_task_folder
from skillstream.config import SourceConfig
from skillstream.data.batching import BatchPlan, Position, token_pieces
from skillstream.data.examples import load_examples
from skillstream.data.render import IGNORE, Renderer
from skillstream.errors import UserError
from skillstream.models.backbone import load_tokenizer


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_tokenizer("tiny"), max_length=256)


def test_nl2bash_has_a_fixed_240_60_split_with_both_golds():
    train = load_examples(SourceConfig(source="nl2bash", split="train"))
    test = load_examples(SourceConfig(source="nl2bash", split="test"))
    assert (len(train), len(test)) == (240, 60)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert test[0].references == ["touch /testbed/test.txt", "> /testbed/test.txt"]


def test_classification_folder_reads_options_and_labels(sentiment_folder):
    ex = load_examples(SourceConfig(source=str(sentiment_folder), split="test"))
    assert ex[0].kind == "classification" and ex[0].options == ["Good", "Bad"] and ex[0].completion == "Good"


def test_jsonl_csv_parquet_and_column_mapping(tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.csv").write_text("question,answer\n2+2?,4\n3+3?,6\n")
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    for name in ("qa.jsonl", "qa.csv", "qa.parquet"):
        ex = load_examples(SourceConfig(source=str(tmp_path / name), columns={"prompt": "question", "completion": "answer"}))
        assert [(e.prompt, e.completion) for e in ex] == [("2+2?", "4"), ("3+3?", "6")], name


def test_offset_and_limit_take_a_later_slice_of_a_source():
    """A stage that reads new requests of a source an earlier stage read: offset skips, limit then counts."""
    whole = load_examples(SourceConfig(source="nl2bash", limit=12))
    first = load_examples(SourceConfig(source="nl2bash", limit=5))
    later = load_examples(SourceConfig(source="nl2bash", offset=5, limit=5))
    assert [e.prompt for e in first + later] == [e.prompt for e in whole[:10]]
    assert len(load_examples(SourceConfig(source="nl2bash", split="test", offset=55))) == 5  # the split's last five
    with pytest.raises(UserError, match="offset 60 leaves no examples .split 'test' has 60."):
        load_examples(SourceConfig(source="nl2bash", split="test", offset=60))


def test_prompt_completion_learns_only_the_completion(renderer):
    [ex] = load_examples(SourceConfig(source="nl2bash", split="test", limit=1))
    tok = renderer.tokenize(ex)
    learned = renderer.tok.decode([t for t in tok.labels if t != IGNORE])
    assert learned.startswith("touch /testbed/test.txt") and "create a file" not in learned
    assert tok.labels[0] == IGNORE


def test_chat_messages_learn_only_assistant_turns(tmp_path, renderer):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(conv) + "\n")
    [ex] = load_examples(SourceConfig(source=str(tmp_path / "chat.jsonl")))
    tok = Renderer(renderer.tok, 512).tokenize(ex)
    learned = renderer.tok.decode([t for t in tok.labels if t != IGNORE])
    assert "hello there" in learned and "see you" in learned
    assert "hi" not in learned.replace("there", "") and "bye" not in learned


def test_overlong_examples_are_truncated_and_flagged(tmp_path):
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "word " * 500}) + "\n")
    [ex] = load_examples(SourceConfig(source=str(tmp_path / "long.jsonl")))
    tok = Renderer(load_tokenizer("tiny"), max_length=32).tokenize(ex)
    assert len(tok.input_ids) == 32 and tok.truncated


def _answer_cut_off_recipe(tmp_path, short: int, long: int) -> dict:
    rows = [{"prompt": f"say {i}", "completion": f"{i}"} for i in range(short)]
    rows += [{"prompt": "word " * 200 + f"say {i}", "completion": f"{i}"} for i in range(long)]  # prompt > max_length
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "cut", "seed": 0, "model": "tiny", "report_to": [], "lora": {"r": 4, "alpha": 8},
            "data": {"max_length": 64, "train": [{"source": str(tmp_path / "train.jsonl")}]},
            "train": {"steps": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 100}}


def test_examples_whose_answer_is_cut_off_are_counted_and_not_trained_on(tmp_path, capsys):
    # a batch of examples with no trainable token is a mean over nothing: a NaN loss, a skipped step
    from skillstream import train
    run = train(_answer_cut_off_recipe(tmp_path, short=8, long=8), out=tmp_path / "run", show_progress=False)
    stage = run.results["stages"][0]
    assert (stage["examples"], stage["truncated"], stage["untrainable"]) == (8, 8, 8)
    assert run.results["untrainable"] == 8
    assert "8 of 16 examples have no trainable token within data.max_length 64" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert not (tmp_path / "run" / "alerts.jsonl").exists() or "nonfinite" not in (tmp_path / "run" / "alerts.jsonl").read_text()


def test_a_source_with_no_trainable_example_is_refused(tmp_path):
    from skillstream import train
    with pytest.raises(UserError, match=r"source '.*train.jsonl': none of its 3 examples has a trainable token "
                                        r"within data.max_length 64; raise data.max_length"):
        train(_answer_cut_off_recipe(tmp_path, short=0, long=3), out=tmp_path / "run", show_progress=False)


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', "line 2: missing column 'completion'"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": \n', "line 2: not valid JSON"),
    ("", "split 'train' is empty"),
])
def test_bad_jsonl_rows_are_named(tmp_path, content, expected):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(UserError, match=expected) as err:
        load_examples(SourceConfig(source=str(tmp_path / "train.jsonl"), format="prompt_completion"))
    assert "train.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_label_outside_the_options_is_an_error(tmp_path):
    folder = write_task_folder(tmp_path / "t", [{"sentence": "x", "label": "Maybe"}], [], ["Good", "Bad"])
    with pytest.raises(UserError, match=r"train.json item 0: label 'Maybe' is not one of the options"):
        load_examples(SourceConfig(source=str(folder)))


def test_empty_task_split_is_an_error(tmp_path):
    folder = write_task_folder(tmp_path / "t", [], [], ["Good", "Bad"])
    with pytest.raises(UserError, match="split 'train' is empty"):
        load_examples(SourceConfig(source=str(folder)))


def test_batch_order_is_seeded_and_resumable(renderer):
    items = [renderer.tokenize(e) for e in load_examples(SourceConfig(source="nl2bash", limit=40))]
    plan = BatchPlan([items], [1.0], batch_size=4, seed=3)
    stream = plan.iterate(Position())
    first = [next(stream) for _ in range(15)]          # crosses into the second epoch
    again = BatchPlan([items], [1.0], batch_size=4, seed=3).iterate(first[6][1])
    assert [b for b, _ in first[7:]] == [next(again)[0] for _ in range(8)]
    assert plan.epoch(0) != BatchPlan([items], [1.0], batch_size=4, seed=4).epoch(0)


def test_length_grouping_wastes_less_padding_than_random_batches(renderer):
    items = [renderer.tokenize(e) for e in load_examples(SourceConfig(source="nl2bash"))]

    def padding(plan):
        return sum(max(len(items[i].input_ids) for i in b) * len(b) - sum(len(items[i].input_ids) for i in b)
                   for b in plan.epoch(0))
    grouped = padding(BatchPlan([items], [1.0], 8, seed=0, length_grouped=True))
    shuffled = padding(BatchPlan([items], [1.0], 8, seed=0, length_grouped=False))
    assert grouped < 0.5 * shuffled


def test_a_batch_above_the_token_cap_is_cut_into_pieces_longest_first(renderer):
    items = [renderer.tokenize(e) for e in load_examples(SourceConfig(source="nl2bash", limit=40))]
    batch = sorted(items, key=lambda t: len(t.input_ids))[-4:][::-1] + items[:2]  # 4 long rows and 2 others
    longest = len(batch[0].input_ids)
    assert token_pieces(batch, None) == [batch]                       # no cap: the batch as it is
    assert token_pieces(batch, 6 * longest) == [batch]                 # under the cap: untouched
    pieces = token_pieces(batch, 2 * longest)
    assert sorted(map(id, (t for p in pieces for t in p))) == sorted(map(id, batch))  # every row once
    assert all(len(p) * max(len(t.input_ids) for t in p) <= 2 * longest for p in pieces)
    assert [len(t.input_ids) for p in pieces for t in p] == sorted((len(t.input_ids) for t in batch), reverse=True)
    assert token_pieces(batch[:1], 1) == [batch[:1]]                 # a row longer than the cap is a piece alone
