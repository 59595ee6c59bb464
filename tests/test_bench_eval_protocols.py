"""bench/eval_protocols --quick in this process (tiny model): exact match with option scoring beside
it scores what the two protocols score run apart, on every task of the development stream."""
from __future__ import annotations

from pathlib import Path

import pytest
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
STREAM = ROOT.parent / "shared" / "data" / "glue_stream"


@pytest.mark.skipif(not STREAM.is_dir(), reason="needs ../shared/data/glue_stream")
def test_quick_run_gives_the_same_scores_both_ways(capsys):
    bench = load_script("bench/eval_protocols.py")
    before = bench.RESULTS_MD.read_text()
    assert bench.main(["--quick", "--stream", str(STREAM)]) == 0      # exit 1 if any task's scores differ
    assert bench.RESULTS_MD.read_text() == before                    # --quick records nothing
    out = capsys.readouterr().out
    assert all(f"| {t} |" in out for t in ("sst2", "rte", "mnli", "cb")) and "| NO |" not in out
