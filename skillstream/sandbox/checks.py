"""Which isolation works here, each checked once per process: the fallback's network namespace
(a probe that must fail to connect) and bubblewrap's private view (a probe run exactly as code
would be, warned about once when it cannot be had)."""

from __future__ import annotations

import functools
import secrets
import shutil
import socket
import subprocess
import warnings

from .child import MIN_PATH, UID_BASE, UID_SPAN, bash, child_setup, mode
from .plan import Limits, Plan
from .runner import execute


@functools.cache
def isolation_works() -> bool:
    """The fallback's check: does a child in a new network namespace really fail to reach
    a listener of ours? Checked once.

    The probe uses bash's /dev/tcp, so it depends on no interpreter being reachable.
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        uid = UID_BASE + secrets.randbelow(UID_SPAN) if mode() == "root" else None
        try:
            done = subprocess.run(
                [bash(), "--noprofile", "--norc", "-c", _probe(port)], capture_output=True, text=True,
                timeout=10, env={"PATH": MIN_PATH}, cwd="/",
                preexec_fn=functools.partial(child_setup, Limits(256, 5, 16, 1, 64), True, uid))
        except (subprocess.SubprocessError, OSError):  # e.g. unshare refused
            return False
        return done.stdout.strip() == "blocked"


def _probe(port: int) -> str:
    return f"if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo connected; else echo blocked; fi"


def private_view_unavailable() -> str | None:
    """Why runs here get no private filesystem view (bubblewrap missing or not working),
    or None when they do."""
    return bubblewrap_check(shutil.which("bwrap"))


def bwrap_to_use() -> str | None:
    """The bwrap to run the code under, or None: use the fallback (warned about once)."""
    path = shutil.which("bwrap")
    return None if bubblewrap_check(path) else path


@functools.cache
def bubblewrap_check(path: str | None) -> str | None:
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
        probe = [bash(), "--noprofile", "--norc", "-c", _probe(server.getsockname()[1])]
        plan = Plan(probe, Limits(256, 5, 16, 1, 64), timeout_s=10, output_limit=10_000,
                    bwrap=bwrap, unshare_net=False)
        try:
            r = execute(plan, None, None, network_blocked=True)
        except OSError as e:
            return f"{bwrap} could not be started ({e})"
    if r.stdout.strip() == "blocked":
        return None
    if r.stdout.strip() == "connected":
        return f"{bwrap} left the network reachable in its self-check"
    said = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return f"{bwrap} failed its self-check ({said})"
