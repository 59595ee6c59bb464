"""bench/cl_stream on the tiny model (one step per task): the table is made, the backbone is scored
once for every method, and the oracle regime scores only what training changed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

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


def _results(avg_acc, bwt, last_row):
    """A results.json of two tasks whose last row has these per-example outcomes."""
    return {"avg_acc": avg_acc, "bwt": bwt, "fwt": 0.0,
            "initial_details": [{"outcomes": [0] * len(o)} for o in last_row],
            "details": [[{"outcomes": o} for o in last_row]]}


def test_the_headline_is_the_mean_and_spread_over_seeds_and_differences_to_mtl_are_paired():
    sys.path.insert(0, str(ROOT / "bench"))
    from cl_stream import headline, minus_mtl

    by_seed = {s: {"seq_lora": {"results": _results(a, b, [[1, 0], [0, 0]])},
                   "mtl": {"results": _results(m, 0.0, [[1, 1], [1, 1]])}}
               for s, (a, b, m) in enumerate([(0.25, -0.5, 1.0), (0.75, -0.1, 1.0), (0.5, -0.3, 0.5)])}
    table = headline(by_seed)
    assert "| seq_lora | 0.500 ± 0.250 (0.250..0.750) | -0.300 ± 0.200 (-0.500..-0.100) |" in table
    assert "| 0.667 ± 0.382 (0.250..1.000) | 3 |" in table  # AvgAcc / MTL per seed: 0.25, 0.75, 1.0
    # 40 examples per task: MTL right on all, seq_lora on a quarter: the paired interval excludes 0
    seq, mtl = _results(0.25, 0.0, [[1] * 10 + [0] * 30] * 2), _results(1.0, 0.0, [[1] * 40] * 2)
    shown = minus_mtl(seq, mtl)
    assert shown.startswith("-0.750 [") and shown.endswith("*")
    assert not minus_mtl(mtl, mtl).endswith("*")  # no difference: the interval is [0, 0], which holds 0
