"""What the child starts as: its rlimits, network namespace and throw-away uid (set between fork
and exec), its minimal PATH and the bash it runs under."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil

from .plan import Limits

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
UID_BASE = 2_000_000_000  # far above any real account; one random uid per run
UID_SPAN = 100_000_000
MIN_PATH = "/usr/local/bin:/usr/bin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def mode() -> str:
    """'root': netns + uid drop; 'userns': user+net namespace (unprivileged users)."""
    return "root" if os.geteuid() == 0 else "userns"


def child_setup(limits: Limits, unshare_net: bool, uid: int | None) -> None:
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


def bash() -> str:
    return shutil.which("bash", path=MIN_PATH) or "/bin/bash"
