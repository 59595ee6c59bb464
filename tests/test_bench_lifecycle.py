"""bench/lifecycle --quick, run in this process (tiny model): bash, call, bash again; run A reuses the
returning skill's expert, run B (a threshold above the returning chunks' similarity, read from A)
splits it and the merge (held-out gain, the bench's criterion) folds bash experts back, never bash into call."""
from __future__ import annotations

from pathlib import Path

import pytest
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lifecycle():
    return load_script("bench/lifecycle.py")


def test_run_b_thresholds_come_from_run_a_decisions(lifecycle):
    res = {"stages": [{"chunks": 2}, {"chunks": 2}, {"chunks": 2}]}
    decs = [{"chunk": 0, "decision": "create", "similarity": None}, {"chunk": 1, "decision": "reuse", "similarity": 0.9012},
            {"chunk": 2, "decision": "wait", "similarity": 0.41}, {"chunk": 3, "decision": "create", "similarity": 0.43},
            {"chunk": 4, "decision": "reuse", "similarity": 0.8731}, {"chunk": 5, "decision": "reuse", "similarity": 0.8855}]
    th = lifecycle.thresholds_from(res, decs)
    assert th["returning_similarities"] == [0.8731, 0.8855]
    assert th["novelty"] == 0.91            # above both returning chunks (0.8855 + 0.02, rounded up)
    assert th["merge"] == 0.87              # the least alike chunk A reused (0.8731, rounded down)
    with pytest.raises(SystemExit, match="no threshold for run B"):
        lifecycle.thresholds_from(res, [{**d, "decision": "create"} for d in decs])


def test_quick_run_reuses_the_returning_skill_then_splits_it_and_merges_it_back(lifecycle, tmp_path):
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    out = lifecycle.main(["--quick", "--out", str(tmp_path)], runner=load_script("bench/common.py").train_inline)
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before  # --quick records nothing
    res, decs, th = out["results"], out["decisions"], out["thresholds"]

    back_a = lifecycle.returning(res["A"], decs["A"])
    bash_expert = decs["A"][0]["expert"]
    assert [(d["decision"], d["expert"]) for d in back_a] == [("reuse", bash_expert)] * 2  # A: bash's expert again
    assert res["A"]["lifecycle"] == [] and res["A"]["skill_expert"]["bash"] == bash_expert

    back_b = lifecycle.returning(res["B"], decs["B"])
    assert th["novelty"] > max(th["returning_similarities"])
    assert [d["decision"] for d in back_b] == ["create", "create"]  # B: each returning chunk is a new expert ...
    skills: dict[str, set] = {}                                      # what each expert of B trained on
    for d in decs["B"]:
        skills.setdefault(d["trained"], set()).add(d["skill"])
        for event in d.get("lifecycle", []):
            if "merge" in event:
                a, b = event["merge"]
                skills[event["into"]] = skills[a] | skills[b]
    merges = [e for e in res["B"]["lifecycle"] if "merge" in e]
    assert any(d["expert"] in m["merge"] for d in back_b for m in merges)  # ... merged back
    for m in merges:  # only bash experts merge: the merge kept half of each one's held-out gain
        assert min(m["merged_share"]) >= 0.5 and m["profile_similarity"] >= th["merge"]
        assert skills[m["into"]] == {"bash"}
    assert len(res["A"]["experts"]) == 2                             # A: bash and call
    for run in ("A", "B"):
        assert set(res[run]["routing"]["per_task"]) == {"bash", "call"}  # the returning skill is measured as bash
        assert len(res[run]["matrix"]) == 1 and res[run]["bwt"] is None  # experts.score: end (one row, after the stream)
        assert res[run]["oracle"]["experts"] == {} and res[run]["oracle"]["scores"] == []  # experts.oracle: false

    report = out["report"]
    assert "| B − A, same test examples |" in report and "Merge checks" in report
    assert "skill -> expert" in report and f"novelty threshold {th['novelty']:.2f}" in report
