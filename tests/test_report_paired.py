"""Two runs compared on the same evaluation examples (`skillstream report A B`): differences of AvgAcc,
BWT, each task's final score and routing, with paired-bootstrap intervals, and refusal to pair runs
that scored different examples."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from skillstream.continual.metrics import summarize
from skillstream.report.html import write_report
from skillstream.report.paired import paired_run_difference, text

TASKS = ["call", "decline"]


def results(final_call: list[int], final_decline: list[int], *, prompts=("p0", "q0"), routed=None) -> dict:
    """A two-stage run's results.json as a run writes it (summarize() and the evaluation rows): 10 examples
    per task with per-example outcomes."""
    def row(call, decline):
        return [{"score": sum(o) / len(o), "outcomes": o, "samples": [{"prompt": p}]}
                for o, p in zip((call, decline), prompts)]
    initial = row([0] * 10, [1] * 10)                             # the backbone: never calls, always declines
    after_call = row([1] * 8 + [0] * 2, [1] * 6 + [0] * 4)        # stage 1 taught calling, cost some declining
    details = [after_call, row(final_call, final_decline)]
    out = summarize(TASKS, {t: "ast_accuracy" for t in TASKS}, [r["score"] for r in initial],
                    [[r["score"] for r in d] for d in details], initial, details)
    out.update(initial_details=initial, details=details)
    if routed is not None:
        out["routing"] = {"per_task": {t: {"outcomes": o} for t, o in zip(TASKS, routed)}}
    return out


def test_a_better_run_differs_by_the_hand_computed_amount_and_its_interval_excludes_zero():
    a = results([1] * 8 + [0] * 2, [1] * 5 + [0] * 5, routed=([1] * 10, [1] * 5 + [0] * 5))
    b = results([1] * 8 + [0] * 2, [1] * 10, routed=([1] * 10, [1] * 10))      # b kept every decline
    d = paired_run_difference(a, b)
    assert d["paired"] and d["n"] == [10, 10]
    assert d["avg_acc"]["difference"] == pytest.approx((0.8 + 1.0) / 2 - (0.8 + 0.5) / 2)   # +0.25
    assert d["avg_acc"]["excludes_zero"] and d["avg_acc"]["ci95"][0] > 0
    assert d["bwt"]["difference"] == pytest.approx(0.0)  # BWT reads call only (the task of the first stage): equal
    assert d["final"]["decline"]["difference"] == pytest.approx(0.5) and d["final"]["decline"]["excludes_zero"]
    assert d["final"]["call"] == {"difference": 0.0, "ci95": [0.0, 0.0], "n": 10, "excludes_zero": False}
    assert d["routing"]["difference"] == pytest.approx(5 / 20) and d["routing"]["n"] == 20


def test_runs_with_the_same_outcomes_differ_by_zero_and_one_flip_is_not_significant():
    a = results([1] * 8 + [0] * 2, [1] * 5 + [0] * 5)
    assert paired_run_difference(a, a)["avg_acc"] == {"difference": 0.0, "ci95": [0.0, 0.0], "excludes_zero": False}
    b = results([1] * 9 + [0], [1] * 5 + [0] * 5)                       # one more call prompt right
    d = paired_run_difference(a, b)
    assert d["avg_acc"]["difference"] == pytest.approx(0.05) and not d["avg_acc"]["excludes_zero"]
    assert "routing" not in d                                            # neither run kept routing outcomes


@pytest.mark.parametrize("change, reason", [
    (lambda r: r.update(tasks=["call", "choose"]), "different tasks"),
    (lambda r: [row[0].update(outcomes=row[0]["outcomes"][:8]) for row in [r["initial_details"], *r["details"]]],
     "different numbers of examples"),
    (lambda r: r["initial_details"][1]["samples"][0].update(prompt="another request"), "different evaluation examples"),
    (lambda r: r["details"][-1][0].pop("outcomes"), "no per-example outcomes"),
])
def test_runs_that_scored_different_examples_are_not_paired(change, reason):
    a, b = results([1] * 10, [1] * 10), results([1] * 10, [1] * 10)
    change(b)
    d = paired_run_difference(a, b)
    assert not d["paired"] and reason in d["reason"]


def test_the_comparison_page_and_the_terminal_show_the_paired_differences(tmp_path):
    dirs = []
    for name, res in (("hard", results([1] * 8 + [0] * 2, [1] * 5 + [0] * 5)),
                      ("dense", results([1] * 8 + [0] * 2, [1] * 10))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "seed": 0}))
        (d / "results.json").write_text(json.dumps(res))
        dirs.append(d)
    page = write_report(dirs).read_text()
    assert "Differences on the same evaluation examples" in page and "dense − hard" in page
    lines = text([(d.name, json.loads((d / "results.json").read_text())) for d in dirs])
    assert len(lines) == 1 and lines[0].startswith("dense − hard · AvgAcc (paired 95%): +0.250 [")
    assert "excludes 0" in lines[0] and "decline +0.500" in lines[0]
    printed = run_cli("report", *map(str, dirs), cwd=tmp_path)
    assert printed.returncode == 0 and lines[0].replace("dense", str(dirs[1])).replace("hard", str(dirs[0])) in printed.stdout
