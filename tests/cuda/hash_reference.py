"""A plain sequential implementation of the hash-index contract, for checking the kernels.

Slow (one Python step per probe) and only meant for small tables; it is the contract written
out literally, with nothing shared with either backend.
"""

from __future__ import annotations

import numpy as np

EMPTY_KEY = -(2**63)
TOMBSTONE_KEY = -(2**63) + 1
_M64 = (1 << 64) - 1


def splitmix64(key: int) -> int:
    """splitmix64 of a signed 64-bit key, as an unsigned 64-bit int."""
    z = (key + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def home_slots(keys: np.ndarray, capacity: int) -> np.ndarray:
    """Vectorised home slot of each key (to build adversarial key sets quickly)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(capacity - 1)).astype(np.int64)


class RefIndex:
    """Open addressing, linear probing, power-of-two capacity; first free slot on insert."""

    def __init__(self, capacity: int) -> None:
        self.keys = np.full(capacity, EMPTY_KEY, dtype=np.int64)
        self.vals = np.full(capacity, -1, dtype=np.int64)
        self.mask = capacity - 1

    def _slot(self, key: int) -> int:
        pos = splitmix64(key) & self.mask
        for _ in range(self.mask + 1):
            k = int(self.keys[pos])
            if k == key or k == EMPTY_KEY:
                return pos
            pos = (pos + 1) & self.mask
        return -1

    def find(self, queries: np.ndarray) -> np.ndarray:
        out = np.full(len(queries), -1, dtype=np.int64)
        for i, q in enumerate(int(x) for x in queries):
            if q in (EMPTY_KEY, TOMBSTONE_KEY):
                continue
            pos = self._slot(q)
            if pos >= 0 and self.keys[pos] == q:
                out[i] = self.vals[pos]
        return out

    def insert(self, keys: np.ndarray, vals: np.ndarray) -> None:
        for key, val in zip((int(x) for x in keys), (int(x) for x in vals)):
            pos = splitmix64(key) & self.mask
            while int(self.keys[pos]) not in (EMPTY_KEY, TOMBSTONE_KEY):
                assert int(self.keys[pos]) != key, "insert of a present key"
                pos = (pos + 1) & self.mask
            self.keys[pos] = key
            self.vals[pos] = val

    def erase(self, keys: np.ndarray) -> np.ndarray:
        out = np.full(len(keys), -1, dtype=np.int64)
        for i, q in enumerate(int(x) for x in keys):
            if q in (EMPTY_KEY, TOMBSTONE_KEY):
                continue
            pos = self._slot(q)
            if pos >= 0 and self.keys[pos] == q:
                out[i] = self.vals[pos]
                self.keys[pos] = TOMBSTONE_KEY
        return out

    def find_or_insert(self, keys: np.ndarray, free_rows: np.ndarray, next_row: int) -> tuple[np.ndarray, np.ndarray]:
        """Key by key: a present key reads its row; an absent one takes the next free row, then
        next_row, next_row + 1, ... Returns (rows, new keys in the order they were inserted)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        new: list[int] = []
        for i, key in enumerate(int(x) for x in keys):
            if key in (EMPTY_KEY, TOMBSTONE_KEY):
                continue
            row = int(self.find(np.array([key], dtype=np.int64))[0])
            if row < 0:
                r = len(new)
                row = int(free_rows[r]) if r < len(free_rows) else next_row + r - len(free_rows)
                self.insert(np.array([key], dtype=np.int64), np.array([row], dtype=np.int64))
                new.append(key)
            out[i] = row
        return out, np.array(new, dtype=np.int64)

    def items(self) -> dict[int, int]:
        live = (self.keys != EMPTY_KEY) & (self.keys != TOMBSTONE_KEY)
        return dict(zip(self.keys[live].tolist(), self.vals[live].tolist()))
