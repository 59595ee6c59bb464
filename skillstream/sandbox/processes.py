"""Finding, counting and killing the processes a run started: by uid, by process group, by
descent from a pid; whether the main process has exited."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def pids_of(uid: int) -> list[int]:
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


def descendants(root: int) -> list[int]:
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


def group_members(pgid: int) -> list[int]:
    return [pid for pid, (_, pgrp) in _live_processes().items() if pgrp == pgid]


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def exited(proc: subprocess.Popen) -> bool:
    """Has the main process ended? Does not reap it: while it stays a zombie its pid (the
    process group id) cannot be reused, so the killpg that follows hits only our group."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: kill(-1) sent from a helper running as it."""
    for _ in range(20):  # repeat: a fork bomb may fork while the signal goes out
        if not pids_of(uid):
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


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
