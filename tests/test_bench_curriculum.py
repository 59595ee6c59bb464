"""bench/curriculum --quick in this process (tiny model): every strategy's curve, the noise weight it
read from the plugin's refresh history, and the variant flags reaching the plugin."""
from __future__ import annotations

import json

import pytest

from repo_scripts import load_script

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first


def test_quick_run_reports_each_strategy_and_passes_the_rule_options(tmp_path, capsys):
    bench = load_script("bench/curriculum.py")
    before = bench.RESULTS_MD.read_text()
    assert bench.main(["--quick", "--modes", "difficulty,hardest", "--probe", "held_out", "--max-scale", "1",
                       "--smoothing", "0.5", "--out", str(tmp_path)]) == 0
    assert bench.RESULTS_MD.read_text() == before                 # --quick records nothing
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in results] == ["uniform", "difficulty", "hardest"]   # uniform is always run
    for r in results:
        assert [s for s, _ in r["curve"]] == [0, 4, 8, 12]          # probe at step 0 and every 4 steps
        assert abs(sum(r["weights_end"].values()) - 1) < 1e-9
    uniform, difficulty = results[0], results[1]
    assert all(h["weights"] == [0.25] * 4 for h in uniform["history"])
    assert difficulty["history"][0]["weights"] == [0.25] * 4      # the rule starts uniform and moves by progress
    assert difficulty["history"][-1]["weights"] != [0.25] * 4      # the rule moved the mixture
    config = (tmp_path / "difficulty" / "config.yaml").read_text()
    assert "probe: held_out" in config and "max_scale: 1.0" in config and "smoothing: 0.5" in config
    out = capsys.readouterr().out
    assert "| uniform | 12 | 1.00x |" in out and "Best adaptive strategy: difficulty" in out


def test_the_oracle_drops_the_noise_and_symbols_noise_is_single_tokens(tmp_path):
    bench = load_script("bench/curriculum.py")
    assert bench.main(["--quick", "--modes", "oracle", "--noise", "symbols", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    oracle = next(r for r in results if r["mode"] == "oracle")
    assert list(oracle["weights_end"]) == ["easy", "nl2bash", "pydoc_topics"]   # no noise source at all
    assert oracle["noise_weight"] == {"start": 0.0, "second_half_mean": 0.0, "end": 0.0}
    from skillstream.models.backbone import load_tokenizer
    tok = load_tokenizer("tiny")
    text = json.loads((tmp_path / "noise.jsonl").read_text().splitlines()[0])["text"]
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text.split()) == 150  # one token per symbol
