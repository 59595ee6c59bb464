"""`skillstream monitor RUN_DIR --csv FILE`: the run's metrics.jsonl as one CSV table.

One row per record, in the order they were logged; the columns are every field any record has, in
the order they first appear (a plugin's metrics that start in a later stage get their column, empty
before). A spreadsheet or pandas reads it without knowing skillstream's record layout.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from .metrics_log import METRICS, read_jsonl


def export_csv(run_dir: Path, out: Path) -> tuple[int, int]:
    """Write RUN_DIR/metrics.jsonl to `out` as CSV; returns (rows, columns)."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir}: no {METRICS} (not a run directory, or no step was logged yet)")
    records = read_jsonl(run_dir / METRICS)
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_atomic(Path(out), buf.getvalue())
    return len(records), len(columns)
