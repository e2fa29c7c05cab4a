"""Handing freed heap memory back to the operating system, which glibc's malloc otherwise keeps.

Why: under glibc's malloc the trainer's resident memory climbed from 1.0 GB to 3.5 GB in one pass
over ml-100k (`liverec evaluate`'s online pass; a ten-seed run settled at 6.8 GB), past the dev
overlay's 3 GiB limit, while the tensors alive stayed at ~6 MB: it was free memory inside the
heap. A step allocates and frees a few hundred MB of temporaries, the largest 17-34 MB (logits
over the catalog, attention), of sizes that change with every step; once glibc's dynamic mmap
threshold has risen past them they are carved from the heap, whose holes the next step's do not
fit. `malloc_trim` returned 2.2 GB of 2.7 at once.

The cure the container image uses is another allocator: tcmalloc held the same pass at 0.9 GB and
ran it in 76 s instead of 92 (the Dockerfile preloads it). For a process on glibc's malloc,
`HeapTrimmer` trims whenever resident memory has grown by a bound since the last trim: at 1 GB
the pass peaked at 1.8 GB and took 103 s (each trim's pages are faulted in again by the steps
after it, 1-18 us a page on the 2-core VM); at 512 MB, 1.5 GB and 113 s. Also measured and not
taken: a fixed 4 MB mmap threshold (1.0 GB, 124 s); fewer arenas (no change).

`malloc_trim` exists in glibc only; elsewhere (musl, macOS) `trim` does nothing and says so by
returning None. It is safe from any thread: it takes each arena's lock in turn.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


_MALLOC_TRIM = _malloc_trim()


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def trim() -> int | None:
    """Return the heap's free pages to the OS; the resident bytes that released (None: no
    malloc_trim here)."""
    if _MALLOC_TRIM is None:
        return None
    before = resident_bytes()
    _MALLOC_TRIM(0)
    return max(before - resident_bytes(), 0)


class HeapTrimmer:
    """`trim` whenever resident memory has grown by more than `growth_bytes` since the last trim
    (or since start; 0: never), for a process's main loop, after each unit of work; counts its
    trims. Bounding the growth, not the time between trims, holds the same bound whatever a step
    allocates and however fast steps come, and trims no more often than that needs (each trim's
    pages are faulted in again by the steps after it)."""

    def __init__(self, growth_bytes: int, resident: Callable[[], int] = resident_bytes) -> None:
        if growth_bytes < 0:
            raise ValueError(f"growth_bytes must be >= 0, got {growth_bytes}")
        self.growth_bytes = growth_bytes
        self.resident = resident
        self.trims = 0
        self._base = resident()

    def maybe_trim(self) -> int | None:
        """Trim if resident memory is more than `growth_bytes` above its level after the last
        trim; the bytes released, or None when not due (or not possible here)."""
        if self.growth_bytes == 0 or self.resident() - self._base <= self.growth_bytes:
            return None
        released = trim()
        self._base = self.resident()
        if released is not None:
            self.trims += 1
        return released
