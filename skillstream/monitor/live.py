"""`skillstream monitor RUN_DIR`: a live terminal view of a run, fed only by the files it writes.

It reads metrics.jsonl and alerts.jsonl the way `tail -f` does (new complete lines only), so it can
watch a run from another terminal, or another machine over a shared disk, without touching the
training process.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..report.rundata import CONFIG, RESULTS, fmt, numeric, planned_stages
from .metrics_log import ALERTS, METRICS, SAMPLES

BLOCKS = "▁▂▃▄▅▆▇█"
SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red", "critical": "bold white on red"}
SHOWN = {"step", "global_step", "stage", "stage_index", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}


class Follower:
    """New records of a JSONL file since the last poll.

    A line without its newline is still being written: it is left for the next poll. A file that
    shrank or was replaced (a resumed run rewrites its logs) is read again from the start.
    """

    def __init__(self, path: Path):
        self.path, self.pos, self.ino = path, 0, None

    def poll(self) -> tuple[list[dict], bool]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return [], False
        reset = self.ino is not None and (st.st_ino != self.ino or st.st_size < self.pos)
        if reset:
            self.pos = 0
        self.ino = st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.pos += end
        out = []
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a live view should not die on one bad line; `report` names it
        return out, reset


@dataclass
class View:
    """What the monitor knows about a run: the records so far and when it saw the steps arrive."""
    run_dir: Path
    config: dict
    stages: list[tuple[str, int]]
    metrics: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    results: dict | None = None
    sample: dict | None = None  # the newest record of samples.jsonl (train.sample_every)
    seen: deque = field(default_factory=lambda: deque(maxlen=50))  # (wall time, global step)

    def __post_init__(self):
        self._metrics, self._alerts = Follower(self.run_dir / METRICS), Follower(self.run_dir / ALERTS)
        self._samples = Follower(self.run_dir / SAMPLES)

    @property
    def finished(self) -> bool:
        return self.results is not None

    def poll(self) -> None:
        new, reset = self._metrics.poll()
        if reset:
            self.metrics, self.seen = [], deque(maxlen=50)
        self.metrics += new
        new_alerts, reset = self._alerts.poll()
        self.alerts = (new_alerts if reset else self.alerts + new_alerts)[-200:]
        new_samples, reset = self._samples.poll()
        if new_samples or reset:
            self.sample = new_samples[-1] if new_samples else None
        if new:
            self.seen.append((time.monotonic(), self.global_step(new[-1])))
        if (self.run_dir / RESULTS).is_file():
            try:
                self.results = json.loads((self.run_dir / RESULTS).read_text())
            except json.JSONDecodeError:
                self.results = None  # still being written; the next poll will read it

    def global_step(self, record: dict) -> int:
        at = 0
        for name, steps in self.stages:
            if name == record.get("stage"):
                return at + int(record.get("step", 0))
            at += steps
        return at + int(record.get("step", 0))

    @property
    def total_steps(self) -> int:
        return sum(s for _, s in self.stages)

    def eta(self) -> float | None:
        """Seconds of training left at the step rate seen by this monitor (evaluation time not included)."""
        if len(self.seen) < 2 or not self.metrics:
            return None
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return max(self.total_steps - self.global_step(self.metrics[-1]), 0) / ((s1 - s0) / (t1 - t0))


def open_view(run_dir: Path) -> View:
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{run_dir / CONFIG}: not valid YAML") from None
    return View(run_dir, config, planned_stages(config))


def sparkline(values: list[float], width: int = 48) -> str:
    vals = [v for v in values[-width:]]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    return "".join(BLOCKS[min(int((v - lo) / span * len(BLOCKS)), len(BLOCKS) - 1)] if math.isfinite(v) else " "
                   for v in vals)


def _duration(s: float | None) -> str:
    if s is None:
        return "estimating…"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(view: View):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    name = str(view.config.get("name") or view.run_dir.name)
    status = "finished" if view.finished else ("running" if view.metrics else "waiting for the first logged step")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    # the last training step (a skill stream also logs routing-only records between chunks)
    last = next((r for r in reversed(view.metrics) if "loss" in r), None)
    if last:
        stage = last.get("stage")
        names = [n for n, _ in view.stages]
        idx = f" ({names.index(stage) + 1}/{len(names)})" if stage in names else ""
        planned = dict(view.stages).get(stage)
        grid.add_row("stage", f"{stage}{idx}")
        grid.add_row("step", f"{last.get('step')}" + (f"/{planned}" if planned else "")
                     + f"   whole run {view.global_step(last)}/{view.total_steps}")
        losses = [numeric(r.get("loss")) for r in view.metrics if r.get("stage") == stage]
        loss = numeric(last.get("loss"))
        grid.add_row("loss", Text(f"{fmt(loss)}  ") + Text(sparkline([v for v in losses if v is not None]), style="green"))
        for key, label, f in [("lr", "lr", "{:.2e}"), ("grad_norm", "grad norm", "{:.4f}"),
                              ("tokens_per_s", "tokens/s", "{:.0f}")]:
            v = numeric(last.get(key))
            if v is not None:
                grid.add_row(label, f.format(v))
        extra = [(k, numeric(v)) for k, v in last.items() if k not in SHOWN and numeric(v) is not None]
        if extra:  # what the objective and plugins add (rewards/margins, objective/kl, ...)
            grid.add_row("also", "  ".join(f"{k} {v:.4g}" for k, v in extra[:8]))
    if view.finished:
        grid.add_row("ETA", "done")
    elif last and view.global_step(last) >= view.total_steps:  # results come after the final evaluation
        grid.add_row("ETA", "all steps done; evaluating")
    else:
        grid.add_row("ETA", _duration(view.eta()))
    experts = _experts(view)
    if experts:
        grid.add_row("experts", experts)
    if view.finished:
        r = view.results
        grid.add_row("results", f"AvgAcc {fmt(r.get('avg_acc'))}  BWT {fmt(r.get('bwt'))}  FWT {fmt(r.get('fwt'))}"
                                f"  train time {r.get('seconds', 0):.1f}s")
    if view.sample:
        grid.add_row("sample", _sample_line(view.sample))
    parts = [grid]
    if view.alerts:
        alerts = Table(title="latest alerts", show_edge=False, title_justify="left")
        for col in ("step", "severity", "kind", "message"):
            alerts.add_column(col)
        for a in view.alerts[-5:]:
            style = SEVERITY_STYLE.get(str(a.get("severity")), "")
            alerts.add_row(str(a.get("step", "")), Text(str(a.get("severity", "")), style=style),
                           str(a.get("kind", "")), Text(str(a.get("message", "")), style=style))
        parts.append(alerts)
    return Panel(Group(*parts), title=f"[bold]{name}[/] · {status}", subtitle=str(view.run_dir), expand=False)


def _sample_line(s: dict, width: int = 50) -> Text:
    """The newest sample as one line: step, prompt -> output, each cut to `width` characters."""
    from rich.text import Text

    def cut(v) -> str:
        v = " ".join(str(v or "").split())
        return v if len(v) <= width else v[:width - 1] + "…"
    return Text(f"step {s.get('step')}  {cut(s.get('prompt'))} -> {cut(s.get('output')) or '(nothing)'}")


def _experts(view: View) -> str:
    """Pool from results.json when the run is done, else the router shares the log reports."""
    latest = next((r for r in reversed(view.metrics) if any(k.startswith("router/share/") for k in r)), {})
    shares = {k.removeprefix("router/share/"): numeric(v) for k, v in latest.items() if k.startswith("router/share/")}
    pool = (view.results or {}).get("experts") or []
    names = [e.get("name") if isinstance(e, dict) else str(e) for e in pool] or list(shares)
    return "  ".join(f"{n}" + (f" {shares[n]:.0%}" if shares.get(n) is not None else "") for n in names)


def monitor(run_dir: Path, once: bool = False, interval: float = 1.0) -> None:
    """Follow a run until its results.json appears (or Ctrl-C); `once` renders one frame and returns."""
    from rich.console import Console
    from rich.live import Live

    if interval <= 0:
        raise UserError(f"--interval {interval}: must be > 0 seconds")
    view = open_view(run_dir)
    view.poll()
    console = Console()
    if once:
        console.print(render(view))
        return
    try:
        with Live(render(view), console=console, auto_refresh=False) as live:
            while not view.finished:
                time.sleep(interval)
                view.poll()
                live.update(render(view), refresh=True)
    except KeyboardInterrupt:
        pass  # leaving the view is the normal way out of a run that is still going
