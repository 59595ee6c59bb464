"""One run directory read into memory: what the report and the monitor both draw from.

Only reading and light derivation live here (no plotting), so the terminal monitor can use it
without importing matplotlib.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

from ..errors import UserError
from ..monitor.metrics_log import ALERTS, METRICS, read_jsonl

CONFIG = "config.yaml"
RESULTS = "results.json"


@dataclass
class RunData:
    path: Path
    config_text: str
    config: dict
    metrics: list[dict]
    alerts: list[dict]
    results: dict | None                      # None while the run is still going
    stage_steps: list[tuple[str, int]]        # planned (stage, steps) in training order
    notes: list[str] = field(default_factory=list)  # things the reader should know (a torn log line)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @cached_property
    def offsets(self) -> dict:
        return stage_offsets(self)

    def global_step(self, record: dict) -> int:
        """Position of a per-stage `step` on one axis over the whole run (stages restart at 1)."""
        if isinstance(record.get("global_step"), (int, float)):
            return int(record["global_step"])
        return self.offsets.get(record.get("stage"), 0) + int(record.get("step", 0))


def torn_tail(path: Path) -> bool:
    """Whether the last line of a JSONL file is an unfinished write (read_jsonl skips it silently)."""
    if not path.exists():
        return False
    lines = [ln for ln in path.read_text().split("\n") if ln.strip()]
    if not lines:
        return False
    try:
        json.loads(lines[-1])
        return False
    except json.JSONDecodeError:
        return True


def planned_stages(config: dict) -> list[tuple[str, int]]:
    """(name, steps) per stage as the engine resolved them (smoke sizes included).

    Goes through the recipe schema so smoke caps and per-stage overrides match the engine exactly;
    falls back to the raw YAML when the schema rejects it (e.g. a config from a newer version).
    """
    try:
        from ..config import load_recipe
        return [(s.name, s.train.steps) for s in load_recipe(config).resolved_stages()]
    except Exception:
        default = int((config.get("train") or {}).get("steps", 0) or 0)
        stages = config.get("stages") or [{"name": "main"}]
        return [(str(s.get("name")), int((s.get("train") or {}).get("steps", default))) for s in stages]


def stage_offsets(run: RunData) -> dict:
    """Global step at which each stage starts: the planned steps, or the logged ones if a stage ran longer."""
    logged: dict = {}
    for r in run.metrics:
        logged[r.get("stage")] = max(logged.get(r.get("stage"), 0), int(r.get("step", 0)))
    order = [n for n, _ in run.stage_steps] + [s for s in logged if s not in {n for n, _ in run.stage_steps}]
    planned = dict(run.stage_steps)
    out, at = {}, 0
    for name in order:
        out[name] = at
        at += max(planned.get(name, 0), logged.get(name, 0))
    return out


def load_run(path: Path) -> RunData:
    """Read a run directory; a directory that is not a run is a UserError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    if not (path / CONFIG).is_file():
        raise UserError(f"{path}: not a run directory (no {CONFIG})")
    if not (path / METRICS).is_file() and not (path / RESULTS).is_file():
        raise UserError(f"{path}: not a run directory (no {METRICS} or {RESULTS})")
    text = (path / CONFIG).read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise UserError(f"{path / CONFIG}: not valid YAML") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / CONFIG}: expected a mapping of recipe keys")
    results = None
    if (path / RESULTS).is_file():
        try:
            results = json.loads((path / RESULTS).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path / RESULTS} line {e.lineno}: not valid JSON") from None
    notes = [f"{path / name}: the last line was cut off (a run killed mid-write); it was skipped"
             for name in (METRICS, ALERTS) if torn_tail(path / name)]
    return RunData(path=path, config_text=text, config=config, metrics=read_jsonl(path / METRICS),
                   alerts=read_jsonl(path / ALERTS), results=results, stage_steps=planned_stages(config),
                   notes=notes)


def numeric(v) -> float | None:
    """A plottable number, or None (logs keep NaN/inf as strings, see MetricsLog._clean)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return None


def fmt(v) -> str:
    """One way to print a score everywhere (report, monitor, tests): 4 decimals, 'n/a' when undefined."""
    return "n/a" if v is None else f"{v:.4f}"
