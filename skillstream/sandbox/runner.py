"""One run of a plan, start to end: a fresh working directory, the stdin file, the run under
bubblewrap or the fallback, its output collected, everything it left killed, the result."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time

from .bubblewrap import Bubblewrapped
from .child import UID_BASE, UID_SPAN, mode
from .pipes import collect
from .plain import Plain
from .plan import Plan
from .processes import kill_uid
from .result import SandboxResult


def execute(plan: Plan, stdin: str | bytes | None, seed_dir: str | None,
            network_blocked: bool) -> SandboxResult:
    """Run ``plan`` in a fresh working directory (a copy of ``seed_dir`` if given)."""
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if mode() == "root" else None
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
            run = Bubblewrapped(plan, work, stdin_f, uid) if plan.bwrap else Plain(plan, work, stdin_f, uid)
        try:
            out, err, truncated, timed_out = collect(run, start + plan.timeout_s, plan.output_limit)
            leftovers = 0 if timed_out else len(run.leftovers())
        finally:
            run.kill()
            if uid is not None:
                kill_uid(uid)
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


def _memory_exhausted(stderr: str, returncode: int) -> bool:
    # RLIMIT_AS makes allocations fail rather than killing, so the evidence is in the
    # error the program printed (Python, C++, glibc, bash, coreutils wording).
    markers = ("memoryerror", "cannot allocate memory", "memory exhausted", "out of memory",
               "bad_alloc", "xmalloc", "failed to allocate")
    text = stderr.lower()
    return returncode != 0 and any(m in text for m in markers)
