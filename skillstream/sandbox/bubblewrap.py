"""The private filesystem view under bubblewrap: the bwrap options that make it, the binds the
interpreter needs in it, and a run in it under a supervisor (the sandbox's pid 1)."""

from __future__ import annotations

import functools
import json
import os
import selectors
import signal
import subprocess
import time

from .child import MIN_PATH, bash, child_setup
from .plan import Plan
from .processes import descendants, kill_group, parent_of
from .result import SandboxUnavailable

_VIEW_WORK = "/sandbox"  # the working directory as the code sees it under bwrap
# What the loader, bash and coreutils read from /etc; the rest of /etc (passwd, hosts,
# configs with secrets) stays out of the view. alternatives/: /usr/bin/awk and co. link there.
_ETC_NEEDED = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime")
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # links into /usr on merged-/usr systems

# The sandbox's pid 1 under bwrap (--as-pid-1): the code's own processes cannot signal it.
# It runs the main program with our pipes closed, then reports its exit status, lets go of
# stdout/stderr and waits on the `go` pipe, so that whatever the program left running can
# be counted from outside before the namespace -- and everything in it -- goes away.
_SUPERVISOR = ('"$@" {status}>&- {go}<&-; s=$?; exec 1>&- 2>&-; echo $s >&{status}; '
               'exec {status}>&-; read -r _ <&{go}')


class Bubblewrapped:
    """The main process runs under a supervisor in bwrap's private view (package docstring)."""

    open_pipes_mean_busy = False

    def __init__(self, plan: Plan, work: str, stdin_f, uid: int | None):
        self.status_fd, status_w = os.pipe()
        go_r, self.go_w = os.pipe()
        info_r, info_w = os.pipe()
        self.status = bytearray()
        self.status_closed = False
        # TMPDIR=/tmp: the private one, gone with the sandbox
        env = {"PATH": MIN_PATH, "HOME": _VIEW_WORK, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        script = _SUPERVISOR.format(status=status_w, go=go_r)
        argv = [plan.bwrap, *_view_args(plan, work), "--info-fd", str(info_w), "--",
                bash(), "--noprofile", "--norc", "-c", script, "sandbox", *plan.argv]
        try:
            self.proc = subprocess.Popen(
                argv, cwd=work, env=env, stdin=stdin_f, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                pass_fds=(status_w, go_r, info_w),
                preexec_fn=functools.partial(child_setup, plan.limits, False, uid))
        except BaseException:
            for fd in (self.status_fd, self.go_w, info_r):
                os.close(fd)
            raise
        finally:  # the child's ends: bwrap has them now
            for fd in (status_w, go_r, info_w):
                os.close(fd)
        self.ns_init = _read_child_pid(info_r, time.monotonic() + plan.timeout_s)

    def main_exited(self) -> bool:
        # the status line, or the supervisor gone without one (bwrap could not start it)
        return self.status_closed or b"\n" in self.status

    def leftovers(self) -> list[int]:
        return descendants(self.ns_init) if self.ns_init else []

    def kill(self) -> None:
        """Kill the namespace's init; the kernel then kills everything else in it."""
        if self.ns_init and self.proc.pid == parent_of(self.ns_init):  # not a recycled pid
            os.kill(self.ns_init, signal.SIGKILL)
        os.close(self.go_w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - bwrap stuck
            kill_group(self.proc.pid)
        os.close(self.status_fd)

    def returncode(self, timed_out: bool) -> int:
        bwrap_rc = self.proc.wait()
        if timed_out:
            return -signal.SIGKILL  # what we ended it with
        line = self.status.split(b"\n")[0]
        if not line.isdigit():
            return bwrap_rc  # bwrap failed to set up (its stderr says why), or the supervisor died
        code = int(line)
        # bash reports death by signal N as 128+N; subprocess's convention is -N
        return -(code - 128) if 128 < code < 128 + signal.NSIG else code


def _read_child_pid(info_r: int, deadline: float) -> int | None:
    """bwrap's --info-fd JSON names the host pid of the sandbox's pid 1. None: it wrote
    nothing (it failed, and says why on stderr) or not by the deadline."""
    data = bytearray()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(info_r, selectors.EVENT_READ)
            while sel.select(timeout=max(deadline - time.monotonic(), 0)):
                chunk = os.read(info_r, 4096)
                data += chunk
                try:  # stop at a whole document: bwrap need not close the fd after it
                    return int(json.loads(data)["child-pid"])
                except (ValueError, KeyError):
                    if not chunk:
                        return None
        return None
    finally:
        os.close(info_r)


def _view_args(plan: Plan, work: str) -> list[str]:
    """bwrap options for the private view: see the package docstring."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in _TOP_LEVEL:
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _ETC_NEEDED:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # tmpfs lives in RAM outside RLIMIT_AS; cap each at a few of the largest files allowed
    tmpfs_bytes = str(4 * plan.limits.file_size_mb * 1024 * 1024)
    for path in ("/tmp", "/var/tmp"):
        args += ["--size", tmpfs_bytes, "--tmpfs", path]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", tmpfs_bytes, "--tmpfs", "/dev/shm"]
    for src, dest in plan.roots:  # after the tmpfs mounts, which would hide a python under /tmp
        args += ["--ro-bind", src, dest]
    args += ["--bind", work, _VIEW_WORK, "--chdir", _VIEW_WORK,
             "--unshare-all", "--unshare-user", "--hostname", "sandbox",
             "--die-with-parent", "--new-session", "--as-pid-1"]
    return args


def _in_base_view(path: str) -> bool:
    """Is ``path`` already in the view through /usr or the top-level /bin, /lib* ones?
    "/" counts as in: binding the whole root would undo the private view."""
    return path == "/" or any(path == top or path.startswith(top + "/")
                              for top in ["/usr"] + ["/" + name for name in _TOP_LEVEL])


@functools.cache
def python_roots(python: str) -> tuple[tuple[str, str], ...]:
    """(host dir, path in the view) pairs the interpreter needs beyond the base view: its
    prefixes (a venv and the installation it was made from), each bound where the
    interpreter looks for it and where symlinks into it lead."""
    query = "import sys; print(sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sep='\\n')"
    try:
        done = subprocess.run([python, "-I", "-c", query], capture_output=True, text=True,
                              timeout=30, env={"PATH": MIN_PATH})
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"cannot run the sandbox's python {python}: {e}") from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise SandboxUnavailable(f"cannot run the sandbox's python {python}: {said}")
    pairs = set()
    for prefix in filter(None, done.stdout.split("\n")):
        real = os.path.realpath(prefix)
        pairs |= {(real, dest) for dest in (prefix, real) if not _in_base_view(dest)}
    return tuple(sorted(pairs, key=lambda pair: (len(pair[1]), pair)))  # outer dirs first
