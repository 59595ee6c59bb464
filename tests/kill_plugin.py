"""A plugin that kills its own process with SIGKILL once, after a given optimizer step: every process of
a multi-process run dies at the same point, as under `kill -9` (tests/test_multiprocess_stream.py).
`marker` is a file it creates first, so the resumed run (same recipe, same plugin) is not killed again."""
import os
import signal
from pathlib import Path

from skillstream.plugins import Plugin, StepContext


class KillOnce(Plugin):
    name = "kill_once"

    def __init__(self, steps: int, marker: str, **context):
        self.steps, self.marker, self.seen = steps, Path(marker), 0

    def after_step(self, ctx: StepContext, metrics: dict) -> dict:
        self.seen += 1
        if self.seen == self.steps and not self.marker.exists():
            ctx.accelerator.wait_for_everyone()  # both processes reached the step before either dies
            if ctx.accelerator.is_main_process:
                self.marker.write_text("killed")
            ctx.accelerator.wait_for_everyone()
            os.kill(os.getpid(), signal.SIGKILL)
        return {}
