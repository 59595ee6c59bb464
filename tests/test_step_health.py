"""The engine's own guard: a diverging run skips its bad steps and stops with exit 3, weights finite;
a collapsed run is alerted; the log's global step only grows, across stages and into the trackers."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from skillstream.plugins import Plugin
from skillstream.run import train
from skillstream.step_health import StepCounts, StepHealth

SMALL = ["--set", "model=tiny", "--set", "train.batch_size=4", "--set", "train.log_every=1",
         "--set", "data.train.0.limit=48", "--set", "data.eval.0.limit=2", "--set", "data.eval.0.max_new_tokens=4",
         "--set", "report_to=[]"]


def alerts(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]


def test_a_diverging_run_skips_its_bad_steps_then_stops_with_exit_3_and_saves_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "quickstart", "--out", str(out), *SMALL, "--set", "train.steps=20",
                   "--set", "train.lr=1e30", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=20",
                   cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: 5 steps in a row (to step 6 of stage 'main')")
    # checkpoints stop with the streak, so the newest one is the last good one, and the message names it
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000001"]
    assert f"--resume continues from {out / 'checkpoints' / 'ckpt-000001'}" in last
    weights = load_file(str(out / "checkpoints" / "ckpt-000001" / "weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "experts").exists() and not (out / "results.json").exists()
    assert [a["kind"] for a in alerts(out)] == ["nonfinite_step"] * 5  # no monitor plugin in the recipe
    assert [json.loads(line).get("skipped_steps", 0) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        == [0, 1, 2, 3, 4, 5]


class PoisonOnce(Plugin):
    """Adds a NaN to the loss of one step, and keeps the LoRA weights seen at each step's forward."""
    name = "poison"

    def __init__(self, step: int):
        self.step, self.seen = step, {}

    def loss_term(self, ctx, batch, outputs):
        self.seen[ctx.step] = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
        return torch.tensor(float("nan")) if ctx.step == self.step else None


def test_one_bad_step_is_skipped_with_the_weights_unchanged_and_the_run_goes_on(tmp_path):
    poison = PoisonOnce(step=3)  # ctx.step counts the steps done: the 4th step's loss is NaN
    run = train("quickstart", out=tmp_path / "run", show_progress=False, plugins=[poison],
                overrides={"model": "tiny", "train.steps": 8, "train.batch_size": 4, "train.log_every": 1,
                           "data.train.0.limit": 32, "data.eval.0.limit": 2, "data.eval.0.max_new_tokens": 4,
                           "report_to": []})
    before, after, next_after = poison.seen[3], poison.seen[4], poison.seen[5]
    assert all(torch.equal(before[n], after[n]) for n in before)            # the bad step changed nothing
    assert any(not torch.equal(after[n], next_after[n]) for n in after)     # the next good one trains
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(float(records[3]["loss"])) and records[-1]["skipped_steps"] == 1
    assert [a["kind"] for a in alerts(run.run_dir)] == ["nonfinite_step"]
    assert run.results["matrix"]


def test_a_collapsed_run_is_alerted_without_any_plugin(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "quickstart", "--out", str(out), *SMALL, "--set", "train.steps=16",
                   "--set", "train.lr=1e9", "--set", "train.collapse_steps=10", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = [a for a in alerts(out) if a["kind"] == "collapsed"]
    assert len(found) == 1 and found[0]["severity"] == "warning"  # once per streak, not once per step
    assert "gradient norm 0 for 10 steps in a row" in found[0]["message"]
    assert "[warning] collapsed" in done.stderr


def test_a_loss_stuck_at_the_uniform_guess_is_a_collapse_and_a_learning_one_is_not():
    vocab = 49152
    health = StepHealth(max_bad_steps=5, collapse_steps=3, uniform_loss=math.log(vocab))
    counts = StepCounts()
    verdicts = [health.judge(counts, math.log(vocab) + 0.001, grad_norm=0.7) for _ in range(3)]
    assert [v.alerts for v in verdicts[:2]] == [[], []]
    assert verdicts[2].alerts[0][1] == "collapsed" and "the uniform guess" in verdicts[2].alerts[0][2]
    learning = StepCounts()
    assert not any(health.judge(learning, 10.0 - 0.5 * s, grad_norm=0.7).alerts for s in range(1, 10))
    # a preference or policy loss has no uniform-guess value: only a zero gradient counts there
    dpo = StepHealth(max_bad_steps=5, collapse_steps=3, uniform_loss=None)
    assert not any(dpo.judge(StepCounts(), math.log(vocab), grad_norm=0.7).alerts for _ in range(4))


def test_the_global_step_only_grows_across_stages_in_the_log_and_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stages = [{"name": "first"}, {"name": "second"}]
    run = train("quickstart", out=tmp_path / "run", show_progress=False,
                overrides={"model": "tiny", "train.steps": 4, "train.batch_size": 4, "train.log_every": 1,
                           "data.train.0.limit": 16, "data.eval.0.limit": 1, "data.eval.0.max_new_tokens": 2,
                           "report_to": ["tensorboard"], "stages": stages})
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["global_step"]) for r in records] == \
        [("first", s, s) for s in range(1, 5)] + [("second", s, 4 + s) for s in range(1, 5)]
    events = EventAccumulator(str(next((run.run_dir / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    # trackers get metrics.jsonl's field names at global_step: the second stage's losses follow the first's
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
