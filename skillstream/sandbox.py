"""Run model-written Python or bash in isolation and report what happened.

Each run gets:

* where bubblewrap (Debian's ``bubblewrap``, the ``bwrap`` command) works, a private
  filesystem view: empty tmpfs /tmp, /dev/shm and /var/tmp of its own, read-only binds of
  only what the interpreter needs (/usr, the /lib* and /bin links, the loader's files in
  /etc, the python's prefixes), its fresh working directory at ``/sandbox``, and nothing of
  the caller's working tree, home or other users' files; plus new pid, ipc, uts, user and
  network namespaces. Without a working bwrap the run falls back to the isolation below
  alone and a warning says so, once per process;
* a fresh temporary working directory (also HOME; TMPDIR too in the fallback), removed
  afterwards;
* a new session, so a wall-clock timeout can kill the whole process group;
* rlimits set in the child before exec: address space (memory), CPU seconds, number of
  processes, file size, open files;
* no network: a new network namespace (bwrap's, or in the fallback ``unshare(CLONE_NEWNET)``
  through libc, as Python 3.11 has no ``os.unshare``) with no route out;
* when we are root, a throw-away unprivileged uid. Root ignores RLIMIT_NPROC, so
  without this a fork bomb is not contained; the uid also keeps the code out of files
  it could otherwise write, and lets us kill every process it left behind with one
  ``kill(-1)`` sent *as that uid* -- processes that called setsid() escape a
  process-group kill, they do not escape this;
* a minimal environment (PATH, HOME, LANG, TMPDIR) and ``python -I``.

Processes still running ``_GRACE_S`` after the main process exited are killed and counted
in ``SandboxResult.leftover_processes``; such a run is not ``ok``.

When no network isolation can be set up, :func:`run_python` / :func:`run_bash` raise
:class:`SandboxUnavailable` unless the caller passes ``allow_network=True``.
``network_blocked`` is True only if isolation was applied *and* a probe (a connect to
a listener of ours, made from inside a sandbox) has been seen to fail.
(``allow_network`` only permits running *without* isolation; where isolation works it is
always used.)

Also worth knowing: in the fallback the code can still *read* world-readable files and
leave files in /tmp, /dev/shm and /var/tmp, and without root the process limit counts all
of the user's processes and leftovers that call setsid() are neither found nor killed;
under bwrap the exit status of a main process killed by signal N is reported as -N, so a
program that itself exits with 128+N reads the same; the child is set up by a
``preexec_fn``, so do not call this from several threads at once.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from skillstream.errors import UserError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_UID_BASE = 2_000_000_000  # far above any real account; one random uid per run
_UID_SPAN = 100_000_000
_GRACE_S = 0.2  # after the main process exits, how long leftovers may still write
_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"
_VIEW_WORK = "/sandbox"  # the working directory as the code sees it under bwrap
# What the loader, bash and coreutils read from /etc; the rest of /etc (passwd, hosts,
# configs with secrets) stays out of the view. alternatives/: /usr/bin/awk and co. link there.
_ETC_NEEDED = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime")
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # links into /usr on merged-/usr systems


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
    # processes the code left running after its main process exited (past _GRACE_S); we
    # killed them. A program that leaves work running did not finish cleanly: not ok.
    leftover_processes: int = 0
    private_fs: bool = False  # ran in bubblewrap's private filesystem view (module docstring)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.leftover_processes == 0


_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _mode() -> str:
    """'root': netns + uid drop; 'userns': user+net namespace (unprivileged users)."""
    return "root" if os.geteuid() == 0 else "userns"


@dataclass(frozen=True)
class _Limits:
    memory_mb: int
    cpu_s: int
    max_procs: int
    file_size_mb: int
    open_files: int


def _child_setup(limits: _Limits, unshare_net: bool, uid: int | None) -> None:
    """Runs in the child between fork and exec; any exception aborts the run."""
    if unshare_net:
        # Root gets a plain new netns; anyone else needs a user namespace to be
        # allowed to create one (the uid inside is then the overflow uid).
        _unshare(CLONE_NEWNET if uid is not None else CLONE_NEWUSER | CLONE_NEWNET)
    mb = 1024 * 1024
    for res, value in (
        (resource.RLIMIT_AS, limits.memory_mb * mb),
        # soft limit sends SIGXCPU, the hard one a second later SIGKILL
        (resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
        (resource.RLIMIT_NPROC, limits.max_procs),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))
    if uid is not None:  # last: dropping root first would forbid unshare
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        # zombies are dead already; they only wait for their parent to reap them
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live (non-zombie) process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if state != "Z":
            table[int(entry)] = (int(ppid), int(pgrp))
    return table


def _descendants(root: int) -> list[int]:
    """Live processes below ``root``. Under bwrap ``root`` is the pid namespace's init, to
    which orphans are re-parented, so this is everything else in the namespace."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in _live_processes().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, (_, pgrp) in _live_processes().items() if pgrp == pgid]


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: kill(-1) sent from a helper running as it."""
    for _ in range(20):  # repeat: a fork bomb may fork while the signal goes out
        if not _pids_of(uid):
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # all of uid's processes except this one
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.01)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _memory_exhausted(stderr: str, returncode: int) -> bool:
    # RLIMIT_AS makes allocations fail rather than killing, so the evidence is in the
    # error the program printed (Python, C++, glibc, bash, coreutils wording).
    markers = ("memoryerror", "cannot allocate memory", "memory exhausted", "out of memory",
               "bad_alloc", "xmalloc", "failed to allocate")
    text = stderr.lower()
    return returncode != 0 and any(m in text for m in markers)


@dataclass(frozen=True)
class _Plan:
    """How one run is set up: what to run, its limits, and which isolation."""
    argv: list[str]
    limits: _Limits
    timeout_s: float
    output_limit: int
    bwrap: str | None  # run in bubblewrap's private view; None: the fallback isolation
    unshare_net: bool  # fallback only: _child_setup makes the network namespace
    roots: tuple[tuple[str, str], ...] = ()  # (host dir, path in the view) the interpreter needs


def _run(argv: list[str], *, timeout_s: float, memory_mb: int, stdin: str | bytes | None,
         seed_dir: str | None, allow_network: bool, max_procs: int, file_size_mb: int,
         output_limit: int, python: str | None = None) -> SandboxResult:
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0 or file_size_mb <= 0 or output_limit <= 0:
        raise UserError(f"sandbox limits must be positive, got timeout_s={timeout_s} "
                        f"memory_mb={memory_mb} max_procs={max_procs} file_size_mb={file_size_mb} "
                        f"output_limit={output_limit}")
    if seed_dir is not None and not os.path.isdir(seed_dir):
        raise UserError(f"cwd {seed_dir!r} is not a directory")
    bwrap = _bubblewrap()
    isolate = bwrap is not None or _isolation_works()
    if not isolate and not allow_network:
        raise SandboxUnavailable(
            "cannot isolate the network here (a probe from a new network namespace "
            "did not fail to connect); "
            "pass allow_network=True to run without network isolation")
    # CPU limit a second above the wall timeout: a busy loop should meet the wall clock
    # first; the CPU limit is the backstop for time burnt in many threads at once.
    limits = _Limits(memory_mb, math.ceil(timeout_s) + 1, max_procs, file_size_mb, 256)
    roots = _python_roots(python) if bwrap and python else ()
    plan = _Plan(argv, limits, timeout_s, output_limit, bwrap,
                 unshare_net=bwrap is None and isolate, roots=roots)
    return _execute(plan, stdin, seed_dir, network_blocked=isolate)


def _execute(plan: _Plan, stdin: str | bytes | None, seed_dir: str | None,
             network_blocked: bool) -> SandboxResult:
    """Run ``plan`` in a fresh working directory (a copy of ``seed_dir`` if given)."""
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if _mode() == "root" else None
    # private: holds the stdin file, out of the sandboxed code's reach; work: its cwd
    private = tempfile.mkdtemp(prefix="skillstream-sbx-")
    work = os.path.join(private, "work")
    try:
        _prepare_work(private, work, seed_dir, uid)
        stdin_path = os.path.join(private, "stdin")
        with open(stdin_path, "wb") as f:  # a file, so a child not reading it can't block us
            f.write(stdin.encode() if isinstance(stdin, str) else (stdin or b""))
        start = time.monotonic()
        with open(stdin_path, "rb") as stdin_f:
            run = _Bubblewrapped(plan, work, stdin_f, uid) if plan.bwrap else _Plain(plan, work, stdin_f, uid)
        try:
            out, err, truncated, timed_out = _collect(run, start + plan.timeout_s, plan.output_limit)
            leftovers = 0 if timed_out else len(run.leftovers())
        finally:
            run.kill()
            if uid is not None:
                _kill_uid(uid)
        rc = run.returncode(timed_out)
        duration = time.monotonic() - start
    finally:
        shutil.rmtree(private, ignore_errors=True)
    stderr = err.decode("utf-8", "replace")
    timed_out = timed_out or rc == -signal.SIGXCPU
    return SandboxResult(
        returncode=rc, stdout=out.decode("utf-8", "replace"), stderr=stderr, timed_out=timed_out,
        killed_for_memory=not timed_out and _memory_exhausted(stderr, rc),
        network_blocked=network_blocked, duration_s=duration, truncated=truncated,
        leftover_processes=leftovers, private_fs=plan.bwrap is not None)


def _prepare_work(private: str, work: str, seed_dir: str | None, uid: int | None) -> None:
    if seed_dir is not None:
        shutil.copytree(seed_dir, work, symlinks=True)
    else:
        os.mkdir(work)
    if uid is not None:
        os.chmod(private, 0o711)  # traversable, not listable
        for root, dirs, files in os.walk(work):
            for name in [root] + [os.path.join(root, x) for x in dirs + files]:
                os.lchown(name, uid, uid)


class _Plain:
    """The fallback: the main process is our child; what it leaves behind shares its uid
    (when we are root) or else its process group."""

    status_fd = None
    open_pipes_mean_busy = True

    def __init__(self, plan: _Plan, work: str, stdin_f, uid: int | None):
        self.uid = uid
        env = {"PATH": _MIN_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            plan.argv, cwd=work, env=env, stdin=stdin_f, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
            preexec_fn=functools.partial(_child_setup, plan.limits, plan.unshare_net, uid))

    def main_exited(self) -> bool:
        return _exited(self.proc)

    def leftovers(self) -> list[int]:
        # the main process is a zombie by now, so neither list counts it
        return _pids_of(self.uid) if self.uid is not None else _group_members(self.proc.pid)

    def kill(self) -> None:
        _kill_group(self.proc.pid)

    def returncode(self, timed_out: bool) -> int:
        return self.proc.wait()


# The sandbox's pid 1 under bwrap (--as-pid-1): the code's own processes cannot signal it.
# It runs the main program with our pipes closed, then reports its exit status, lets go of
# stdout/stderr and waits on the `go` pipe, so that whatever the program left running can
# be counted from outside before the namespace -- and everything in it -- goes away.
_SUPERVISOR = ('"$@" {status}>&- {go}<&-; s=$?; exec 1>&- 2>&-; echo $s >&{status}; '
               'exec {status}>&-; read -r _ <&{go}')


class _Bubblewrapped:
    """The main process runs under a supervisor in bwrap's private view (module docstring)."""

    open_pipes_mean_busy = False

    def __init__(self, plan: _Plan, work: str, stdin_f, uid: int | None):
        self.status_fd, status_w = os.pipe()
        go_r, self.go_w = os.pipe()
        info_r, info_w = os.pipe()
        self.status = bytearray()
        self.status_closed = False
        # TMPDIR=/tmp: the private one, gone with the sandbox
        env = {"PATH": _MIN_PATH, "HOME": _VIEW_WORK, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        script = _SUPERVISOR.format(status=status_w, go=go_r)
        argv = [plan.bwrap, *_view_args(plan, work), "--info-fd", str(info_w), "--",
                _bash(), "--noprofile", "--norc", "-c", script, "sandbox", *plan.argv]
        try:
            self.proc = subprocess.Popen(
                argv, cwd=work, env=env, stdin=stdin_f, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                pass_fds=(status_w, go_r, info_w),
                preexec_fn=functools.partial(_child_setup, plan.limits, False, uid))
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
        return _descendants(self.ns_init) if self.ns_init else []

    def kill(self) -> None:
        """Kill the namespace's init; the kernel then kills everything else in it."""
        if self.ns_init and self.proc.pid == _parent_of(self.ns_init):  # not a recycled pid
            os.kill(self.ns_init, signal.SIGKILL)
        os.close(self.go_w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - bwrap stuck
            _kill_group(self.proc.pid)
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


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _view_args(plan: _Plan, work: str) -> list[str]:
    """bwrap options for the private view: see the module docstring."""
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


def _exited(proc: subprocess.Popen) -> bool:
    """Has the main process ended? Does not reap it: while it stays a zombie its pid (the
    process group id) cannot be reused, so the killpg that follows hits only our group."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(run: _Plain | _Bubblewrapped, deadline: float, limit: int):
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


def _busy(run: _Plain | _Bubblewrapped, pipes: _Pipes) -> bool:
    """After the main process exited: is anything it started still running?"""
    # Open pipes say so in the fallback (a leftover holds them); under bwrap they say
    # nothing, as bwrap itself holds copies until the end.
    return (run.open_pipes_mean_busy and pipes.output_open) or bool(run.leftovers())


class _Pipes:
    """The run's stdout and stderr, and under bwrap its status pipe, read as data comes."""

    def __init__(self, run: _Plain | _Bubblewrapped, limit: int):
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


@functools.cache
def _isolation_works() -> bool:
    """The fallback's check: does a child in a new network namespace really fail to reach
    a listener of ours? Checked once.

    The probe uses bash's /dev/tcp, so it depends on no interpreter being reachable.
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if _mode() == "root" else None
        try:
            done = subprocess.run(
                [_bash(), "--noprofile", "--norc", "-c", _probe(port)], capture_output=True, text=True,
                timeout=10, env={"PATH": _MIN_PATH}, cwd="/",
                preexec_fn=functools.partial(_child_setup, _Limits(256, 5, 16, 1, 64), True, uid))
        except (subprocess.SubprocessError, OSError):  # e.g. unshare refused
            return False
        return done.stdout.strip() == "blocked"


def _probe(port: int) -> str:
    return f"if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo connected; else echo blocked; fi"


def private_view_unavailable() -> str | None:
    """Why runs here get no private filesystem view (bubblewrap missing or not working),
    or None when they do."""
    return _bubblewrap_check(shutil.which("bwrap"))


def _bubblewrap() -> str | None:
    """The bwrap to run the code under, or None: use the fallback (warned about once)."""
    path = shutil.which("bwrap")
    return None if _bubblewrap_check(path) else path


@functools.cache
def _bubblewrap_check(path: str | None) -> str | None:
    """Why the bwrap at ``path`` cannot give the private view here, or None. Checked once
    per path, so the warning about the fallback comes once, not on every run."""
    why = "bubblewrap is not installed (no bwrap on PATH)" if path is None else _bubblewrap_probe(path)
    if why:
        warnings.warn(
            f"skillstream.sandbox: {why}, so model-written code runs without a private "
            "filesystem view: it can read world-readable files and leave files in /tmp, "
            "/dev/shm and /var/tmp. Install bubblewrap (apt-get install bubblewrap) to fix this.",
            RuntimeWarning, stacklevel=2)
    return why


def _bubblewrap_probe(bwrap: str) -> str | None:
    """Run a probe exactly as code would be run; say what went wrong, or None."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        probe = [_bash(), "--noprofile", "--norc", "-c", _probe(server.getsockname()[1])]
        plan = _Plan(probe, _Limits(256, 5, 16, 1, 64), timeout_s=10, output_limit=10_000,
                     bwrap=bwrap, unshare_net=False)
        try:
            r = _execute(plan, None, None, network_blocked=True)
        except OSError as e:
            return f"{bwrap} could not be started ({e})"
    if r.stdout.strip() == "blocked":
        return None
    if r.stdout.strip() == "connected":
        return f"{bwrap} left the network reachable in its self-check"
    said = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return f"{bwrap} failed its self-check ({said})"


def _bash() -> str:
    return shutil.which("bash", path=_MIN_PATH) or "/bin/bash"


def _world_usable(path: str) -> bool:
    """Can an arbitrary unprivileged uid reach (and read/execute) ``path``?"""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o005:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


@functools.cache
def _default_python() -> str:
    """This interpreter if the sandbox uid can use it, else a system python3.

    When we run as root the code runs as a throw-away uid, which cannot use an
    interpreter installed under a private directory such as /root (pyenv); the
    sandboxed code then gets the system python3 (stdlib only).
    """
    if _mode() != "root" or (_world_usable(sys.executable) and _world_usable(sys.base_prefix)):
        return sys.executable
    for name in ("python3", "python"):
        found = shutil.which(name, path=_MIN_PATH)
        if found and _world_usable(found):
            return found
    raise SandboxUnavailable(
        f"no python the sandbox uid can run: {sys.executable} lies in a directory closed to "
        "other users, and no world-usable python3 is on " + _MIN_PATH)


def _in_base_view(path: str) -> bool:
    """Is ``path`` already in the view through /usr or the top-level /bin, /lib* ones?
    "/" counts as in: binding the whole root would undo the private view."""
    return path == "/" or any(path == top or path.startswith(top + "/")
                              for top in ["/usr"] + ["/" + name for name in _TOP_LEVEL])


@functools.cache
def _python_roots(python: str) -> tuple[tuple[str, str], ...]:
    """(host dir, path in the view) pairs the interpreter needs beyond the base view: its
    prefixes (a venv and the installation it was made from), each bound where the
    interpreter looks for it and where symlinks into it lead."""
    query = "import sys; print(sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sep='\\n')"
    try:
        done = subprocess.run([python, "-I", "-c", query], capture_output=True, text=True,
                              timeout=30, env={"PATH": _MIN_PATH})
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


def run_python(code: str, *, timeout_s: float = 5, memory_mb: int = 512,
               stdin: str | bytes | None = None, allow_network: bool = False,
               max_procs: int = 32, file_size_mb: int = 16, output_limit: int = 1_000_000,
               python: str | None = None) -> SandboxResult:
    """Run ``code`` with ``python -I`` (isolated mode: no env vars, no user site, no cwd
    on sys.path) in a fresh sandbox; see the module docstring for what is limited.

    ``python`` defaults to this interpreter, or the system python3 where the sandbox uid
    cannot use this one (see :func:`_default_python`).
    """
    python = python or _default_python()
    return _run([python, "-I", "-c", code], timeout_s=timeout_s, memory_mb=memory_mb,
                stdin=stdin, seed_dir=None, allow_network=allow_network, max_procs=max_procs,
                file_size_mb=file_size_mb, output_limit=output_limit, python=python)


def run_bash(command: str, *, cwd: str | None = None, timeout_s: float = 5,
             memory_mb: int = 512, stdin: str | bytes | None = None,
             allow_network: bool = False, max_procs: int = 32, file_size_mb: int = 16,
             output_limit: int = 1_000_000) -> SandboxResult:
    """Run ``command`` with ``bash --noprofile --norc -c`` in a fresh sandbox.

    ``cwd``, if given, is a directory whose contents are *copied* into the fresh working
    directory first (fixture files for the command); the original is never modified.
    """
    return _run([_bash(), "--noprofile", "--norc", "-c", command], timeout_s=timeout_s,
                memory_mb=memory_mb, stdin=stdin, seed_dir=cwd, allow_network=allow_network,
                max_procs=max_procs, file_size_mb=file_size_mb, output_limit=output_limit)
