"""A run killed with SIGKILL mid-training resumes to exactly the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

ARGS = ["--set", "model=tiny", "--set", "train.steps=30", "--set", "train.checkpoint_every=3",
        "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "data.train.0.limit=48",
        "--set", "data.eval.0.limit=2", "--set", "data.eval.0.max_new_tokens=4", "--set", "report_to=[]"]


def adapter(run_dir):
    return load_file(str(run_dir / "experts" / "default" / "adapter_model.safetensors"))


def kill_mid_run(run_dir, cwd, extra):
    cmd = [sys.executable, "-m", "skillstream.cli", "train", "quickstart", "--out", str(run_dir), *ARGS, *extra]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CI": "true"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is well past a checkpoint, then kill -9
        steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
        if steps and steps[-1] >= 13:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, precision):
    extra = ["--set", f"train.bf16={'false' if precision == 'fp32' else 'true'}"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert run_cli("train", "quickstart", "--out", str(full), *ARGS, *extra, cwd=tmp_path).returncode == 0
    kill_mid_run(broken, tmp_path, extra)
    resumed = run_cli("train", "quickstart", "--out", str(broken), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = adapter(full), adapter(broken)
    assert a.keys() == b.keys()
    for k in a:  # CPU kernels are deterministic: the same steps on the same data give the same bits
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the log has each step once, in order, as if the run had never stopped
    steps = [json.loads(l)["step"] for l in (broken / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert json.loads((broken / "results.json").read_text())["matrix"] == json.loads((full / "results.json").read_text())["matrix"]
