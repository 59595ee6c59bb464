"""The skill stream (an `experts:` recipe) on 2 processes through Accelerate on CPU (gloo), like a staged
recipe: 2 processes with batch 2 against 1 process with batch 4, and a 2-process stream killed with
SIGKILL in the middle of a chunk, then resumed with 2 processes.

Every process computes each chunk's decision from the same chunk and the same weights (DDP keeps them
equal), so the decisions, the experts made and the router are the same as one process's; what differs
is float32 summation order in the experts' gradients (see tests/test_multiprocess.py), asserted at
1e-5 on the adapters. The resumed run restores every process's RNG and restarts the interrupted chunk
from the checkpoint after the last finished one, so it ends bit-identical to the uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from test_dylora_moe import recipe

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

TESTS = Path(__file__).parent  # the workers import kill_plugin from here (python -m puts the cwd on the path)
EXPERTS = ("expert_0", "expert_1", "expert_2")


def write_recipe(root: Path, batch: int, plugins: list | None = None) -> Path:
    cfg = recipe(root)
    cfg["train"].update(batch_size=batch, bf16=False)
    cfg["plugins"] = plugins or []
    path = root / f"stream-b{batch}{'-kill' if plugins else ''}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def decisions(run_dir: Path) -> list[tuple]:
    return [(d["chunk"], d["decision"], d["expert"], d["trained"])
            for d in map(json.loads, (run_dir / "decisions.jsonl").read_text().splitlines())]


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {e: load_file(str(run_dir / "experts" / e / "adapter_model.safetensors")) for e in EXPERTS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-stream")
    one = run_cli("train", str(write_recipe(root, 4)), "--out", str(root / "one"), cwd=TESTS)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("train", str(write_recipe(root, 2)), "--out", str(root / "two"), "--processes", "2", cwd=TESTS)
    assert two.returncode == 0, two.stderr[-3000:]
    return root


def test_a_two_process_stream_decides_and_learns_as_one_process_at_the_same_global_batch(runs):
    one, two = runs / "one", runs / "two"
    assert decisions(one) == decisions(two)  # the same chunks held, reused, made into the same experts
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["experts"] == r2["experts"] == list(EXPERTS)
    assert r1["novelty"] == r2["novelty"]
    for row1, row2 in zip(r1["matrix"], r2["matrix"]):
        assert row1 == pytest.approx(row2, rel=1e-4)
    a, b = adapters(one), adapters(two)
    for e in EXPERTS:
        for k in a[e]:
            torch.testing.assert_close(a[e][k], b[e][k], rtol=0, atol=1e-5)


def test_a_two_process_stream_killed_mid_chunk_resumes_to_the_uninterrupted_bits(runs):
    broken = runs / "broken"
    kill = [{"name": "kill_plugin:KillOnce", "steps": 7, "marker": str(runs / "killed")}]
    path = write_recipe(runs, 2, plugins=kill)
    first = run_cli("train", str(path), "--out", str(broken), "--processes", "2", cwd=TESTS)
    assert first.returncode != 0 and (runs / "killed").exists(), first.stderr[-3000:]
    assert not (broken / "results.json").exists() and list((broken / "checkpoints").glob("ckpt-*"))
    resumed = run_cli("train", str(path), "--out", str(broken), "--resume", "--processes", "2", cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after chunk" in resumed.stdout
    assert decisions(broken) == decisions(runs / "two")  # each chunk's decision once
    a, b = adapters(runs / "two"), adapters(broken)
    for e in EXPERTS:
        for k in a[e]:
            assert torch.equal(a[e][k], b[e][k]), (e, k)
    r2, rb = (json.loads((d / "results.json").read_text()) for d in (runs / "two", broken))
    assert rb["matrix"] == r2["matrix"]


def test_a_two_process_dense_to_sparse_stream_trains_router_and_experts_as_one_process(tmp_path):
    """experts.training: dense_to_sparse: the router trains through the mixture outside the DDP-wrapped
    model; its gradient is averaged over the processes, so both processes step it alike and the run
    matches one process at the same global batch."""
    out = {}
    for name, batch, procs in (("one", 4, "1"), ("two", 2, "2")):
        cfg = recipe(tmp_path, training="dense_to_sparse")
        cfg["train"].update(batch_size=batch, bf16=False)
        path = tmp_path / f"dense-b{batch}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = run_cli("train", str(path), "--out", str(tmp_path / name), "--processes", procs, cwd=TESTS)
        assert run.returncode == 0, run.stderr[-3000:]
        out[name] = tmp_path / name
    assert decisions(out["one"]) == decisions(out["two"])
    a, b = adapters(out["one"]), adapters(out["two"])
    for e in EXPERTS:
        for k in a[e]:
            torch.testing.assert_close(a[e][k], b[e][k], rtol=0, atol=1e-5)
    r1, r2 = (load_file(str(d / "router" / "router.safetensors")) for d in (out["one"], out["two"]))
    for k in r1:
        torch.testing.assert_close(r1[k], r2[k], rtol=0, atol=1e-5)
