"""Generative replay: pseudo-examples of past tasks written and labelled by the model itself, kept
only when option scoring and greedy generation agree; a seeded share alpha of every batch; exact
resume from the plugin state."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import write_task_folder

from skillstream import checkpoint
from skillstream.components import PLUGINS, build
from skillstream.config import ComponentConfig, load_recipe
from skillstream.continual.generative_replay import GenerativeReplay, clean_input
from skillstream.data.examples import GENERIC_INSTRUCTION, Example
from skillstream.data.render import Renderer, Tokenized
from skillstream.evaluation.option_scoring import score_options
from skillstream.evaluation.runner import generate, normalize_text
from skillstream.models.backbone import load_backbone
from skillstream.plugins import Plugin, StepContext
from skillstream.run import train

PER_TASK, ALPHA, BATCH = 8, 0.5, 4


def _stream(root):
    """a_answer is learned as 'always yes' (so the tiny model answers it consistently), then b_topic."""
    yes = [{"sentence": s, "label": "yes"} for s in ["is the sky blue", "is water wet", "is fire hot", "do birds fly"]]
    write_task_folder(root / "a_answer", yes, yes, ["yes", "no"])
    topic = [{"sentence": s, "label": l} for s, l in [("the striker scored", "Sports"), ("rates rose", "Finance"),
                                                      ("the goalie saved it", "Sports"), ("stocks fell", "Finance")]]
    write_task_folder(root / "b_topic", topic, topic, ["Sports", "Finance"])
    return root


def _recipe(stream):
    return {"name": "genreplay", "model": "tiny", "report_to": [], "seed": 0,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"steps": 6, "batch_size": BATCH, "log_every": 1, "bf16": False, "lr": 1e-2, "warmup_steps": 1,
                      "checkpoint_every": 2},
            "data": {"stream": str(stream), "max_length": 128, "stream_protocols": ["accuracy"], "stream_test_limit": 2},
            "plugins": [{"name": "generative_replay", "per_task": PER_TASK, "alpha": ALPHA, "temperature": 1.0,
                         "max_new_tokens": 16}]}


class Spy(Plugin):
    """Runs after generative_replay: records the batches it hands on; may interrupt the run."""
    name = "spy"

    def __init__(self, stop_at=None):
        self.stop_at, self.batches = stop_at, []

    def transform_items(self, ctx, items):
        self.batches.append((ctx.stage_index, [tuple(t.input_ids) for t in items]))
        return items

    def after_step(self, ctx, metrics):
        if (ctx.stage_index, ctx.step) == self.stop_at:
            raise KeyboardInterrupt("interrupted by the test")


class Relabel(Plugin):
    """At stage 1, with the model exactly as generative_replay saw it, labels every candidate again
    with score_options and generate called directly (not through the plugin)."""
    name = "relabel"

    def __init__(self, gr, tok, renderer):
        self.gr, self.tok, self.renderer, self.seen = gr, tok, renderer, []

    def before_stage(self, ctx):
        if ctx.stage_index != 1:
            return
        model, options = ctx.model, ["yes", "no"]
        model.eval()
        for c in self.gr.candidates:
            ex = Example("classification", prompt=c["input"], options=options, instruction=GENERIC_INSTRUCTION)
            prompt = self.tok(self.renderer.prompt_text(ex), add_special_tokens=True)["input_ids"]
            opt = [self.tok(self.renderer.answer_text(ex, o), add_special_tokens=False)["input_ids"] for o in options]
            scored = options[int(score_options(model, [prompt], opt, self.tok.pad_token_id).argmax(-1)[0])]
            out = normalize_text(generate(model, self.tok, [self.renderer.prompt_text(ex)], 8)[0])
            self.seen.append((c, scored, next((o for o in options if normalize_text(o) == out), None)))
        model.train()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 2-task run with generative replay: the real generate + score path end to end.
    The plugin is built as the recipe's `plugins:` entry would build it, and handed in so the test can read it."""
    root = tmp_path_factory.mktemp("genreplay")
    stream = _stream(root / "stream")
    recipe = {**_recipe(stream), "plugins": []}
    tok = load_backbone("tiny")[1]
    renderer = Renderer(tok, 128)
    spec = ComponentConfig(**_recipe(stream)["plugins"][0])
    gr = build(spec, PLUGINS, "plugin", Plugin, tokenizer=tok, renderer=renderer, recipe=load_recipe(recipe))
    relabel, spy = Relabel(gr, tok, renderer), Spy()
    run = train(recipe, out=root / "full", show_progress=False, plugins=[gr, relabel, spy])
    return {"run": run, "stream": stream, "root": root, "spy": spy, "relabel": relabel, "gr": gr, "tok": tok}


