"""bench/expert_vs_single on a tiny skill stream (dylora_moe --smoke): one single LoRA per skill, trained
with its expert's steps on the skill's own data and scored on the same examples as the expert."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_scripts import load_script


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/expert_vs_single.py")


def test_every_skill_gets_a_single_lora_with_its_experts_steps(bench, tmp_path):
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    out = bench.main(["--quick", "--out", str(tmp_path)], runner=load_script("bench/common.py").train_inline)
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before  # --quick (a --smoke stream) records nothing
    assert (tmp_path / "stream" / "results.json").exists()
    rows = out["rows"]
    assert [r["skill"] for r in rows] == ["bash", "call", "choose", "decline"]
    for r in rows:
        single = tmp_path / f"single_{r['skill']}"
        cfg = (single / "config.yaml").read_text()
        assert "name: single_" + r["skill"] in cfg
        # the single LoRA took exactly the steps its expert took, and was scored on the expert's examples
        results = json.loads((single / "results.json").read_text())
        assert results["stages"][0]["steps"] == r["steps"] > 0
        assert len(r["single"]["outcomes"]) == len(r["expert_end"]["outcomes"]) == r["n"]
        assert r["meets_bar"] == (r["expert_end"]["score"] >= 0.9 * r["single"]["score"])
    assert "| bash (" in out["report"] and "expert − single" in out["report"]

    # a single LoRA of another stream (its steps are not this expert's) is refused, not read back
    single = tmp_path / "single_bash" / "results.json"
    results = json.loads(single.read_text())
    results["stages"][0]["steps"] += 1
    single.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="single_bash trained .* steps, the expert of 'bash' .*: a single LoRA for "
                                         "another stream; give a new --out"):
        bench.main(["--quick", "--out", str(tmp_path)], runner=load_script("bench/common.py").train_inline)


def test_a_run_that_is_not_a_skill_stream_is_refused_in_one_line(bench, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"tasks": ["a"], "matrix": [[0.5]]}')
    with pytest.raises(SystemExit, match="has no skill_expert: not a skill-stream run"):
        bench.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not found"):
        bench.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
