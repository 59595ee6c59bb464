"""The C allocator's settings for a training process.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB on 64-bit); once it has
risen, the activations of variable-length batches come from the heap, and what they leave there is not
returned to the system, so the resident set can grow with the steps taken. Whether it rises depends on
the order of large frees, which any change to the code can alter (bench/RESULTS.md: the 18:06 and 19:17
entries on quickstart's peak RSS). Fixing the threshold keeps large tensors in their own mappings, which
are returned on free. The numbers computed do not change: only where the bytes live does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, now held fixed
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own tunable; a user who sets it keeps their value


def fix_mmap_threshold() -> bool:
    """Hold glibc's mmap threshold at 128 KiB for this process. True when it was set; False on a C library
    without `mallopt` (macOS, musl) or when the environment already sets the threshold."""
    if os.environ.get(ENV_OVERRIDE):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
