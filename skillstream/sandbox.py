"""Run model-written Python or bash in isolation and report what happened.

Each run gets:

* a fresh temporary working directory (also HOME and TMPDIR), removed afterwards;
* a new session, so a wall-clock timeout can kill the whole process group;
* rlimits set in the child before exec: address space (memory), CPU seconds, number of
  processes, file size, open files;
* no network: a new network namespace (``unshare(CLONE_NEWNET)`` through libc, as
  Python 3.11 has no ``os.unshare``) in which only a downed loopback exists;
* when we are root, a throw-away unprivileged uid. Root ignores RLIMIT_NPROC, so
  without this a fork bomb is not contained; the uid also keeps the code out of files
  it could otherwise write, and lets us kill every process it left behind with one
  ``kill(-1)`` sent *as that uid* -- processes that called setsid() escape a
  process-group kill, they do not escape this;
* a minimal environment (PATH, HOME, LANG, TMPDIR) and ``python -I``.

When no network isolation can be set up, :func:`run_python` / :func:`run_bash` raise
:class:`SandboxUnavailable` unless the caller passes ``allow_network=True``.
``network_blocked`` is True only if isolation was applied *and* a probe (a connect to
a listener of ours, made from inside a sandbox) has been seen to fail.
(``allow_network`` only permits running *without* isolation; where isolation works it is
always used.)

Also worth knowing: processes still running when the main process exits are killed
``_GRACE_S`` later; the code can still *read* world-readable files; without root, the
process limit counts all of the user's processes and leftovers that call setsid() are
not cleaned up; the child is set up by a ``preexec_fn``, so do not call this from
several threads at once.
"""

from __future__ import annotations

import ctypes
import functools
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
from dataclasses import dataclass

from skillstream.errors import UserError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_UID_BASE = 2_000_000_000  # far above any real account; one random uid per run
_UID_SPAN = 100_000_000
_GRACE_S = 0.2  # after the main process exits, how long leftovers may still write
_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"


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

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


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


def _child_setup(limits: _Limits, isolate: bool, uid: int | None) -> None:
    """Runs in the child between fork and exec; any exception aborts the run."""
    if isolate:
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


