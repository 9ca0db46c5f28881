"""The daemon's heap: glibc malloc set up for a process that runs for months and handles one case's tens of
MB of short-lived buffers (mosaic, heatmap, output pyramids) at a time.

glibc's defaults suit short programs, not this one. It raises its mmap threshold after the first large free
(up to 32 MB), so later case buffers come from the heap, where a few live small blocks can pin freed pages.
It also gives each thread that allocates its own arena, up to 8 per core. Either way the RSS steps up by a
case's working set at some random case and stays there, which is what the soak (bench/soak.py) measured.
So the daemon fixes the mmap threshold (buffers of 1 MiB or more are mapped and unmapped, and go back to the
OS when freed), caps the arenas at 2, and trims the heap after each case. Elsewhere than glibc these are no-ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large are mmapped, and unmapped when freed
TRIM_THRESHOLD = 4 << 20  # bytes of free heap top kept before glibc returns it to the OS
ARENA_MAX = 2


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds and cap its arenas (see the module docstring). True when done;
    call it once at start, before the pipeline's threads allocate."""
    libc = _libc()
    if libc is None:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENA_MAX))
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not ok:
        log.warning("glibc refused a mallopt setting; the heap keeps its defaults")
    return ok


def release_free_memory() -> None:
    """Hand the heap pages a finished case freed back to the OS (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist only in glibc)
    except (OSError, AttributeError):
        return None
    return libc
