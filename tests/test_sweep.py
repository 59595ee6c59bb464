"""`skillstream sweep`: a 2x2 grid of quickstart on the tiny model, killed after its first trials and
resumed by the same command, ends with every setting trained once in its own run directory, sweep.json
and a report of all trials (rendered and screenshotted in headless Chromium); bad input is one line."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from skillstream.errors import UserError
from skillstream.sweep import make_spec, run_sweep
from test_report import ARTIFACTS, CHROMIUM, assert_self_contained, chromium

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

TINY = ["--set", "model=tiny", "--set", "report_to=[]", "--smoke"]
GRID = ["--grid", "train.lr=1e-4,1e-3", "--grid", "lora.r=2,4"]


def test_grid_sweep_killed_and_resumed(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "quickstart", *GRID, *TINY, "--out", str(out)]
    # first attempt: killed (SIGKILL, nothing cleans up) once the third trial has begun training
    proc = subprocess.Popen([sys.executable, "-m", "skillstream.cli", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CI": "true"})
    deadline = time.time() + 300
    while not (out / "trial-002" / "config.yaml").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_two = {d: (out / d / "results.json").stat().st_mtime_ns for d in ("trial-000", "trial-001")}
    assert not (out / "trial-002" / "results.json").exists()

    res = run_cli(*args, cwd=tmp_path)  # the same command again continues the sweep
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trial 2 was interrupted: it goes on first, resuming" in res.stdout
    sweep = json.loads((out / "sweep.json").read_text())
    done = [t for t in sweep["trials"] if t["state"] == "complete"]
    assert sweep["finished"] and len(done) == 4
    # every combination once, each in its own run directory trial-000 ... trial-005
    assert sorted((t["params"]["train.lr"], t["params"]["lora.r"]) for t in done) == \
        sorted(itertools.product([1e-4, 1e-3], [2, 4]))
    assert sorted(t["run_dir"] for t in done) == [f"trial-{i:03d}" for i in range(4)]
    assert [t["state"] for t in sweep["trials"]].count("interrupted") == 1
    # finished trials were kept as they were; the interrupted one resumed in its own directory
    assert {d: (out / d / "results.json").stat().st_mtime_ns for d in first_two} == first_two
    resumed = next(t for t in done if t.get("resumes") is not None)
    assert resumed["run_dir"] == "trial-002"
    for t in done:  # the objective is the run's validation score, read from its results.json
        results = json.loads((out / t["run_dir"] / "results.json").read_text())
        assert t["value"] == results["validation"]["score"]
        assert results["validation"]["tasks"]["nl2bash"]["n"] >= 1
    values = [t["value"] for t in done]
    assert sweep["best"]["value"] == max(values)

    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert page.count('<tr class="best">') == 1 and "validation.score over train.lr x lora.r" in page
    for t in done:
        assert f"trial {t['number']}: {t['run_dir']}" in page  # each trial's own report, folded below
    if CHROMIUM.exists():
        dom = chromium(["--dump-dom"], (out / "report.html").resolve().as_uri(), tmp_path).stdout
        assert dom.count("<tr") >= 7 and '<img class="plot heatmap"' in dom
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "sweep-report.png"
        shot.unlink(missing_ok=True)
        chromium([f"--screenshot={shot}"], (out / "report.html").resolve().as_uri(), tmp_path)
        assert shot.stat().st_size > 10_000

    # a different command on the same directory is refused, not mixed into this sweep
    other = run_cli("sweep", "quickstart", "--grid", "train.lr=1e-4,2e-4", *TINY, "--out", str(out), cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: {out}: this sweep was started with grid {json.dumps(sweep['spec']['grid'])}, which this command "
        f"changes; re-run the same command to resume it, or pick a new --out"]


@pytest.mark.parametrize("grid, extra, message", [
    (["train.lrr=1e-4,1e-3"], {}, "--grid train.lrr=0.0001: "),
    (["train.lr="], {}, "--grid 'train.lr=': no values"),
    (["train.lr=1e-4", "train.lr=1e-3"], {}, "--grid train.lr: given twice"),
    (["train.lr=1e-4,1e-3"], {"metric": "avg_acc"}, "--metric avg_acc: a sweep selects on validation data"),
    (["train.lr=1e-4,1e-3"], {"metric": "validation.tasks.nope.score"}, "--metric validation.tasks.nope.score: not in results.json"),
    (["train.lr=1e-4,1e-3"], {"trials": 5}, "--trials 5: a grid sweep runs every combination (2)"),
    (["train.lr=1e-4,1e-3"], {"sampler": "tpe"}, "--sampler tpe: give --trials N"),
    (["train.lr=1e-4,1e-3"], {"sampler": "random"}, "--sampler 'random': expected one of grid, tpe"),
])
def test_bad_sweeps_are_refused_before_any_trial(grid, extra, message):
    with pytest.raises(UserError) as e:
        make_spec("quickstart", grid, overrides={"model": "tiny"}, **extra)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_grid_key_is_one_line_and_status_2(tmp_path):
    res = run_cli("sweep", "quickstart", "--grid", "lora.rank=2,4", *TINY, "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --grid lora.rank=2: ") and "rank" in lines[0], res.stderr
    assert not (tmp_path / "s").exists()


def test_metric_missing_from_results_stops_the_sweep(tmp_path):
    spec, _ = make_spec("quickstart", ["lora.r=2"], metric="validation.tasks.nl2bash.pass@1",
                        overrides={"model": "tiny", "report_to": []}, smoke=True)
    with pytest.raises(UserError, match=r"--metric validation.tasks.nl2bash.pass@1: not in .*trial-000/results.json "
                                        r"\(it has .*validation.tasks.nl2bash.exact_match"):
        run_sweep(spec, tmp_path / "s", show_progress=False)


def test_tpe_sampler_runs_the_requested_trials(tmp_path):
    spec, _ = make_spec("quickstart", ["lora.r=2,4", "train.lr=1e-4,1e-3"], sampler="tpe", trials=3,
                        metric="validation.tasks.nl2bash.structure", overrides={"model": "tiny", "report_to": []},
                        smoke=True)
    sweep = run_sweep(spec, tmp_path / "s", show_progress=False)
    assert len(sweep["trials"]) == 3 and all(t["state"] == "complete" for t in sweep["trials"])
    assert (tmp_path / "s" / "report.html").is_file() and (tmp_path / "s" / "optuna.db").is_file()
