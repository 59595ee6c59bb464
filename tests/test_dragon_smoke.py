"""`skillstream train dragon_hatching --smoke` end to end (its own file: it takes about 1.5 minutes
on a busy 2-core machine), and bad curriculum input."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread: several times faster than two for these tiny models on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the CLI subprocess
    yield
    torch.set_num_threads(n)


def test_dragon_hatching_smoke_run_and_bad_input(tmp_path):
    r = run_cli("train", "dragon_hatching", "--smoke", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "run"
    for p in ("alerts.jsonl", "metrics.jsonl", "validation.jsonl", "results.json", "model/model.safetensors",
              "checkpoints/best/model.safetensors", "checkpoints/final/model.safetensors"):
        assert (d / p).is_file(), p
    assert list((d / "checkpoints").glob("ckpt-*"))
    metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics[::3]] == ["text_coherence", "function_calls", "bash", "full_multitask"]
    assert all("firing_rate/0" in m for m in metrics)
    results = json.loads((d / "results.json").read_text())
    assert len(results["matrix"]) == 4 and "function_format" in results["details"][-1][2]
    from skillstream.errors import UserError
    from skillstream.run import train
    for key, value, says in (("stages.1.data.train.1.source", "no_such_task", "no_such_task"),
                             ("stages.0.data.train.0.weight", 0, "weight")):
        with pytest.raises(UserError, match=says) as e:  # the CLI prints it as one line, exit status 2
            train("dragon_hatching", smoke=True, overrides={key: value}, out=tmp_path / "bad", show_progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()