def _run(argv: list[str], *, timeout_s: float, memory_mb: int, stdin: str | bytes | None,
         seed_dir: str | None, allow_network: bool, max_procs: int, file_size_mb: int,
         output_limit: int) -> SandboxResult:
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0 or file_size_mb <= 0 or output_limit <= 0:
        raise UserError(f"sandbox limits must be positive, got timeout_s={timeout_s} "
                        f"memory_mb={memory_mb} max_procs={max_procs} file_size_mb={file_size_mb} "
                        f"output_limit={output_limit}")
    isolate = _isolation_works()
    if not isolate and not allow_network:
        raise SandboxUnavailable(
            "cannot isolate the network here (a probe from a new network namespace "
            "did not fail to connect); "
            "pass allow_network=True to run without network isolation")
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if _mode() == "root" else None
    # CPU limit a second above the wall timeout: a busy loop should meet the wall clock
    # first; the CPU limit is the backstop for time burnt in many threads at once.
    limits = _Limits(memory_mb, math.ceil(timeout_s) + 1, max_procs, file_size_mb, 256)

    # private: holds the stdin file, out of the sandboxed code's reach; work: its cwd
    private = tempfile.mkdtemp(prefix="skillstream-sbx-")
    work = os.path.join(private, "work")
    try:
        if seed_dir is not None:
            if not os.path.isdir(seed_dir):
                raise UserError(f"cwd {seed_dir!r} is not a directory")
            shutil.copytree(seed_dir, work, symlinks=True)
        else:
            os.mkdir(work)
        if uid is not None:
            os.chmod(private, 0o711)  # traversable, not listable
            for root, dirs, files in os.walk(work):
                for name in [root] + [os.path.join(root, x) for x in dirs + files]:
                    os.lchown(name, uid, uid)
        stdin_path = os.path.join(private, "stdin")
        with open(stdin_path, "wb") as f:  # a file, so a child not reading it can't block us
            f.write(stdin.encode() if isinstance(stdin, str) else (stdin or b""))
        env = {"PATH": _MIN_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        with open(stdin_path, "rb") as stdin_f:
            proc = subprocess.Popen(
                argv, cwd=work, env=env, stdin=stdin_f, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                preexec_fn=functools.partial(_child_setup, limits, isolate, uid))
        try:
            out, err, truncated, timed_out = _collect(proc, start + timeout_s, output_limit)
        finally:
            _kill_group(proc.pid)
            if uid is not None:
                _kill_uid(uid)
            proc.wait()
        duration = time.monotonic() - start
    finally:
        shutil.rmtree(private, ignore_errors=True)
    stderr, rc = err.decode("utf-8", "replace"), proc.returncode
    timed_out = timed_out or rc == -signal.SIGXCPU
    return SandboxResult(
        returncode=rc, stdout=out.decode("utf-8", "replace"), stderr=stderr, timed_out=timed_out,
        killed_for_memory=not timed_out and _memory_exhausted(stderr, rc),
        network_blocked=isolate, duration_s=duration, truncated=truncated)


def _exited(proc: subprocess.Popen) -> bool:
    """Has the main process ended? Does not reap it: while it stays a zombie its pid (the
    process group id) cannot be reused, so the killpg that follows hits only our group."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen, deadline: float, limit: int):
    """Read stdout/stderr until both close or the deadline; keep at most ``limit`` bytes.

    Output beyond the limit is still read (and dropped) so the child never blocks on a
    full pipe. Returns (stdout, stderr, truncated, timed_out).
    """
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    truncated = False
    exited_at = None
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                break
            if _exited(proc):
                # Pipes still open after the main process ended: background leftovers.
                exited_at = exited_at or now
                if now - exited_at > _GRACE_S:
                    break
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = limit - len(buf)
                if len(chunk) > room:
                    truncated = True
                buf += chunk[:max(room, 0)]
    while not _exited(proc) and time.monotonic() < deadline:  # closed its pipes, still runs
        time.sleep(0.01)
    timed_out = not _exited(proc)
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), truncated, timed_out


@functools.cache
def _isolation_works() -> bool:
    """Does a sandboxed child really fail to reach a listener of ours? Checked once.

    The probe uses bash's /dev/tcp, so it depends on no interpreter being reachable.
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        probe = f"if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo connected; else echo blocked; fi"
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if _mode() == "root" else None
        try:
            done = subprocess.run(
                [_bash(), "--noprofile", "--norc", "-c", probe], capture_output=True, text=True,
                timeout=10, env={"PATH": _MIN_PATH}, cwd="/",
                preexec_fn=functools.partial(_child_setup, _Limits(256, 5, 16, 1, 64), True, uid))
        except (subprocess.SubprocessError, OSError):  # e.g. unshare refused
            return False
        return done.stdout.strip() == "blocked"


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


def run_python(code: str, *, timeout_s: float = 5, memory_mb: int = 512,
               stdin: str | bytes | None = None, allow_network: bool = False,
               max_procs: int = 32, file_size_mb: int = 16, output_limit: int = 1_000_000,
               python: str | None = None) -> SandboxResult:
    """Run ``code`` with ``python -I`` (isolated mode: no env vars, no user site, no cwd
    on sys.path) in a fresh sandbox; see the module docstring for what is limited.

    ``python`` defaults to this interpreter, or the system python3 where the sandbox uid
    cannot use this one (see :func:`_default_python`).
    """
    return _run([python or _default_python(), "-I", "-c", code], timeout_s=timeout_s, memory_mb=memory_mb,
                stdin=stdin, seed_dir=None, allow_network=allow_network, max_procs=max_procs,
                file_size_mb=file_size_mb, output_limit=output_limit)


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
