"""Two runs compared on the same evaluation examples: differences with paired-bootstrap intervals.

Two runs that scored the same tasks on the same examples (the same task names, the same number of
examples per task, the same first prompts) are paired: each task's examples are resampled together
across both runs' accuracy matrices, so the interval of a difference (AvgAcc, BWT, each task's final
score) carries what differs between the runs, not which examples the bootstrap happened to draw.
Routing is paired the same way over the held-out prompts both runs routed. Two unpaired intervals
that overlap say nothing about the difference; this is the reading a comparison needs.
"""
from __future__ import annotations

from ..continual.metrics import avg_acc, bwt
from ..evaluation.intervals import bootstrap_matrix, paired_difference


def _outcomes(results: dict) -> tuple[list, list] | None:
    initial = [r.get("outcomes") for r in results.get("initial_details") or []]
    rows = [[r.get("outcomes") for r in row] for row in results.get("details") or []]
    if not initial or not rows or None in initial or any(None in row for row in rows):
        return None
    return initial, rows


def _first_prompts(row: list[dict]) -> list:
    return [[s.get("prompt") for s in r.get("samples") or []] for r in row]


def _unpaired_reason(a: dict, b: dict, outcomes_a, outcomes_b) -> str | None:
    """Why two runs' results cannot be paired example by example (None: they can)."""
    if a.get("tasks") != b.get("tasks"):
        return f"different tasks ({a.get('tasks')} vs {b.get('tasks')})"
    if outcomes_a is None or outcomes_b is None:
        return "a run's evaluation rows have no per-example outcomes"
    (ia, ra), (ib, rb) = outcomes_a, outcomes_b
    if [len(o) for o in ia] != [len(o) for o in ib] or len(ra) != len(rb):
        return "different numbers of examples per task or of stages"
    pa, pb = _first_prompts(a["initial_details"]), _first_prompts(b["initial_details"])
    if any(x and y and x != y for x, y in zip(pa, pb)):
        return "different evaluation examples (their first prompts differ)"
    return None


def _difference(initial: list, rows_a: list, rows_b: list, statistic) -> dict:
    t = len(rows_a)
    value = statistic([[sum(o) / len(o) for o in row] for row in rows_b]) - \
        statistic([[sum(o) / len(o) for o in row] for row in rows_a])
    ci = bootstrap_matrix(initial, rows_a + rows_b, lambda i, m: statistic(m[t:]) - statistic(m[:t]))
    return {"difference": value, "ci95": ci, "excludes_zero": ci is not None and (ci[0] > 0 or ci[1] < 0)}


def paired_run_difference(a: dict, b: dict) -> dict:
    """b − a on the same examples: AvgAcc, BWT and each task's final score with paired-bootstrap 95%
    intervals, and task-agnostic routing where both runs kept their routing outcomes.
    {'paired': False, 'reason': ...} where the runs cannot be paired."""
    outcomes_a, outcomes_b = _outcomes(a), _outcomes(b)
    if reason := _unpaired_reason(a, b, outcomes_a, outcomes_b):
        return {"paired": False, "reason": reason}
    (initial, rows_a), (_, rows_b) = outcomes_a, outcomes_b
    out = {"paired": True, "n": [len(o) for o in initial],
           "avg_acc": _difference(initial, rows_a, rows_b, avg_acc),
           "final": {task: paired_difference(rows_a[-1][j], rows_b[-1][j]) for j, task in enumerate(a["tasks"])}}
    if len(rows_a) > 1:
        out["bwt"] = _difference(initial, rows_a, rows_b, bwt)
    routed = [_routing_outcomes(r) for r in (a, b)]
    if None not in routed and [len(o) for o in routed[0].values()] == [len(o) for o in routed[1].values()] \
            and list(routed[0]) == list(routed[1]):
        out["routing"] = paired_difference([x for o in routed[0].values() for x in o],
                                           [x for o in routed[1].values() for x in o])
    return out


def _routing_outcomes(results: dict) -> dict[str, list] | None:
    per_task = (results.get("routing") or {}).get("per_task") or {}
    outcomes = {task: r.get("outcomes") for task, r in per_task.items()}
    return outcomes if outcomes and None not in outcomes.values() else None


def shown(d: dict | None) -> str:
    """'+0.063 [+0.000, +0.156] excludes 0' (or includes 0); '-' where there is no such difference."""
    if not d:
        return "-"
    ci = d.get("ci95")
    if ci is None:
        return f"{d['difference']:+.3f}"
    return f"{d['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] {'excludes 0' if d['excludes_zero'] else 'includes 0'}"


def rows(labels: list[str], results: list[dict], *, paired_only: bool = False) -> list[list[str]]:
    """One row per run after the first: that run minus the first, on the same examples (with
    `paired_only`, runs that cannot be paired with the first are left out rather than told why)."""
    out = []
    for label, r in zip(labels[1:], results[1:]):
        d = paired_run_difference(results[0], r)
        if not d["paired"]:
            if not paired_only:
                out.append([f"{label} − {labels[0]}", f"not paired: {d['reason']}", "", "", ""])
            continue
        final = "; ".join(f"{task} {shown(x)}" for task, x in d["final"].items())
        out.append([f"{label} − {labels[0]}", shown(d["avg_acc"]), shown(d.get("bwt")), shown(d.get("routing")), final])
    return out


HEADER = ["runs", "AvgAcc (paired 95%)", "BWT (paired 95%)", "routing (paired 95%)", "final score per task (paired 95%)"]


def text(finished: list[tuple[str, dict]]) -> list[str]:
    """The paired rows as terminal lines, for (label, results) of finished runs; runs that cannot be
    paired with the first are left out here (the HTML page says why)."""
    if len(finished) < 2:
        return []
    labels, results = map(list, zip(*finished))
    return [" · ".join(f"{h}: {c}" if i else c for i, (h, c) in enumerate(zip(HEADER, row)) if c)
            for row in rows(labels, results, paired_only=True)]
