"""Which python runs the code: this interpreter, unless the sandbox's throw-away uid cannot
use it (an installation under a private directory such as /root)."""

from __future__ import annotations

import functools
import os
import shutil
import sys

from .child import MIN_PATH, mode
from .result import SandboxUnavailable


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
def default_python() -> str:
    """This interpreter if the sandbox uid can use it, else a system python3.

    When we run as root the code runs as a throw-away uid, which cannot use an
    interpreter installed under a private directory such as /root (pyenv); the
    sandboxed code then gets the system python3 (stdlib only).
    """
    if mode() != "root" or (_world_usable(sys.executable) and _world_usable(sys.base_prefix)):
        return sys.executable
    for name in ("python3", "python"):
        found = shutil.which(name, path=MIN_PATH)
        if found and _world_usable(found):
            return found
    raise SandboxUnavailable(
        f"no python the sandbox uid can run: {sys.executable} lies in a directory closed to "
        "other users, and no world-usable python3 is on " + MIN_PATH)
