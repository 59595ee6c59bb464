"""metrics.jsonl and alerts.jsonl of a run, plus Accelerate's trackers (TensorBoard, W&B, MLflow...)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ..files import write_atomic

METRICS = "metrics.jsonl"
ALERTS = "alerts.jsonl"
SAMPLES = "samples.jsonl"  # generations during training (monitor/samples.py)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log; a torn last line (a kill mid-write) is skipped, any other bad line is reported."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n >= len(lines) - 1:  # the last line: torn by a kill, not corrupt data
                break
            from ..errors import UserError
            raise UserError(f"{path} line {n}: not valid JSON") from None
    return out


def rewrite_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep the records a resumed run has not redone (drops steps after the checkpoint and a torn line)."""
    if path.exists():
        records = [r for r in read_jsonl(path) if keep(r)]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings rather than dropping them
    return v


class MetricsLog:
    """Append-only logs of a run; only the main process writes."""

    def __init__(self, run_dir: Path, accelerator=None, enabled: bool = True, tags: dict | None = None):
        self.run_dir, self.accelerator, self.enabled = run_dir, accelerator, enabled
        self.tags = tags or {}

    def tagged(self, **tags) -> MetricsLog:
        """This log with `tags` in every metrics record: a stage's or chunk's `stage_index`, by which a
        resume drops the records it will write again (run_state.drop_redone_records)."""
        return MetricsLog(self.run_dir, self.accelerator, self.enabled, {**self.tags, **tags})

    def _append(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            f.flush()

    def log(self, record: dict) -> None:
        record = {**record, **self.tags}
        self._append(METRICS, record)
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {f"{record.get('stage', '')}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "stage_index")}
            self.accelerator.log(numeric, step=record.get("global_step", record.get("step")))

    def alert(self, step: int, severity: str, kind: str, message: str, **extra) -> None:
        self._append(ALERTS, {"step": step, "severity": severity, "kind": kind, "message": message, **extra})
