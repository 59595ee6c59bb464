"""Every reported score carries n and a 95% interval: Wilson for rates, a paired bootstrap over the
examples for AvgAcc/BWT/FWT and for differences between runs on the same examples."""
from __future__ import annotations

import pytest

import skillstream
from skillstream.cli import print_summary
from skillstream.continual.metrics import avg_acc, bwt, matrix_intervals, summarize
from skillstream.evaluation.intervals import bootstrap_matrix, paired_difference, score_interval, wilson


def test_wilson_matches_the_textbook_values():
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson(0, 20) == pytest.approx([0.0, 0.1611], abs=1e-4)  # never an empty interval at 0
    assert wilson(0, 0) is None


def test_a_mean_of_credits_gets_the_normal_interval_and_pass_fail_gets_wilson():
    assert score_interval([1, 0, 1, 1]) == wilson(3, 4)
    lo, hi = score_interval([0.5, 0.25, 0.75, 0.5])
    assert lo < 0.5 < hi


def test_a_paired_difference_says_whether_its_interval_excludes_zero():
    same = paired_difference([1, 0, 1, 0] * 5, [1, 0, 1, 0] * 5)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and not same["excludes_zero"]
    better = paired_difference([0] * 30, [1] * 25 + [0] * 5)
    assert better["difference"] == pytest.approx(25 / 30) and better["excludes_zero"] and better["n"] == 30
    noisy = paired_difference([1, 0] * 10, [0, 1] * 10)  # different on every example, same mean
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1] and not noisy["excludes_zero"]
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_matrix_intervals_resample_each_task_alike_in_every_row():
    initial = [[0, 0, 0, 0], [0, 1, 0, 1]]
    rows = [[[1, 1, 1, 0], [0, 1, 0, 1]], [[1, 1, 1, 0], [1, 1, 1, 1]]]
    # task 0 did not change between rows 0 and 1: its BWT term is 0 in every resample, so BWT's interval is [0, 0]
    assert bootstrap_matrix(initial, rows, lambda i, m: bwt(m)) == [0, 0]
    lo, hi = bootstrap_matrix(initial, rows, lambda i, m: avg_acc(m))
    assert lo <= avg_acc([[0.75, 0.5], [0.75, 1.0]]) <= hi
    assert bootstrap_matrix(initial, rows, lambda i, m: avg_acc(m), seed=3) == \
        bootstrap_matrix(initial, rows, lambda i, m: avg_acc(m), seed=3)  # seeded: the same interval again
    details = [[{"outcomes": o} for o in row] for row in rows]
    s = summarize(["a", "b"], {"a": "accuracy", "b": "accuracy"}, [0.0, 0.5], [[0.75, 0.5], [0.75, 1.0]],
                  [{"outcomes": o} for o in initial], details)
    assert s["n"] == [4, 4] and s["ci95"]["bwt"] == [0, 0] and set(s["ci95"]) == {"avg_acc", "bwt", "fwt"}
    # learned: each task after its own stage against before training, on the same examples
    assert [d["difference"] for d in s["learned"]] == [0.75, 0.5]
    assert all(d["n"] == 4 for d in s["learned"])


def test_learned_says_whether_a_stage_taught_its_task_beyond_chance():
    before = [[0] * 40, [1] * 20 + [0] * 20]
    after_a = [[1] * 30 + [0] * 10, [1] * 20 + [0] * 20]       # task a: 0 -> 0.75 on the same 40 examples
    after_b = [[1] * 30 + [0] * 10, [0, 1] * 10 + [1, 0] * 10]  # task b: 0.5 -> 0.5, answers shuffled
    s = matrix_intervals([{"outcomes": o} for o in before], [[{"outcomes": o} for o in row] for row in (after_a, after_b)])
    taught, untaught = s["learned"]
    assert taught["difference"] == 0.75 and taught["excludes_zero"] and taught["ci95"][0] > 0.5
    assert untaught["difference"] == 0 and not untaught["excludes_zero"]


def test_a_two_stage_run_reports_n_and_intervals_for_every_score(sentiment_folder, tmp_path, capsys):
    from test_continual import _two_task_recipe

    run = skillstream.train(_two_task_recipe(sentiment_folder, tmp_path, []), out=tmp_path / "run", show_progress=False)
    r = run.results
    for row in [r["initial_details"], *r["details"]]:
        for cell in row:
            assert cell["n"] == len(cell["outcomes"]) > 0
            lo, hi = cell["score_ci95"]
            assert lo <= cell["score"] <= hi
            assert cell["score"] == pytest.approx(sum(cell["outcomes"]) / cell["n"])
    assert r["n"] == [row["n"] for row in r["initial_details"]]
    for key in ("avg_acc", "bwt", "fwt"):
        lo, hi = r["ci95"][key]
        assert lo <= r[key] + 1e-9 and r[key] - 1e-9 <= hi
    # each task's own-stage gain, on the same examples as the matrix's cells, in results.json and the CLI's summary
    for j, gain in enumerate(r["learned"]):
        assert gain["difference"] == pytest.approx(r["matrix"][j][j] - r["initial"][j]) and gain["n"] == r["n"][j]
    print_summary(run)
    assert "learned (own stage − before, paired 95%)" in capsys.readouterr().out
