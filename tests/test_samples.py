"""train.sample_every: greedy generations every N steps and at each stage end, in samples.jsonl, the
live monitor, the HTML report and TensorBoard."""
from __future__ import annotations

import json

import pytest

from skillstream.config import load_recipe
from skillstream.evaluation.suite import prepare_eval_tasks
from skillstream.monitor.samples import default_prompts
from skillstream.run import train

PROMPTS = ["list files in <dir> & sort them", "show disk usage"]
RECIPE = {"model": "tiny", "train.steps": 5, "train.batch_size": 2, "train.log_every": 1,
          "train.checkpoint_every": 100, "data.train.0.limit": 12, "data.eval.0.limit": 2,
          "data.eval.0.max_new_tokens": 4, "generation.max_new_tokens": 4}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    train("quickstart", out=out, show_progress=False,
          overrides={**RECIPE, "train.sample_every": 2, "train.sample_prompts": PROMPTS, "report_to": ["tensorboard"]})
    return out


def test_samples_jsonl_every_n_steps_and_at_stage_end(run_dir):
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [(s, p) for s in (2, 4, 5) for p in PROMPTS]
    assert all(isinstance(r["output"], str) and r["global_step"] == r["step"] for r in records)


def test_tensorboard_gets_the_text(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list(run_dir.rglob("events.out.tfevents.*"))
    assert events
    texts = {}
    for ev in events:
        acc = EventAccumulator(str(ev.parent), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if "samples/" in tag:
                texts[tag] = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
    first = next(v for k, v in texts.items() if k.startswith("samples/0"))
    assert [step for step, _ in first] == [2, 4, 5]
    assert "list files in <dir> & sort them" in first[0][1]


def test_report_and_monitor_show_samples(run_dir):
    from rich.console import Console

    from skillstream.monitor.live import open_view, render
    from skillstream.report.html import write_report
    page = write_report([run_dir]).read_text()
    assert 'id="training-samples"' in page
    assert "list files in &lt;dir&gt; &amp; sort them" in page and "<dir>" not in page
    view = open_view(run_dir)
    view.poll()
    assert view.sample["step"] == 5 and view.sample["prompt"] == PROMPTS[-1]
    console = Console(record=True, width=200)
    console.print(render(view))
    assert "step 5  show disk usage ->" in console.export_text()


def test_sample_every_0_writes_nothing(tmp_path):
    out = tmp_path / "run"
    train("quickstart", out=out, show_progress=False, overrides={**RECIPE, "train.steps": 2, "report_to": []})
    assert not (out / "samples.jsonl").exists()


def test_default_prompts_are_the_first_test_prompts_of_each_task():
    cfg = load_recipe("quickstart", {"data.eval.0.limit": 5})
    tasks = prepare_eval_tasks(cfg, cfg.data)
    prompts = default_prompts(tasks)
    from skillstream.data.render import user_text
    # the user message evaluation sends: the task's instruction and the request
    assert prompts == [user_text(ex) for ex in tasks[0].examples[:2]] and len(prompts) == 2
    assert tasks[0].examples[0].prompt in prompts[0]
