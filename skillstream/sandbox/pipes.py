"""Collecting a run's output within its limits: the loop that reads stdout/stderr (and under
bwrap the status pipe) until the main process and what it started are done, or the deadline."""

from __future__ import annotations

import os
import selectors
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bubblewrap import Bubblewrapped
    from .plain import Plain

_GRACE_S = 0.2  # after the main process exits, how long leftovers may still write


def collect(run: Plain | Bubblewrapped, deadline: float, limit: int):
    """Read stdout/stderr until the main process has exited and nothing it started still
    runs (or _GRACE_S passed since it exited), or until the deadline.

    Keeps at most ``limit`` bytes of each; output beyond it is still read (and dropped) so
    the child never blocks on a full pipe. Returns (stdout, stderr, truncated, timed_out).
    """
    with _Pipes(run, limit) as pipes:
        exited_at = None
        while (now := time.monotonic()) < deadline:
            if exited_at is None and run.main_exited():
                exited_at = now
            if exited_at is not None and (now - exited_at > _GRACE_S or not _busy(run, pipes)):
                break
            pipes.read(timeout=min(0.01 if exited_at else 0.05, deadline - now))
        while time.monotonic() < deadline and pipes.read(timeout=0):
            pass  # what finished processes wrote before we stopped waiting
        timed_out = exited_at is None and not run.main_exited()
        return pipes.stdout, pipes.stderr, pipes.truncated, timed_out


def _busy(run: Plain | Bubblewrapped, pipes: _Pipes) -> bool:
    """After the main process exited: is anything it started still running?"""
    # Open pipes say so in the fallback (a leftover holds them); under bwrap they say
    # nothing, as bwrap itself holds copies until the end.
    return (run.open_pipes_mean_busy and pipes.output_open) or bool(run.leftovers())


class _Pipes:
    """The run's stdout and stderr, and under bwrap its status pipe, read as data comes."""

    def __init__(self, run: Plain | Bubblewrapped, limit: int):
        self.run, self.limit, self.truncated = run, limit, False
        self.out_fd, self.err_fd = run.proc.stdout.fileno(), run.proc.stderr.fileno()
        self.bufs = {self.out_fd: bytearray(), self.err_fd: bytearray()}
        self.sel = selectors.DefaultSelector()
        for fd in [*self.bufs, run.status_fd]:
            if fd is not None:
                self.sel.register(fd, selectors.EVENT_READ)

    def __enter__(self) -> _Pipes:
        return self

    def __exit__(self, *exc) -> None:
        self.sel.close()
        self.run.proc.stdout.close()
        self.run.proc.stderr.close()

    @property
    def stdout(self) -> bytes:
        return bytes(self.bufs[self.out_fd])

    @property
    def stderr(self) -> bytes:
        return bytes(self.bufs[self.err_fd])

    @property
    def output_open(self) -> bool:
        return any(fd in self.bufs for fd in self.sel.get_map())

    def read(self, timeout: float) -> bool:
        """Read what is ready within ``timeout`` seconds; False if nothing was."""
        ready = self.sel.select(timeout=timeout)
        for key, _ in ready:
            chunk = os.read(key.fd, 65536)
            if key.fd == self.run.status_fd:
                self.run.status += chunk
                self.run.status_closed = not chunk
            if not chunk:
                self.sel.unregister(key.fd)
            elif key.fd in self.bufs:
                buf = self.bufs[key.fd]
                room = self.limit - len(buf)
                self.truncated = self.truncated or len(chunk) > room
                buf += chunk[:max(room, 0)]
        return bool(ready)
