"""bench/bdh.py --quick: the output structure (three models trained side by side on the same bytes,
validation curves, tokens/s, generation with the recurrent state vs re-reading), and that --quick
records nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_structure(tmp_path):
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    out = tmp_path / "bdh.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bdh.py"), "--quick", "--quiet", "--json", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert (results.read_text() if results.exists() else None) == before, "--quick must not record"
    data = json.loads(out.read_text())
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    assert json.loads(line[len("BENCH_RESULT "):])["models"].keys() == data["models"].keys()

    models = data["models"]
    assert set(models) == {"bdh", "gpt", "spiking"}
    steps = data["settings"]["steps"]
    for m in models.values():
        assert m["params"] > 0 and m["tokens_per_s"] > 0 and 0 < m["val_bpb"] < 9
        assert [s for s, _ in m["val_curve"]][0] == 0 and m["val_curve"][-1][0] == steps
        assert m["val_curve"][-1][1] == m["val_bpb"]
    # same-size GPT: the closest width to BDH's parameter count
    assert abs(models["gpt"]["params"] - models["bdh"]["params"]) / models["bdh"]["params"] < 0.1
    assert len(models["spiking"]["firing_rates_init"]) == data["settings"]["layers"]
    assert all(0.05 <= r <= 0.2 for r in models["spiking"]["firing_rates_init"])

    gen = data["generation"]
    assert gen["new_tokens"] == data["settings"]["gen_tokens"]
    for key in ("bdh_state", "bdh_reread", "gpt_kv_cache", "gpt_no_cache"):
        assert gen[key]["new_tokens"] == gen["new_tokens"] and gen[key]["tokens_per_s"] > 0
    assert gen["speedup"] > 0 and gen["agreement"] == 1.0      # state and re-read give the same greedy bytes

    for text in ("| validation bits/byte", "| training tokens/s", "running recurrent state", "val bpb"):
        assert text in res.stdout
