"""What a sandbox run reports, and the error for a place where no run can be isolated."""

from __future__ import annotations

from dataclasses import dataclass


class SandboxUnavailable(RuntimeError):
    """No way to cut the network off here, and the caller did not allow network."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal (as in subprocess)
    stdout: str
    stderr: str
    timed_out: bool  # hit the wall-clock timeout (or the CPU-time limit)
    killed_for_memory: bool  # the code hit the memory limit (as far as can be seen)
    network_blocked: bool
    duration_s: float
    truncated: bool = False  # stdout or stderr was cut at output_limit bytes
    # processes the code left running after its main process exited (past pipes._GRACE_S); we
    # killed them. A program that leaves work running did not finish cleanly: not ok.
    leftover_processes: int = 0
    private_fs: bool = False  # ran in bubblewrap's private filesystem view (package docstring)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.leftover_processes == 0
