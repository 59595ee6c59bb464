"""Runs of one recipe that differ only in their seed, summarised as a mean with its spread.

A headline number is a mean over >= 3 seeds with its spread; one seed's score, even with its
interval, says how well the test prompts pin that run down, not how much the result moves when
the initialisation, the data order and the dropout masks change. `skillstream report A B C` puts
this table on the comparison page (and prints it) whenever some of the runs compared are the same
recipe at different seeds.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Callable

from .rundata import RunData


@dataclass(frozen=True)
class Spread:
    """One number over seeds: the mean, the sample standard deviation and the range."""
    mean: float
    sd: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f} ({self.low:.3f}..{self.high:.3f})"


def spread(values: list[float | None]) -> Spread | None:
    """The Spread of the values that exist; None when none does (a metric some runs lack)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return Spread(statistics.fmean(values), sd, min(values), max(values), len(values))


def _recipe_key(config: dict) -> str:
    """The run's configuration without its seed: runs with equal keys differ only in the seed."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True, default=str)


@dataclass
class SeedGroup:
    name: str
    runs: list[RunData]                      # one finished run per seed, in the order given
    duplicates: list[str]                    # runs left out because an earlier one had their seed

    @property
    def seeds(self) -> list:
        return [r.config.get("seed") for r in self.runs]


def seed_groups(runs: list[RunData]) -> list[SeedGroup]:
    """The finished runs grouped by recipe-without-seed; only groups of two or more seeds.

    A second run at a seed already in the group repeats the first one (seeded runs reproduce), so
    it is named in `duplicates` and not counted as one more seed."""
    groups: dict[str, SeedGroup] = {}
    for run in runs:
        if not run.results:
            continue
        group = groups.setdefault(_recipe_key(run.config), SeedGroup(run.name, [], []))
        if run.config.get("seed") in group.seeds:
            group.duplicates.append(str(run.path))
        else:
            group.runs.append(run)
    return [g for g in groups.values() if len(g.runs) > 1]


def _get(*keys) -> Callable[[dict], float | None]:
    """A reader of one number in results.json by its path of keys and list indices (None where absent)."""
    def read(results: dict):
        value = results
        for k in keys:
            if isinstance(value, dict):
                value = value.get(k)
            elif isinstance(value, list) and isinstance(k, int) and -len(value) <= k < len(value):
                value = value[k]
            else:
                return None
        return value if isinstance(value, (int, float)) else None
    return read


def headline(results: list[dict]) -> list[tuple[str, Spread]]:
    """Mean and spread of the numbers a continual run is judged by, over the given runs' results.

    AvgAcc, BWT, FWT; each task's final score and its gain from its own stage (`learned`); and,
    for expert pools, the AvgAcc with the oracle's experts and the task-agnostic routing accuracy.
    A metric no run has is left out."""
    tasks = results[0].get("tasks") or []
    rows: list[tuple[str, Callable[[dict], float | None]]] = [
        ("AvgAcc", _get("avg_acc")), ("BWT", _get("bwt")), ("FWT", _get("fwt")),
        ("AvgAcc with the oracle's experts", _get("oracle", "avg_acc")),
        ("routing accuracy (task-agnostic)", _get("routing", "task_agnostic_accuracy"))]
    for j, task in enumerate(tasks):
        rows.append((f"{task}: final score", _get("matrix", -1, j)))
        rows.append((f"{task}: after its own stage − before", _get("learned", j, "difference")))
    out = []
    for label, read in rows:
        s = spread([read(r) for r in results])
        if s is not None:
            out.append((label, s))
    return out


def text(group: SeedGroup) -> str:
    """The group's headline as plain lines, for the terminal and for bench/RESULTS.md."""
    lines = [f"{group.name}: mean ± sample sd (min..max) over seeds {', '.join(map(str, group.seeds))}"]
    lines += [f"  {label}: {s}" for label, s in headline([r.results for r in group.runs])]
    lines += [f"  (left out, same seed as an earlier run: {d})" for d in group.duplicates]
    return "\n".join(lines)
