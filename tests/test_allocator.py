"""glibc's mmap threshold held fixed (skillstream/allocator.py): large blocks freed between steps go back to
the system instead of staying in the heap. Each case runs in its own process: the setting is process-wide."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's threshold is glibc's")

# Blocks freed while small blocks allocated after them stay: activations freed after a step while the
# optimizer state and Python objects made during it live on. Prints the resident set it ends with, in MiB.
BLOCKS_FREED_AROUND_PINS = textwrap.dedent("""
    import ctypes, ctypes.util, os, sys
    from skillstream.allocator import fix_mmap_threshold
    print(fix_mmap_threshold())
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(32 << 20))  # a large free: glibc's dynamic threshold rises to 32 MiB
    blocks, pins = [], []
    for i in range(24):
        blocks.append(libc.malloc(8 << 20))
        ctypes.memset(blocks[-1], 1, 8 << 20)  # touched, so resident
        pins.append(libc.malloc(4096))
    for block in blocks:
        libc.free(block)
    rss_pages = int(open("/proc/self/statm").read().split()[1])
    print(rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20)
""")


def run_blocks(**env) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", BLOCKS_FREED_AROUND_PINS], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], float(out[1])


def test_freed_large_blocks_leave_the_resident_set():
    fixed, rss_fixed = run_blocks()
    dynamic, rss_dynamic = run_blocks(MALLOC_MMAP_THRESHOLD_="33554432")  # glibc's own top value, held
    assert (fixed, dynamic) == ("True", "False")  # a threshold the user set is left as it is
    # 24 freed 8 MiB blocks stay resident in the heap under the high threshold, none under the fixed one
    assert rss_dynamic - rss_fixed > 24 * 8 * 0.9