def test_a_two_task_stream_generates_labels_twice_and_keeps_only_agreement(full_run):
    gr, relabel = full_run["gr"], full_run["relabel"]
    state = gr.state_dict()
    counts = state["stats"]["b_topic"]["a_answer"]
    assert counts["generated"] == PER_TASK
    assert counts["labelled"] == PER_TASK - counts["empty"] - counts["echo"] - counts["duplicate"]
    assert counts["kept"] == len(state["items"]) > 0  # 'always yes' was learned: the two labels agree
    assert counts["agreement"] == pytest.approx(counts["kept"] / counts["labelled"], abs=1e-4)
    # the plugin's two labels are what the model gives when asked directly, and kept == they agree
    assert len(relabel.seen) == counts["labelled"]
    for cand, scored, written in relabel.seen:
        assert (cand["scored"], cand["written"]) == (scored, written)
        assert cand["kept"] == (written is not None and scored == written)
        assert cand["input"] and cand["input"] == clean_input(cand["input"])
    assert len({normalize_text(c["input"]) for c, _, _ in relabel.seen}) == counts["labelled"]  # no duplicates
    # kept pseudo-examples are tokenized like real data: the prompt masked, the label learned
    tok = full_run["tok"]
    for d in state["items"]:
        learned = tok.decode([i for i, l in zip(d["input_ids"], d["labels"]) if l != -100], skip_special_tokens=True)
        assert learned.strip() == d["group"] == "yes" and d["task"] == "a_answer"
    records = [json.loads(l) for l in (full_run["run"].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["generative_replay/pool"] == 0 for r in records if r["stage"] == "a_answer")
    second = [r for r in records if r["stage"] == "b_topic"]
    assert all(r["generative_replay/pool"] == counts["kept"] and r["generative_replay/generated"] == PER_TASK
               for r in second)


def test_the_replaced_share_of_every_batch_is_alpha(full_run):
    pool = {tuple(d["input_ids"]) for d in full_run["gr"].state_dict()["items"]}
    for stage, batch in full_run["spy"].batches:
        replayed = sum(ids in pool for ids in batch)
        assert len(batch) == BATCH
        assert replayed == (round(ALPHA * BATCH) if stage == 1 else 0)
    # without a run: the share is round(alpha * len) for any batch size, drawn with replacement from a small pool
    for alpha, n in [(0.2, 10), (0.25, 8), (0.5, 3), (0.0, 8), (0.9, 10)]:
        gr = GenerativeReplay(alpha=alpha, seed=3)
        gr.stage_index = 1
        gr.items = [("t", Tokenized([900 + i], [900 + i], False, "x")) for i in range(3)]
        out = gr.transform_items(None, [Tokenized([i], [i], False, "y") for i in range(n)])
        assert len(out) == n and sum(t.input_ids[0] >= 900 for t in out) == round(alpha * n)
        assert [t.input_ids[0] for t in out[: n - round(alpha * n)]] == list(range(n - round(alpha * n)))


def test_consistency_filter_on_the_real_scorer_drops_disagreement_empty_echo_and_duplicates(monkeypatch):
    model, tok = load_backbone("tiny")
    renderer = Renderer(tok, 128)
    gr = GenerativeReplay(per_task=7, tokenizer=tok, renderer=renderer, seed=0)
    task = {"task": "t", "instruction": "Is it positive?", "options": ["Good", "Bad"]}
    texts = ["a fine film", "  \n", "a dull film", "Good", "a fine film", "\"quite long and slow\"", "meh"]
    monkeypatch.setattr(gr, "sample_inputs", lambda model, task, seed: texts)
    unique = ["a fine film", "a dull film", "quite long and slow", "meh"]
    scored = gr.label_by_scoring(model, task, unique)  # the real option scorer on the tiny model
    assert all(s in task["options"] for s in scored)
    # greedy answers chosen by hand: agree on items 0 and 3, the other option on 1, no option on 2
    other = {"Good": "Bad", "Bad": "Good"}
    written = [scored[0], other[scored[1]], None, scored[3]]
    real_generation = gr.label_by_generation(model, task, unique)  # the real path runs and answers per input
    assert len(real_generation) == 4 and all(w is None or w in task["options"] for w in real_generation)
    monkeypatch.setattr(gr, "label_by_generation", lambda model, task, t: written)
    kept, counts, candidates = gr.pseudo_examples(model, task, seed=0)
    assert [ex.prompt for ex in kept] == ["a fine film", "meh"]
    assert [ex.completion for ex in kept] == [scored[0], scored[3]]
    assert counts == {"generated": 7, "empty": 1, "echo": 1, "duplicate": 1, "labelled": 4, "answered": 3,
                      "kept": 2, "agreement": 0.5, "classes": {o: [scored[0], scored[3]].count(o) for o in ["Good", "Bad"]}}
    assert [c["kept"] for c in candidates] == [True, False, False, True]


def test_sampling_is_seeded_and_leaves_the_run_rng_alone():
    model, tok = load_backbone("tiny")
    gr = GenerativeReplay(per_task=3, max_new_tokens=6, tokenizer=tok, renderer=Renderer(tok, 128))
    task = {"task": "t", "instruction": "Is it positive?", "options": ["Good", "Bad"]}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = gr.sample_inputs(model, task, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert gr.sample_inputs(model, task, seed=5) == a
    assert gr.sample_inputs(model, task, seed=6) != a


def test_state_dict_round_trip_resumes_the_same_batches():
    gr = GenerativeReplay(alpha=0.25, seed=1)
    gr.stage_index = 2
    gr.items = [("t", Tokenized([100 + i, 1], [-100, 1], False, "g")) for i in range(10)]
    batch = [Tokenized([i], [i], False, None) for i in range(8)]
    for _ in range(3):
        gr.transform_items(None, batch)
    state = json.loads(json.dumps(gr.state_dict()))  # what a checkpoint keeps is plain JSON
    expected = [[t.input_ids for t in gr.transform_items(None, batch)] for _ in range(4)]
    again = GenerativeReplay(alpha=0.25, seed=1)
    again.load_state_dict(state)
    assert [[t.input_ids for t in again.transform_items(None, batch)] for _ in range(4)] == expected
    # resumed inside the stage, before_stage keeps the saved pool instead of generating again
    again.before_stage(StepContext(None, "s", 2, 0, 10, alert=print))
    assert len(again.items) == 10 and again.draws == 7


def test_a_run_interrupted_in_the_second_task_resumes_with_the_same_pool_and_losses(full_run, capsys):
    stream, root = full_run["stream"], full_run["root"]
    with pytest.raises(KeyboardInterrupt):
        train(_recipe(stream), out=root / "broken", show_progress=False,
                              plugins=[Spy(stop_at=(1, 3))])
    capsys.readouterr()
    resumed = train(_recipe(stream), out=root / "broken", resume=True, show_progress=False)
    out = capsys.readouterr().out
    assert "resuming" in out and "generative replay:" not in out  # the checkpoint's pool, not a new one
    _, _, state = checkpoint.load(checkpoint.list_checkpoints(resumed.run_dir / "checkpoints")[-1])
    _, _, ref = checkpoint.load(checkpoint.list_checkpoints(full_run["run"].run_dir / "checkpoints")[-1])
    assert state["run_state"]["plugins"]["generative_replay"] == ref["run_state"]["plugins"]["generative_replay"]

    def losses(run):
        return [(r["stage"], r["step"], r["loss"]) for r in
                map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert losses(resumed) == losses(full_run["run"])
