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

Processes still running ``_GRACE_S`` (:mod:`.pipes`) after the main process exited are killed and counted
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

The package, one job per module: :mod:`.result` (what a run reports), :mod:`.plan` (limits
and isolation of one run), :mod:`.child` (what the child starts as: rlimits, namespace, uid,
PATH), :mod:`.processes` (finding, counting, killing processes), :mod:`.plain` (the fallback),
:mod:`.bubblewrap` (the private view), :mod:`.pipes` (collecting output), :mod:`.runner` (one
run, start to end), :mod:`.checks` (which isolation works here), :mod:`.interpreter` (which
python runs the code); this file is the public API.
"""

from __future__ import annotations

import math
import os

from skillstream.errors import UserError

from .bubblewrap import python_roots
from .checks import bwrap_to_use, isolation_works, private_view_unavailable
from .child import bash
from .interpreter import default_python
from .plan import Limits, Plan
from .result import SandboxResult, SandboxUnavailable
from .runner import execute

__all__ = ["SandboxResult", "SandboxUnavailable", "private_view_unavailable", "run_bash", "run_python"]


def _run(argv: list[str], *, timeout_s: float, memory_mb: int, stdin: str | bytes | None,
         seed_dir: str | None, allow_network: bool, max_procs: int, file_size_mb: int,
         output_limit: int, python: str | None = None) -> SandboxResult:
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0 or file_size_mb <= 0 or output_limit <= 0:
        raise UserError(f"sandbox limits must be positive, got timeout_s={timeout_s} "
                        f"memory_mb={memory_mb} max_procs={max_procs} file_size_mb={file_size_mb} "
                        f"output_limit={output_limit}")
    if seed_dir is not None and not os.path.isdir(seed_dir):
        raise UserError(f"cwd {seed_dir!r} is not a directory")
    bwrap = bwrap_to_use()
    isolate = bwrap is not None or isolation_works()
    if not isolate and not allow_network:
        raise SandboxUnavailable(
            "cannot isolate the network here (a probe from a new network namespace "
            "did not fail to connect); "
            "pass allow_network=True to run without network isolation")
    # CPU limit a second above the wall timeout: a busy loop should meet the wall clock
    # first; the CPU limit is the backstop for time burnt in many threads at once.
    limits = Limits(memory_mb, math.ceil(timeout_s) + 1, max_procs, file_size_mb, 256)
    roots = python_roots(python) if bwrap and python else ()
    plan = Plan(argv, limits, timeout_s, output_limit, bwrap,
                unshare_net=bwrap is None and isolate, roots=roots)
    return execute(plan, stdin, seed_dir, network_blocked=isolate)


def run_python(code: str, *, timeout_s: float = 5, memory_mb: int = 512,
               stdin: str | bytes | None = None, allow_network: bool = False,
               max_procs: int = 32, file_size_mb: int = 16, output_limit: int = 1_000_000,
               python: str | None = None) -> SandboxResult:
    """Run ``code`` with ``python -I`` (isolated mode: no env vars, no user site, no cwd
    on sys.path) in a fresh sandbox; see the module docstring for what is limited.

    ``python`` defaults to this interpreter, or the system python3 where the sandbox uid
    cannot use this one (see :func:`.interpreter.default_python`).
    """
    python = python or default_python()
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
    return _run([bash(), "--noprofile", "--norc", "-c", command], timeout_s=timeout_s,
                memory_mb=memory_mb, stdin=stdin, seed_dir=cwd, allow_network=allow_network,
                max_procs=max_procs, file_size_mb=file_size_mb, output_limit=output_limit)
