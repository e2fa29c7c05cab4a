"""Handing freed heap memory back to the operating system, which glibc's malloc otherwise keeps.

Why: the trainer's resident memory grew by ~16 MB per micro-batch on ml-100k (1.0 GB to 3.4 GB in
one pass over 100,000 events; a ten-seed `liverec evaluate` settled at 6.8 GB), past the dev
overlay's 3 GiB limit, yet the tensors alive stayed at ~6 MB: it was free memory inside the
heap. Once glibc's dynamic mmap threshold has risen past the step's 4-16 MB temporaries they are
carved from the heap, and the holes they leave are not reused for the next step's; `malloc_trim`
returned 2.2 GB of 2.7 at once. Two other cures were measured and not taken: a fixed 4 MB mmap
threshold held the pass at 1.0 GB but made it 35% slower (every such tensor then pays its page
faults, 1-18 us each on the 2-core VM); limiting glibc's arenas changed nothing. A trim every
few seconds cost nothing measurable: the pages it releases are the ones the heap's growth would
have faulted in anyway.

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
    (or since start; 0: never), for a process's main loop; keeps the total released. Bounding
    the growth, not the time between trims, holds the same bound whatever a step allocates and
    however fast steps come, and trims no more often than that needs (each trim's pages are
    faulted in again by the steps after it)."""

    def __init__(self, growth_bytes: int, resident: Callable[[], int] = resident_bytes) -> None:
        if growth_bytes < 0:
            raise ValueError(f"growth_bytes must be >= 0, got {growth_bytes}")
        self.growth_bytes = growth_bytes
        self.resident = resident
        self.released_bytes = 0
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
            self.released_bytes += released
        return released
