"""metrics.jsonl and alerts.jsonl of a run, and what of the run goes to its trackers (report_to:
TensorBoard, MLflow, W&B; monitor/trackers.py): every numeric metrics field under its own name, each
evaluation row, alerts, novelty decisions, the final summary and the run's files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ..files import write_atomic
from .trackers import log_run_files, log_scalars, log_table, numeric

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

    def __init__(self, run_dir: Path, accelerator=None, enabled: bool = True, tags: dict | None = None,
                 clock: dict | None = None):
        self.run_dir, self.accelerator, self.enabled = run_dir, accelerator, enabled
        self.tags = tags or {}
        # the newest global step logged, shared by the tagged copies: the trackers' step for what
        # comes between training records (an alert, an evaluation row)
        self.clock = clock if clock is not None else {"global_step": 0}

    def tagged(self, **tags) -> MetricsLog:
        """This log with `tags` in every metrics record: a stage's or chunk's `stage_index`, by which a
        resume drops the records it will write again (run_state.drop_redone_records)."""
        return MetricsLog(self.run_dir, self.accelerator, self.enabled, {**self.tags, **tags}, self.clock)

    @property
    def tracking(self) -> bool:
        return self.enabled and self.accelerator is not None and bool(self.accelerator.trackers)

    def _append(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            f.flush()

    def log(self, record: dict) -> None:
        """A metrics record; the trackers get its numbers under their metrics.jsonl names at its
        global step (the stage's name is its `stage_index`, named in the recipe the trackers hold)."""
        record = {**record, **self.tags}
        self._append(METRICS, record)
        step = record.get("global_step", record.get("step", 0))
        self.clock["global_step"] = step
        if self.tracking:
            log_scalars(self.accelerator, {k: v for k, v in numeric(record).items() if k != "global_step"}, step)

    def alert(self, step: int, severity: str, kind: str, message: str, **extra) -> None:
        self._append(ALERTS, {"step": step, "severity": severity, "kind": kind, "message": message, **extra})
        if self.tracking:  # as it happens: an alert that stops the run must reach the tracker too
            log_table(self.accelerator, "alerts", ["stage_step", "severity", "kind", "message"],
                      [[step, severity, kind, message]], self.clock["global_step"])

    def evaluation(self, tasks: list[str], row: list[dict], when: str) -> None:
        """An evaluation row (each task's score and the metric's other numbers) to the trackers as
        eval/<task>/<number>, at the newest global step (0 before training); `when`: initial, or the
        stage or chunk it follows."""
        if not self.tracking:
            return
        values = {f"eval/{t}/{k}": v for t, r in zip(tasks, row) for k, v in numeric(r).items()}
        log_scalars(self.accelerator, values, self.clock["global_step"])
        log_table(self.accelerator, "evaluations", ["after", "task", "metric", "score"],
                  [[when, t, r.get("metric"), r.get("score")] for t, r in zip(tasks, row)], self.clock["global_step"])

    def decision(self, record: dict, experts: int) -> None:
        """A skill stream's decision for a chunk (create, assign, wait) and the expert count after it."""
        if not self.tracking:
            return
        values = {"experts/count": experts, **{f"novelty/{k}": v for k, v in numeric(record).items()
                                               if k in ("similarity", "entropy", "streak")}}
        log_scalars(self.accelerator, values, self.clock["global_step"])
        log_table(self.accelerator, "decisions", ["chunk", "decision", "expert", "similarity", "skill"],
                  [[record.get(k) for k in ("chunk", "decision", "expert", "similarity", "skill")]],
                  self.clock["global_step"])

    def finish(self, results: dict) -> None:
        """The run's summary (AvgAcc, BWT, FWT, routing accuracy, experts), its accuracy matrix and its
        files, once results.json is written."""
        if not self.tracking:
            return
        step = self.clock["global_step"]
        summary = {k: results.get(k) for k in ("avg_acc", "bwt", "fwt", "experts_created", "seconds")}
        summary["routing_accuracy"] = (results.get("routing") or {}).get("task_agnostic_accuracy")
        summary["oracle_avg_acc"] = (results.get("oracle") or {}).get("avg_acc")
        log_scalars(self.accelerator, {f"summary/{k}": v for k, v in numeric(summary).items()}, step)
        tasks = results.get("tasks", [])
        after = [s["name"] for s in results.get("stages", [])] if len(results.get("matrix", [])) == len(
            results.get("stages", [])) else [f"row {i}" for i in range(len(results.get("matrix", [])))]
        log_table(self.accelerator, "accuracy_matrix", ["after", *tasks],
                  [["initial", *results.get("initial", [])]] + [[a, *row] for a, row in zip(after, results.get("matrix", []))],
                  step)
        log_run_files(self.accelerator, self.run_dir)
