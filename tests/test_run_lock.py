"""One process at a time in a run directory: a train, --resume, eval or export on a folder another
live process holds exits 2 naming that process's PID; the lock of a process killed with SIGKILL is
taken over; of two trains started together on one --out exactly one runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import run_cli

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

TINY = ["--smoke", "--set", "model=tiny", "--set", "report_to=[]"]

HOLD = """
import sys, time
from skillstream.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(run_dir):
    """Another process holding RUN_DIR, as a train would: returns once it has the lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("finished")
    res = run_cli("train", "quickstart", "--out", str(cwd / "run"), *TINY, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return cwd, cwd / "run"


def test_train_resume_eval_and_export_wait_for_the_holder(finished_run, tmp_path):
    cwd, run = finished_run
    holder = hold(run)
    try:
        for args in (["train", "quickstart", "--out", str(run), *TINY],
                     ["train", "quickstart", "--out", str(run), "--resume"],
                     ["eval", str(run)],
                     ["export", str(run), str(tmp_path / "exported")]):
            line = one_error_line(run_cli(*args, cwd=cwd))
            assert f"{run} is in use by PID {holder.pid}" in line, (args, line)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (tmp_path / "exported").exists()
    # the holder's lock died with it: eval goes ahead, and says whose lock it took over
    ev = run_cli("eval", str(run), cwd=cwd)
    assert ev.returncode == 0, ev.stderr
    assert f"taken over stale lock of PID {holder.pid}" in ev.stderr
    assert not (run / ".lock").exists()  # a clean release leaves no lock file behind


def test_a_new_run_takes_over_the_lock_of_a_killed_one(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        assert one_error_line(run_cli("train", "quickstart", "--out", str(run), *TINY, cwd=tmp_path)).endswith(
            f"in use by PID {holder.pid} (a skillstream train, eval or export holds {run}/.lock): wait for it to end, "
            f"or stop it")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()  # left behind by SIGKILL, and no reason to call the folder a run
    res = run_cli("train", "quickstart", "--out", str(run), *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"taken over stale lock of PID {holder.pid}" in res.stderr
    assert (run / "results.json").exists() and not (run / ".lock").exists()


def test_two_trains_started_together_on_one_out_one_runs(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "skillstream.cli", "train", "quickstart", "--out", str(run), *TINY]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "CI": "true"}) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    assert sorted(p.returncode for p, _, _ in results) == [0, 2], [err for _, _, err in results]
    (winner, _, _), = [r for r in results if r[0].returncode == 0]
    (_, _, err), = [r for r in results if r[0].returncode == 2]
    line, = err.strip().splitlines()
    # it lost the race while the winner ran, or came after it had finished
    assert f"in use by PID {winner.pid}" in line or "already exists" in line, line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3, lines  # the --smoke run's 3 steps, written once


def test_bad_input_under_the_lock_leaves_no_run_directory(tmp_path):
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "runs" / "x"), *TINY,
                  "--set", f"data.train.0.source={tmp_path}/missing.jsonl", cwd=tmp_path)
    one_error_line(res)
    assert not (tmp_path / "runs").exists()
