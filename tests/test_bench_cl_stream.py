"""bench/cl_stream on the tiny model (one step per task): the table is made, the backbone is scored
once for every method, and the oracle regime scores only what training changed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STREAM = ROOT.parent / "shared" / "data" / "glue_stream"


@pytest.mark.skipif(not STREAM.is_dir(), reason="needs ../shared/data/glue_stream")
def test_each_method_reads_the_backbones_row_and_the_oracle_regime_only_scores_the_trained_diagonal(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cl_stream.py"), "--model", "tiny", "--quick",
                           "--steps", "1", "--methods", "seq_lora,expert_per_task", "--jobs", "1",
                           "--stream", str(STREAM), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| seq_lora |" in proc.stdout and "| expert_per_task |" in proc.stdout
    seq = json.loads((tmp_path / "seq_lora" / "results.json").read_text())
    oracle = json.loads((tmp_path / "expert_per_task" / "results.json").read_text())
    # the 4 initial evaluations were made once, before the methods, and read by both
    assert all(r.get("memo") for r in seq["initial_details"] + oracle["initial_details"])
    assert seq["evaluations_remembered"] == 4
    # oracle regime: after task k only task k's expert changed; every other cell is an earlier evaluation
    assert oracle["evaluations_remembered"] == 4 + 4 * 3
    for k, row in enumerate(oracle["details"]):
        assert [bool(r.get("memo")) for r in row] == [j != k for j in range(4)]
    assert "Task evaluations taken from the memo" in proc.stdout and "seq_lora 4, expert_per_task 16" in proc.stdout
