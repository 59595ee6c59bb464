"""`skillstream report`: one self-contained HTML page (inline CSS and PNGs, no scripts, no network)."""
from __future__ import annotations

import sys
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Callable

from ..files import write_atomic
from . import paired, plots
from .rundata import RunData, fmt, load_run
from .seeds import headline, seed_groups
from .sections import RUN_SECTIONS, Section, duration, merged, table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:16px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:2px 0;color:#cfd8dc;font-size:13px}
nav{padding:8px 28px;background:#eceff1;font-size:13px;position:sticky;top:0}
nav a{margin-right:14px;color:#37474f}
main{padding:8px 28px 40px;max-width:1240px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:12px 18px;margin:14px 0}
h2{font-size:18px;margin:4px 0 10px} h3{font-size:15px;margin:12px 0 6px}
img.plot{max-width:100%;display:block;margin:8px 0}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;vertical-align:top;text-align:left}
th{background:#f5f5f5} table.num td{font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;margin:6px 0}
.card{border:1px solid #cfd8dc;border-radius:6px;padding:8px 16px;min-width:140px}
.card .k{font-size:12px;color:#607d8b} .card .v{font-size:24px;font-weight:600} .card .h{font-size:11px;color:#90a4ae}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:12px}
pre.config{background:#f7f7f7;padding:10px;max-height:520px;overflow:auto}
.empty{color:#b0bec5;font-style:italic}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:6px 10px;font-size:13px}
tr.sev-warning td{background:#fff8e1} tr.sev-error td{background:#ffebee} tr.sev-critical td{background:#ffcdd2;font-weight:600}
tr.sev-info td{background:#e3f2fd}
tr.best td{background:#e8f5e9;font-weight:600}
details>summary{cursor:pointer;font-size:17px;font-weight:600;margin:12px 0}
"""


def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def write_report(run_dirs: list[Path], out: Path | None = None, warn: Callable[[str], None] = _stderr) -> Path:
    """Write the report of one run (RUN_DIR/report.html) or a comparison of several
    (FIRST_RUN_DIR/report-compare.html); returns the path written.

    Raises UserError naming the first directory that is not a run. Things the reader should know
    but that are not fatal (a log line torn by a killed run) go to `warn` and into the page.
    """
    return write_runs(load_runs(run_dirs, warn), out)


def load_runs(run_dirs: list[Path], warn: Callable[[str], None] = _stderr) -> list[RunData]:
    """The run directories read once (what the page and the terminal's seed summary both draw from)."""
    if not run_dirs:
        from ..errors import UserError
        raise UserError("report: give at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    for run in runs:
        for note in run.notes:
            warn(note)
    return runs


def write_runs(runs: list[RunData], out: Path | None = None) -> Path:
    """The report page of runs already read (write_report reads them first)."""
    if out is None:
        out = runs[0].path / ("report.html" if len(runs) == 1 else "report-compare.html")
    out = Path(out)
    page = _single(runs[0]) if len(runs) == 1 else _compare(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, page)  # never a half-written page where a browser may be reading it
    return out


def _sections(run: RunData) -> list[Section]:
    return [s for s in (f(run) for f in RUN_SECTIONS) if s is not None]


def page(title: str, subtitle: list[str], sections: list[Section], notes: list[str], extra: str = "") -> str:
    nav = "".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{escape(s.title)}</h2>{s.body}</section>' for s in sections)
    note = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    sub = "".join(f"<p>{escape(s)}</p>" for s in subtitle)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><header><h1>{escape(title)}</h1>{sub}</header><nav>{nav}</nav>'
            f'<main>{note}{body}{extra}</main></body></html>')


def _facts(run: RunData) -> list[str]:
    r = run.results
    state = "finished" if r else "in progress (no results.json yet)"
    steps = sum(s.get("steps", 0) for s in r.get("stages", [])) if r else \
        (run.global_step(run.metrics[-1]) if run.metrics else 0)
    facts = [str(run.config.get("description", "")).strip(),
             f"{run.path} · {state} · {steps} steps · train time {duration((r or {}).get('seconds'))}"
             f" · written {datetime.now():%Y-%m-%d %H:%M}"]
    return [f for f in facts if f]


def _single(run: RunData) -> str:
    return page(f"skillstream report: {run.name}", _facts(run), _sections(run), run.notes)


def _labels(runs: list[RunData]) -> list[str]:
    """Run names, made unique with the folder name when two runs share a recipe name."""
    names = [r.name for r in runs]
    out = [n if names.count(n) == 1 else f"{n} ({r.path.name})" for n, r in zip(names, runs)]
    return [o if out.count(o) == 1 else str(r.path) for o, r in zip(out, runs)]


def _method(run: RunData) -> str:
    """Objective and plugins, which is what distinguishes one method's recipe from another's."""
    def name(c):
        return c.get("name") if isinstance(c, dict) else c
    parts = [name(run.config.get("objective"))] + [name(s.get("objective")) for s in run.config.get("stages") or []
                                                  if isinstance(s, dict)]
    parts += [name(p) for p in run.config.get("plugins") or []]
    return " + ".join(dict.fromkeys(str(p) for p in parts if p)) or "—"


def _compare(runs: list[RunData]) -> str:
    labels = _labels(runs)
    rows = []
    for label, run in zip(labels, runs):
        r = run.results or {}
        rows.append([label, _method(run), fmt(r.get("avg_acc")), fmt(r.get("bwt")), fmt(r.get("fwt")),
                     duration(r.get("seconds")), str(run.path)])
    parts = [table(["run", "method", "AvgAcc", "BWT", "FWT", "time", "directory"], rows, "num compare")]
    finished = [(label, run.results) for label, run in zip(labels, runs) if run.results]
    if len(finished) > 1:
        parts.append("<h3>Differences on the same evaluation examples</h3>"
                     + table(paired.HEADER, paired.rows(*map(list, zip(*finished))), "paired"))
    losses = {label: merged(run, "loss") for label, run in zip(labels, runs)}
    losses = {k: v for k, v in losses.items() if v[0]}
    if losses:
        parts.append(plots.panels({"loss": losses}, [], "loss of each run (overlaid)", cols=1))
    avg = {label: [sum(row) / len(row) for row in run.results["matrix"]]
           for label, run in zip(labels, runs) if run.results and run.results.get("matrix")}
    if avg:  # stages differ between runs, so compare by stage index
        series = {k: (list(range(1, len(v) + 1)), v) for k, v in avg.items()}
        parts.append(plots.panels({"mean score over all tasks after stage i": series}, [],
                                  "average score after each stage (overlaid)", xlabel="stage", cols=1))
    sections = [Section("compare", "Comparison", "".join(parts))]
    if seeds_section := _over_seeds(runs):
        sections.append(seeds_section)
    notes = [n for run in runs for n in run.notes]
    return page(f"skillstream comparison: {len(runs)} runs", [" · ".join(labels)], sections, notes,
                run_details(labels, runs))


def _over_seeds(runs: list[RunData]) -> Section | None:
    """Mean and spread over seeds for each recipe that was run at several seeds (report/seeds.py)."""
    parts = []
    for group in seed_groups(runs):
        rows = [[label, str(s), str(s.n)] for label, s in headline([r.results for r in group.runs])]
        parts.append(f"<h3>{escape(group.name)}: seeds {escape(', '.join(map(str, group.seeds)))}</h3>"
                     + table(["", "mean ± sample sd (min..max)", "seeds"], rows, "num seeds")
                     + "".join(f'<p class="note">left out, same seed as an earlier run: {escape(d)}</p>'
                               for d in group.duplicates))
    return Section("seeds", "Mean over seeds", "".join(parts)) if parts else None


def run_details(labels: list[str], runs: list[RunData]) -> str:
    """Each run's own report, folded (a <details> per run) below a comparison."""
    return "".join(
        f'<details id="run-{i}"><summary>{escape(label)}</summary>'
        + "".join(f'<section><h2>{escape(s.title)}</h2>{s.body}</section>' for s in _sections(run))
        + "</details>" for i, (label, run) in enumerate(zip(labels, runs)))
