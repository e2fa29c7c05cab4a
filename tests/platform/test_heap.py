"""Handing freed heap memory back to the OS: a real glibc heap, real resident-set figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from liverec.platform import heap

# Run in a fresh interpreter: a heap with no history, so the blocks are laid out one after the
# other and the last one really is the heap's top (in a long-lived process they may fill old holes).
_FRAGMENT_AND_TRIM = """
import ctypes, ctypes.util, json
from liverec.platform import heap
BLOCK = 64 << 10  # below glibc's mmap threshold: carved from the heap, not mapped on its own
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(BLOCK) for _ in range(4096)]
assert all(blocks)
for address in blocks:
    ctypes.memset(address, 1, BLOCK)
held = heap.resident_bytes()
for address in blocks[:-1]:
    libc.free(address)
after_free = heap.resident_bytes()
released = heap.trim()
print(json.dumps({"held": held, "after_free": after_free, "released": released,
                  "after_trim": heap.resident_bytes(), "freed": 4095 * BLOCK}))
"""


def test_trim_returns_the_free_pages_a_fragmented_heap_keeps() -> None:
    """256 MB of 64 KB heap blocks, written, then all freed but the last, which keeps the heap's
    top in use so glibc cannot shrink it by itself: the freed pages stay resident until `trim`."""
    out = subprocess.run([sys.executable, "-c", _FRAGMENT_AND_TRIM], capture_output=True, text=True, check=True,
                         timeout=120)
    r = json.loads(out.stdout)
    assert r["after_free"] > r["held"] - r["freed"] // 4, "glibc already returned the pages: nothing to test"
    assert r["released"] is not None, "malloc_trim is missing: not glibc"
    assert r["released"] >= r["freed"] // 2
    assert r["after_trim"] <= r["held"] - r["freed"] // 2


def test_trimmer_trims_past_the_growth_bound_measured_from_the_last_trim() -> None:
    """Resident MB as the trimmer reads them: at start, at each call, and after each trim."""
    readings = iter([100, 150, 201, 90, 150, 291, 300])
    trimmer = heap.HeapTrimmer(100 << 20, resident=lambda: next(readings) << 20)
    assert trimmer.maybe_trim() is None  # 150: +50 MB
    assert trimmer.maybe_trim() is not None  # 201: +101 MB, trimmed; now at 90
    assert trimmer.trims == 1
    assert trimmer.maybe_trim() is None  # 150: +60 MB over the level after the trim
    assert trimmer.maybe_trim() is not None  # 291: +201 MB
    assert trimmer.trims == 2


def test_trimmer_never_trims_at_zero_and_refuses_a_negative_bound() -> None:
    trimmer = heap.HeapTrimmer(0, resident=lambda: 1 << 40)
    assert trimmer.maybe_trim() is None and trimmer.trims == 0
    with pytest.raises(ValueError, match="growth_bytes"):
        heap.HeapTrimmer(-1)
