"""One process at a time in a run directory: `train` (and `--resume`), `eval` and `export` hold an
exclusive flock on RUN_DIR/.lock for as long as they read or write the run.

flock is the kernel's: it goes with the process that holds it, so the lock of a run killed with
SIGKILL is free again at once, and the PID written in the file says who held it (for the error a
second process gets, and the note when a lock left by a dead process is taken over). A clean release
removes the file, so a finished run directory holds no lock file.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

LOCK_FILE = ".lock"
# Set by `skillstream train --processes N` for the processes it launches: the launcher holds the lock
# on this run directory (an absolute path) for them, and they must not try to take it a second time.
HELD_BY_LAUNCHER = "SKILLSTREAM_RUN_LOCK_HELD"

_held: set[str] = set()  # run directories this process holds (eval inside eval's CLI takes it again)


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold RUN_DIR's lock inside the block. Another live holder: UserError naming its PID. Folders
    made here for the lock are removed again if nothing else was written in them (bad input leaves
    no run directory behind)."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held or os.environ.get(HELD_BY_LAUNCHER) == key:
        yield
        return
    made = [p for p in [run_dir, *run_dir.parents] if not p.exists()]  # deepest first
    fd = _acquire(run_dir)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        # unlinked before it is unlocked: a process that opened the file meanwhile and then gets the
        # lock finds the name gone (or another file under it) and starts over, see _acquire
        try:
            os.unlink(run_dir / LOCK_FILE)
        except FileNotFoundError:
            pass
        os.close(fd)
        for p in made:
            try:
                p.rmdir()
            except OSError:  # something was written there (the run), or another run made it its own
                break


def _acquire(run_dir: Path) -> int:
    path = run_dir / LOCK_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a holder releasing a folder it had made removed it just now
            continue
        except OSError as e:
            raise UserError(f"{path}: cannot create the run directory's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            who = f"PID {pid}" if pid else "another process"
            raise UserError(f"{run_dir} is in use by {who} (a skillstream train, eval or export holds {path}): "
                            f"wait for it to end, or stop it") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had unlinked on release: that locks nothing
    stale = _read_pid(fd)
    if stale:  # the file outlived its holder, so the holder died without releasing (SIGKILL, power off)
        print(f"note: taken over stale lock of PID {stale} on {run_dir} (that process is gone)",
              file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> int | None:
    """The PID in the lock file. A holder writes it just after it gets the lock, over what a dead
    holder left there: wait a moment for a live one rather than name the dead."""
    pid = None
    for _ in range(20):
        pid = _read_pid(fd)
        if pid and _alive(pid):
            return pid
        time.sleep(0.05)
    return pid


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
