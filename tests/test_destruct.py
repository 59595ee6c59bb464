"""The destruct recipe end to end on the tiny model: smoke run, bad input, and a SIGKILL in the
middle of PPO (mid rollout buffer) that resumes to exactly the weights and value head of an
uninterrupted run."""
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
from skillstream.checkpoint import list_checkpoints
from skillstream.errors import UserError
from skillstream.run import train

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

TINY = ["--set", "model=tiny", "--set", "report_to=[]"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: no OpenMP spinning on a busy machine


def test_smoke_run_completes_with_curriculum_and_ppo_metrics(tmp_path):
    res = run_cli("train", "destruct", "--smoke", *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "destruct"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    mixture = [r for r in records if r["stage"] == "mixture"]
    ppo = [r for r in records if r["stage"] == "ppo"]
    assert len(mixture) == 3 and len(ppo) == 3
    for name in ("nl2bash", "bfcl", "pydoc_topics"):
        assert 0 <= mixture[-1][f"curriculum/weight/{name}"] <= 1 and f"curriculum/difficulty/{name}" in mixture[-1]
    assert sum(mixture[-1][f"curriculum/weight/{n}"] for n in ("nl2bash", "bfcl", "pydoc_topics")) == pytest.approx(1)
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                "policy/clipfrac_avg", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                "val/num_eos_tokens", "reward/bash_structure"):
        assert key in ppo[0], key
    assert ppo[0]["val/ratio"] == 1.0 and ppo[0]["policy/clipfrac_avg"] == 0.0
    # the validation loss per source at each curriculum refresh, never trained on
    for name in ("nl2bash", "bfcl", "pydoc_topics"):
        assert mixture[-1][f"curriculum/validation/{name}"] > 0
    # best_final: validation on held-out prose and calls in both stages, best and final weights
    validation = [json.loads(l) for l in (run / "validation.jsonl").read_text().splitlines()]
    assert {v["stage"] for v in validation} == {"mixture", "ppo"} and all("val/prose/loss" in v for v in validation)
    for which in ("best", "final"):
        assert (run / "checkpoints" / which / "model.safetensors").is_file()
    # generations from the fixed test prompts during PPO (every step under --smoke's sizes: at its end)
    samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["stage"] for s in samples} == {"ppo"}
    assert samples[0]["prompt"] == "List all files in the current directory, including hidden ones, with their sizes."
    assert len({s["prompt"] for s in samples}) == 6
    results = json.loads((run / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["mixture", "ppo"]
    weights = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "weights.safetensors"))
    assert "objective.value_head.weight" in weights


def test_unknown_reward_is_a_one_line_error(tmp_path):
    res = run_cli("train", "destruct", "--out", str(tmp_path / "run"), *TINY,
                  "--set", "stages.1.objective.rewards.bash_magic=1.0", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "unknown reward 'bash_magic'" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ({"data.train.1.weight": -1}, "data.train.1.weight"),
    ({"plugins.0.freeze_interval": 0}, "freeze_interval must be a positive integer"),
    ({"plugins.0.mixing": "loudest"}, "mixing 'loudest' is not one of"),
    ({"stages.1.objective.kl_estimator": "k2"}, "kl_estimator must be one of k1, k3"),
])
def test_bad_settings_stop_before_the_run_directory_exists(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train("destruct", out=tmp_path / "run", overrides={"model": "tiny", "report_to": [], **override},
              show_progress=False)
    assert not (tmp_path / "run").exists()


ARGS = [*TINY, "--set", "train.bf16=false", "--set", "data.eval.0.limit=2", "--set", "data.eval.0.max_new_tokens=4",
        "--set", "data.train.0.limit=16", "--set", "data.train.1.limit=16", "--set", "data.train.2.limit=16",
        "--set", "data.max_length=256", "--set", "plugins.0.freeze_interval=2", "--set", "plugins.0.sample_size=4",
        "--set", "plugins.0.validation_size=0", "--set", "plugins.1.every=2", "--set", "plugins.1.sources.0.limit=2",
        "--set", "plugins.1.sources.1.limit=2",
        "--set", "stages.0.train.steps=4", "--set", "stages.0.train.batch_size=4",
        "--set", "stages.1.train.steps=16", "--set", "stages.1.train.batch_size=4",
        "--set", "stages.1.train.checkpoint_every=3", "--set", "stages.1.train.log_every=1",
        "--set", "stages.1.objective.max_new_tokens=6", "--set", "stages.1.data.train.0.limit=32",
        "--set", "stages.1.objective.ppo_epochs=4"]  # 8 steps per rollout: the kill below lands mid-buffer


def _final_weights(run_dir):
    adapter = load_file(str(run_dir / "experts" / "default" / "adapter_model.safetensors"))
    last = load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "weights.safetensors"))
    return adapter, {k: v for k, v in last.items() if k.startswith("objective.")}


def test_sigkill_in_the_middle_of_ppo_resumes_to_the_uninterrupted_weights(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    res = run_cli("train", "destruct", "--out", str(full), *ARGS, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cmd = [sys.executable, "-m", "skillstream.cli", "train", "destruct", "--out", str(broken), *ARGS]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CI": "true"})
    metrics, deadline = broken / "metrics.jsonl", time.time() + 300
    while time.time() < deadline:  # 8 steps per rollout (4 epochs x 2 minibatches); checkpoint at 6: mid-buffer
        records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
        if any(r["stage"] == "ppo" and r["step"] >= 7 for r in records):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "results.json").exists(), "the run finished before it was killed"
    state = json.loads((list_checkpoints(broken / "checkpoints")[-1] / "state.json").read_text())["run_state"]
    assert state["stage"] == "ppo" and 0 < state["objective"]["pos"] < 8   # a rollout buffer half used
    resumed = run_cli("train", "destruct", "--out", str(broken), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (a_adapter, a_obj), (b_adapter, b_obj) = _final_weights(full), _final_weights(broken)
    assert a_obj.keys() == b_obj.keys()
    assert {k for k in a_obj if not k.startswith("objective.ref.")} == {"objective.value_head.weight", "objective.value_head.bias"}
    # PPO follows the mixture stage: its KL reference is a frozen copy of that stage's adapter, checkpointed
    assert any(k.startswith("objective.ref.") and "lora_B" in k for k in a_obj)
    for a, b in ((a_adapter, b_adapter), (a_obj, b_obj)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert float(a_obj["objective.value_head.weight"].abs().sum()) > 0   # the value head trained
    records = [json.loads(l) for l in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "ppo"] == list(range(1, 17))
    full_records = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("objective/kl") for r in records] == [r.get("objective/kl") for r in full_records]
