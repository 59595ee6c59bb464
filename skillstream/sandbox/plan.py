"""How one run is set up: the limits it gets, what it runs, and under which isolation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    cpu_s: int
    max_procs: int
    file_size_mb: int
    open_files: int


@dataclass(frozen=True)
class Plan:
    """How one run is set up: what to run, its limits, and which isolation."""
    argv: list[str]
    limits: Limits
    timeout_s: float
    output_limit: int
    bwrap: str | None  # run in bubblewrap's private view; None: the fallback isolation
    unshare_net: bool  # fallback only: child_setup makes the network namespace
    roots: tuple[tuple[str, str], ...] = ()  # (host dir, path in the view) the interpreter needs
