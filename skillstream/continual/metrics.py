"""Continual-learning summaries of an accuracy matrix (Lopez-Paz & Ranzato, 2017).

matrix[i][j] = score on task j after training stage i; initial[j] = score before any training.
"""
from __future__ import annotations


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def avg_acc(matrix: list[list[float]]) -> float | None:
    return _mean(matrix[-1]) if matrix else None


def bwt(matrix: list[list[float]]) -> float | None:
    """Mean over j < T-1 of matrix[T-1][j] - matrix[j][j]: negative means forgetting."""
    t = len(matrix)
    return _mean([matrix[t - 1][j] - matrix[j][j] for j in range(min(t - 1, len(matrix[0])))]) if t > 1 else None


def fwt(matrix: list[list[float]], initial: list[float]) -> float | None:
    """Mean over j > 0 of matrix[j-1][j] - initial[j]: what earlier tasks did for later ones."""
    t = min(len(matrix), len(initial))
    return _mean([matrix[j - 1][j] - initial[j] for j in range(1, t)]) if t > 1 else None


def forgetting(matrix: list[list[float]]) -> list[float | None]:
    """Per task: best score it ever had minus its final score (None for the last-trained task)."""
    t = len(matrix)
    return [max(row[j] for row in matrix[: t - 1]) - matrix[-1][j] if j < t - 1 else None
            for j in range(len(matrix[0]))] if matrix else []


def summarize(tasks: list[str], metric: dict[str, str], initial: list[float], matrix: list[list[float]],
              initial_details: list[dict] | None = None, details: list[list[dict]] | None = None) -> dict:
    """The matrix's summaries; with the evaluation rows (`initial_details`, `details`) that carry per-example
    outcomes, also each score's n, the 95% intervals of AvgAcc, BWT and FWT (paired bootstrap over
    each task's examples, evaluation/intervals.py) and what each task's own stage taught (`learned`)."""
    out = {"tasks": tasks, "metric": metric, "initial": initial, "matrix": matrix,
           "avg_acc": avg_acc(matrix), "bwt": bwt(matrix), "fwt": fwt(matrix, initial),
           "forgetting": forgetting(matrix)}
    if initial_details is not None and details is not None:
        out.update(matrix_intervals(initial_details, details))
    return out


def matrix_intervals(initial_details: list[dict], details: list[list[dict]]) -> dict:
    """{'n': examples per task, 'ci95': {avg_acc, bwt, fwt}, 'learned': [...]} where every cell has its
    outcomes, else {}. learned[j] is task j's score after its own stage (row j, the reading BWT and FWT
    make of the matrix) minus its score before any training, on the same examples: the paired difference,
    its bootstrap 95% interval and whether that excludes 0. It says whether a stage taught its task at all,
    which AvgAcc cannot: a task the backbone already does well can sit high in the last row untaught."""
    from ..evaluation.intervals import bootstrap_matrix, paired_difference

    initial = [r.get("outcomes") for r in initial_details]
    rows = [[r.get("outcomes") for r in row] for row in details]
    if not rows or any(o is None for o in initial) or any(o is None for row in rows for o in row):
        return {}
    return {"n": [len(o) for o in initial],
            "ci95": {"avg_acc": bootstrap_matrix(initial, rows, lambda i, m: avg_acc(m)),
                     "bwt": bootstrap_matrix(initial, rows, lambda i, m: bwt(m)),
                     "fwt": bootstrap_matrix(initial, rows, lambda i, m: fwt(m, i))},
            "learned": [paired_difference(initial[j], rows[j][j]) for j in range(min(len(rows), len(initial)))]}
