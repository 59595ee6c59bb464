"""`skillstream monitor` through a pseudo-terminal, as a person watching a run sees it: one frame of a
finished run, following a run while it logs until its results.json appears, and bad input. Then the
monitor plugin's loss bound (relative to the stage's first losses) and what its stop message says."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import time
from fcntl import ioctl
from pathlib import Path
from termios import TIOCSWINSZ

import pytest

import skillstream
from conftest import run_cli
from skillstream import checkpoint
from skillstream.errors import UserError
from skillstream.monitor.alerts import Monitor
from skillstream.monitor.live import Follower, sparkline
from skillstream.monitor.metrics_log import ALERTS, MetricsLog
from skillstream.plugins import StepContext
from skillstream.report.rundata import fmt
from test_report import make_run

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def in_pty(*args: str, cwd: Path, until=None, timeout: float = 60) -> tuple[int, str]:
    """Run `skillstream ARGS` on a 120x40 pseudo-terminal; `until(proc, text_so_far)` is called while it
    runs (to feed it). Returns the exit status and the screen output without colour codes."""
    master, slave = pty.openpty()
    ioctl(slave, TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("CI", None)  # a person at a terminal, not a CI log
    proc = subprocess.Popen([sys.executable, "-m", "skillstream.cli", *args], cwd=cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if until is not None:
                until(proc, ANSI.sub("", out.decode("utf-8", "replace")))
        else:
            raise AssertionError(f"monitor still running after {timeout}s:\n{out.decode(errors='replace')[-2000:]}")
        return proc.wait(timeout=10), ANSI.sub("", out.decode("utf-8", "replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_once_on_a_finished_run_shows_stage_and_last_loss(tmp_path):
    run = make_run(tmp_path / "done")
    rc, screen = in_pty("monitor", str(run), "--once", cwd=tmp_path)
    assert rc == 0, screen
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"stage      {last['stage']} (3/3)" in screen
    assert f"loss       {fmt(last['loss'])}" in screen
    assert "finished" in screen and "ETA        done" in screen
    assert "AvgAcc 0.7633" in screen and "e0" in screen and "e1" in screen
    assert "loss_spike" in screen and "spawned expert e1" in screen     # latest alerts
    assert any(c in screen for c in "▁▂▃▄▅▆▇█")                         # the loss sparkline


def test_follows_a_run_and_exits_when_results_appear(tmp_path):
    """Starts on a run that has logged one stage, sees new steps arrive, stops by itself at the end."""
    done = make_run(tmp_path / "template")
    run = tmp_path / "live"
    run.mkdir()
    (run / "config.yaml").write_text((done / "config.yaml").read_text())
    records = [json.loads(x) for x in (done / "metrics.jsonl").read_text().splitlines()]
    log = MetricsLog(run)
    for r in records[:6]:
        log.log(r)
    fed = {"n": 6}

    def feed(proc, screen):
        # one new step each time the monitor has drawn the previous one, then the results
        if fed["n"] < len(records) and f"whole run {fed['n']}/18" in screen:
            log.log(records[fed["n"]])
            fed["n"] += 1
        elif fed["n"] == len(records) and "whole run 18/18" in screen and not (run / "results.json").exists():
            (run / "results.json").write_text((done / "results.json").read_text())

    rc, screen = in_pty("monitor", str(run), "--interval", "0.1", cwd=tmp_path, until=feed, timeout=90)
    assert rc == 0, screen
    assert fed["n"] == len(records)
    assert "running" in screen and "finished" in screen
    assert f"loss       {fmt(records[-1]['loss'])}" in screen
    assert re.search(r"ETA        \d+m\d\ds", screen)                 # estimated from the step rate it saw


def test_not_a_run(tmp_path):
    res = run_cli("monitor", str(tmp_path), "--once", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path}: not a run directory (no config.yaml)"


def test_follower_waits_for_whole_lines_and_rereads_a_rewritten_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = Follower(path)
    assert f.poll() == ([], False)                                     # not written yet
    path.write_text('{"step": 1}\n{"step": 2')                         # second line still being written
    assert f.poll() == ([{"step": 1}], False)
    with path.open("a") as fh:
        fh.write(', "loss": 1.5}\n')
    assert f.poll() == ([{"step": 2, "loss": 1.5}], False)
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 1}\n')                                    # a resume rewrites the log
    tmp.replace(path)
    assert f.poll() == ([{"step": 1}], True)


def test_sparkline():
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert sparkline([]) == ""
    assert len(sparkline([float(i) for i in range(100)], width=10)) == 10


# -- the monitor plugin (skillstream/monitor/alerts.py) ---------------------------------------------
def _monitored(task: Path, monitor: dict, steps: int) -> dict:
    return {"name": "monitored", "model": "tiny", "report_to": [], "seed": 0,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"steps": steps, "batch_size": 2, "log_every": 1, "bf16": False, "lr": 1e-3, "checkpoint_every": 1},
            "data": {"max_length": 96, "train": [{"source": str(task)}],
                     "eval": [{"name": "t", "source": str(task), "metric": "accuracy"}]},
            "plugins": [{"name": "monitor", **monitor}]}


def _alerts(run_dir: Path) -> list[tuple]:
    return [(a["step"], a["severity"], a["kind"]) for a in map(json.loads, (run_dir / ALERTS).read_text().splitlines())]


def test_an_untrained_large_vocabulary_model_starts_above_10_nats_and_raises_no_loss_high(sentiment_folder, tmp_path):
    # the tiny test model has SmolLM2's 49k-token vocabulary: untrained, its loss is about ln(49152) = 10.8,
    # above the old fixed `loss_max: 10`; the default bound is 3x the stage's own first 10 losses
    run = skillstream.train(_monitored(sentiment_folder, {"on_critical": "stop"}, steps=15), out=tmp_path / "run",
                            show_progress=False)
    losses = [json.loads(line)["loss"] for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 15 and losses[0] > 10
    assert "loss_high" not in [kind for _, _, kind in _alerts(run.run_dir)]


def test_loss_high_is_relative_to_the_stages_first_losses_unless_loss_max_is_set():
    raised = []

    def ctx(stage="s", step=0):
        return StepContext(None, stage, 0, step, 100, alert=lambda sev, kind, msg: raised.append((kind, msg)))

    def feed(mon, losses, stage="s"):
        raised.clear()
        for loss in losses:
            mon.check(ctx(stage), loss, 1.0, None)
        return [kind for kind, _ in raised]

    # the loss rule alone (stats=False: no activation hooks, this context has no model)
    mon = Monitor(spike_factor=100.0, cooldown=0, stats=False)  # the spike warning stays out of the way
    mon.before_stage(ctx())
    assert feed(mon, [2.0] * 10 + [5.9]) == []                    # the reference: mean 2.0, bound 6.0
    assert feed(mon, [6.1]) == ["loss_high"]
    assert raised[0][1] == "loss 6.100 > 6.000 (3.0 x the mean 2.000 of the stage's first 10 steps)"
    mon.before_stage(ctx("t"))                                    # a new stage measures its own start
    assert feed(mon, [0.5] * 10 + [1.6], "t") == ["loss_high"]
    resumed = Monitor(spike_factor=100.0, cooldown=0, stats=False)         # ... which a resumed run keeps
    resumed.load_state_dict(mon.state_dict())
    resumed.before_stage(ctx("t", step=40))
    assert feed(resumed, [1.4, 1.6], "t") == ["loss_high"]
    absolute = Monitor(loss_max=10.0, stats=False)                           # an explicit bound, from the first step
    absolute.before_stage(ctx())
    assert feed(absolute, [10.8]) == ["loss_high"] and raised[0][1] == "loss 10.800 > 10.000 (loss_max)"


def test_a_critical_stop_says_what_resume_would_do(sentiment_folder, tmp_path):
    # stopped at its first step: no checkpoint was written, so --resume cannot roll back to one
    with pytest.raises(UserError) as stop:
        skillstream.train(_monitored(sentiment_folder, {"loss_max": 5.0, "on_critical": "stop"}, steps=4),
                          out=tmp_path / "early", show_progress=False)
    assert _alerts(tmp_path / "early") == [(1, "critical", "loss_high")]
    assert str(stop.value) == ("run stopped by a critical alert at step 1 of stage 'main' (loss_high; "
                               "monitor.on_critical: stop); see alerts.jsonl, and no checkpoint was written yet, "
                               "so --resume starts the run over")
    # in a run that has written checkpoints, the same stop names the one --resume continues from
    run = skillstream.train(_monitored(sentiment_folder, {}, steps=2), out=tmp_path / "later", show_progress=False)
    last = checkpoint.list_checkpoints(run.run_dir / "checkpoints")[-1]
    mon = Monitor(on_critical="stop")
    with pytest.raises(UserError) as stop:
        mon.check(StepContext(None, "main", 0, 3, 10, alert=lambda *a: None, run_dir=run.run_dir),
                  float("nan"), 1.0, None)
    assert str(stop.value).endswith(f"(nan_loss; monitor.on_critical: stop); see alerts.jsonl, and "
                                    f"--resume continues from {last}")
