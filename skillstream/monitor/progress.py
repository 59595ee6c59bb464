"""The progress display: a rich bar in a terminal, plain periodic lines under CI or in a pipe."""
from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, total: int, stage: str, start: int = 0, enabled: bool = True):
        self.total, self.stage, self.enabled = total, stage, enabled
        self.plain = os.environ.get("CI", "").lower() == "true" or not sys.stderr.isatty()
        self._bar = None
        self._t0, self._s0 = time.time(), start
        if enabled and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
            self._bar = RichProgress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(stage, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, record: dict | None) -> None:
        if not self.enabled:
            return
        info = ""
        if record:
            info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **({"info": info} if info else {}))
        elif record:  # under CI: a line per logging interval, with an ETA from the measured rate
            rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"[{self.stage}] step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
