"""95% intervals for every score a run reports.

- A rate (a share of examples that pass): the Wilson score interval.
- A mean of per-example credits in [0, 1] (argument accuracy, structure): the normal interval of the mean.
- AvgAcc, BWT and FWT of an accuracy matrix, and the difference between two runs on the same
  examples: a paired bootstrap over the examples (each task's examples resampled with the same
  indices in every row, so a row's change is measured on the same inputs; percentile interval).

Per-example outcomes travel with each evaluation row as ``outcomes`` (the main score is their mean);
rows without them (perplexity, a metric that is not a mean over examples) get ``n`` only.
"""
from __future__ import annotations

import math
import random
from typing import Callable

Z95 = 1.959964
BOOTSTRAP_SAMPLES = 2000


def wilson(successes: float, n: int) -> list[float] | None:
    if n == 0:
        return None
    p = successes / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def mean_interval(values: list[float]) -> list[float] | None:
    if not values:
        return None
    n, m = len(values), sum(values) / len(values)
    if n == 1:
        return [m, m]
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return [round(max(0.0, m - half), 6), round(min(1.0, m + half), 6)]


def score_interval(outcomes: list[float]) -> list[float] | None:
    """The main score's interval from its per-example outcomes: Wilson for pass/fail, else the mean's."""
    if all(o in (0, 1) for o in outcomes):
        return wilson(sum(outcomes), len(outcomes))
    return mean_interval(outcomes)


def with_interval(row: dict) -> dict:
    """An evaluation row with `n` and `score_ci95` (the main score's interval) where it has outcomes."""
    outcomes = row.get("outcomes")
    if outcomes is None:
        return row
    return {**row, "n": len(outcomes), "score_ci95": score_interval(outcomes)}


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def bootstrap_matrix(initial: list[list[float]], matrix: list[list[list[float]]],
                     statistic: Callable[[list[float], list[list[float]]], float | None],
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float] | None:
    """A percentile 95% interval of `statistic(initial_scores, matrix_scores)` (AvgAcc, BWT, FWT), with
    each task's examples resampled together across the initial row and every row of the matrix.
    `initial[j]` and `matrix[i][j]` are per-example outcomes of task j (the same examples, in order)."""
    n_tasks = len(initial)
    sizes = [len(initial[j]) for j in range(n_tasks)]
    if not matrix or not all(sizes) or any(len(row[j]) != sizes[j] for row in matrix for j in range(n_tasks)):
        return None
    rng = random.Random(seed)
    stats = []
    for _ in range(samples):
        picks = [[rng.randrange(n) for _ in range(n)] for n in sizes]
        mean = [lambda outs, j=j: sum(outs[i] for i in picks[j]) / sizes[j] for j in range(n_tasks)]
        value = statistic([mean[j](initial[j]) for j in range(n_tasks)],
                          [[mean[j](row[j]) for j in range(n_tasks)] for row in matrix])
        if value is not None:
            stats.append(value)
    if not stats:
        return None
    return [round(_percentile(stats, 0.025), 6), round(_percentile(stats, 0.975), 6)]


def paired_difference(a: list[float], b: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """mean(b) - mean(a) on the same examples, its paired-bootstrap 95% interval, and whether it excludes 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes must have the same, non-zero length ({len(a)} vs {len(b)})")
    n = len(a)
    diffs = [y - x for x, y in zip(a, b)]
    rng = random.Random(seed)
    boot = [sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples)]
    ci = [round(_percentile(boot, 0.025), 6), round(_percentile(boot, 0.975), 6)]
    return {"difference": sum(diffs) / n, "ci95": ci, "n": n, "excludes_zero": ci[0] > 0 or ci[1] < 0}


def shown(value: float | None, ci: list[float] | None = None, digits: int = 4) -> str:
    """A score as the summary table and the report print it: the value and, where known, its interval."""
    if value is None:
        return "-"
    return f"{value:.{digits}f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.{digits}f}"


def row_difference(initial: list[dict], row_a: list[dict], row_b: list[dict]) -> dict | None:
    """Mean score of evaluation row `row_b` minus `row_a`'s (the same tasks, the same examples), with the
    paired-bootstrap 95% interval of the difference and of `row_b`'s mean; None where a row lacks outcomes."""
    outs = [[r.get("outcomes") for r in row] for row in (initial, row_a, row_b)]
    if any(o is None for row in outs for o in row):
        return None

    def mean(row):
        return sum(row) / len(row)
    ci = bootstrap_matrix(outs[0], outs[1:], lambda i, m: mean(m[1]) - mean(m[0]))
    return {"ci95": ci, "excludes_zero": ci is not None and (ci[0] > 0 or ci[1] < 0),
            "b_ci95": bootstrap_matrix(outs[0], outs[1:], lambda i, m: mean(m[1]))}
