"""The fallback isolation, where bubblewrap cannot give a private view: the main process is
our child, in a new session, under the child's rlimits, network namespace and uid."""

from __future__ import annotations

import functools
import subprocess

from .child import MIN_PATH, child_setup
from .plan import Plan
from .processes import exited, group_members, kill_group, pids_of


class Plain:
    """The fallback: the main process is our child; what it leaves behind shares its uid
    (when we are root) or else its process group."""

    status_fd = None
    open_pipes_mean_busy = True

    def __init__(self, plan: Plan, work: str, stdin_f, uid: int | None):
        self.uid = uid
        env = {"PATH": MIN_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            plan.argv, cwd=work, env=env, stdin=stdin_f, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
            preexec_fn=functools.partial(child_setup, plan.limits, plan.unshare_net, uid))

    def main_exited(self) -> bool:
        return exited(self.proc)

    def leftovers(self) -> list[int]:
        # the main process is a zombie by now, so neither list counts it
        return pids_of(self.uid) if self.uid is not None else group_members(self.proc.pid)

    def kill(self) -> None:
        kill_group(self.proc.pid)

    def returncode(self, timed_out: bool) -> int:
        return self.proc.wait()
