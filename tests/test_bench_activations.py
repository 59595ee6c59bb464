"""bench/activations --quick (tiny model): the saved-for-backward accounting sees MaskDropout's bool
masks where PEFT's dropout kept float noise, and less in total."""
from __future__ import annotations

from pathlib import Path

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_counts_less_saved_memory_with_mask_dropout_and_records_nothing():
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    rows = load_script("bench/activations.py").main(["--quick"])
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before
    for weights in ("float32", "bfloat16"):
        plain, mask = [r for r in rows if r["weights"] == weights]
        assert (plain["dropout"], mask["dropout"]) == ("nn.Dropout (PEFT)", "MaskDropout")
        assert mask["total"] < plain["total"]
        assert not any(dtype == "bool" for _, dtype in plain["kinds"]) and any(dtype == "bool" for _, dtype in mask["kinds"])
