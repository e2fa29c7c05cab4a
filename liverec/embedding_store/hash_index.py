"""A collisionless key -> row index: open addressing over the batched kernels, plus row allocation.

Layout (see `kernels/__init__.py`): `slots`, an int32 array holding row ids, and `row_keys`, the
key of each row (EMPTY_KEY for a free row). The index owns `row_keys` because probing compares
against it; the table reads it as its row -> key column. So the index proper costs 4 bytes per
slot, 4 / load bytes per key, plus the 8-byte key per row that the table needs anyway. Nothing
else: the free rows are not held in a list but derived from `row_keys` when rows are handed out
(see below), so freed rows cost no index bytes.

The arrays live on the index's device and are only ever touched by the kernel module for that
device (`kernels_for`), so this class is device-agnostic. Two distinct keys never share a row:
a key gets a row only through `insert` / `find_or_insert`, which take rows from the free list,
and a row returns to the free list only when `erase` removed its key.

Row allocation is deliberately outside the probing and deterministic: new keys are inserted in
a fixed order (`insert`: sorted; `find_or_insert`: first occurrence in the batch) and take the
lowest free rows first (then rows above the high-water mark). The free rows are therefore
always exactly the rows below the high-water mark that hold no key,
which is why a checkpoint only has to store (key, row) pairs and the high-water mark, why CPU and
CUDA assign the same rows even though their slot positions may differ, and why the free list
need not be stored: it is `row_keys[:high_water] == EMPTY_KEY`, computed (one scan) only by an
insert that has free rows to reuse. The scan starts at a row below which every row holds a key
(one integer: raised past the rows an insert takes, lowered to the lowest row an erase frees),
and on the CPU stops once it has the rows it needs.

Growth: before an insert, if live keys plus tombstones plus the new keys would pass `max_load`,
the index rehashes to `REFILL_LOAD` of max_load (0.6 at the default 0.75), in the smallest
capacity the device's kernels take (any size on the CPU: growth by about a quarter, so the load
stays in [0.6, 0.75]; a power of two on CUDA), or in place if tombstones were the problem.
Tombstones are counted conservatively (an insert may silently reuse one, the kernel contract
does not report it), so a rehash can come a little early but never late: a probe always ends at
an EMPTY slot. Shrinking: when erases leave live keys below `SHRINK_LOAD` of max_load, the
index rehashes down to the same refill load, so an emptied table gives its slots back.
`row_keys` grows by a 32nd (`grown_metadata_rows`), the policy of all the table's per-row
metadata: those columns are 16 bytes a row, so small steps are cheap to copy (and free on the
CPU, where large columns grow in place: storage.py) and leave at most a 32nd of them unused
(the weights grow by half, `grown_rows`).
"""

from __future__ import annotations

import math

import torch

from liverec.embedding_store.kernels import (
    EMPTY_KEY,
    EMPTY_SLOT,
    SLOT_DTYPE,
    TOMBSTONE_KEY,
    distinct_in_first_seen_order,
    kernels_for,
    reserved_keys_error,
)
from liverec.embedding_store.storage import grown


def grown_rows(current: int, needed: int) -> int:
    """Row capacity after growing from `current` to hold `needed` rows: half more at least, so
    copies stay amortised (each row is copied about twice over the table's growth, against once
    for doubling) while the unused tail stays at most a third of the rows."""
    return max(needed, current + max(current // 2, 1))


def grown_metadata_rows(current: int, needed: int) -> int:
    """Rows of the per-row metadata (key, last update, count, change flags) after growing from
    `current` to hold `needed`: a 32nd more at least (64 rows at least), so an unused tail
    costs at most half a byte per row of their 16, at about 32 copies of each row's metadata
    (512 bytes) over the table's growth: a few ms per step at a million rows."""
    return max(needed, current + max(current // 32, 64))


def check_keys(keys: torch.Tensor, device: torch.device) -> None:
    """Refuse anything but a 1-D int64 tensor of valid feature ids on `device`."""
    check_key_tensor(keys, device)
    if keys.numel() and int(keys.min()) <= TOMBSTONE_KEY:
        raise reserved_keys_error()


def check_key_tensor(keys: torch.Tensor, device: torch.device) -> None:
    """`check_keys` but for the reserved sentinels, for a caller whose compiled pass over the
    keys refuses those itself (a separate `min` is one more pass, and on the CPU one more
    wake-up of the thread pool)."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor of int64, got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    if keys.device != device:
        raise ValueError(f"keys are on {keys.device}, the index is on {device}")
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")


# A rehash for growth leaves the load at this fraction of max_load; erases that leave live keys
# below SHRINK_LOAD of max_load rehash down to it. The gap keeps grow/shrink from thrashing.
REFILL_LOAD = 0.8
SHRINK_LOAD = 0.25


class HashIndex:
    """Batched map from int64 keys to int64 rows, with a deterministic row allocator."""

    def __init__(self, capacity: int = 1024, *, max_load: float = 0.75, rows: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if not 0.0 < max_load < 1.0:
            raise ValueError(f"max_load must be in (0, 1), got {max_load}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" means the current GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_load = max_load
        self._kernels = kernels_for(self.device)
        self._live = 0
        self._tombstones = 0
        self._high_water = 0
        self._free_from = 0  # every row below this holds a key: where a search for free rows starts
        self.row_keys = torch.full((max(rows, 0),), EMPTY_KEY, dtype=torch.int64, device=self.device)
        self._alloc_slots(self._kernels.capacity_at_least(capacity))

    def _alloc_slots(self, capacity: int) -> None:
        self.slots = torch.full((capacity,), EMPTY_SLOT, dtype=SLOT_DTYPE, device=self.device)

    @property
    def capacity(self) -> int:
        """Number of slots (a power of two on CUDA)."""
        return self.slots.numel()

    @property
    def high_water(self) -> int:
        """Rows [0, high_water) have been handed out at some point; dense row tensors need this many."""
        return self._high_water

    @property
    def load(self) -> float:
        """Fraction of slots holding a key or (at most) a tombstone; what growth is decided on."""
        return (self._live + self._tombstones) / self.capacity

    @property
    def nbytes(self) -> int:
        """Memory of the index proper: the slots (row_keys is per-row metadata; no free list is held)."""
        return self.slots.numel() * self.slots.element_size()

    @property
    def row_keys_nbytes(self) -> int:
        return self.row_keys.numel() * 8

    def __len__(self) -> int:
        return self._live

    def reserve_rows(self, rows: int) -> None:
        """Make row_keys hold at least `rows` rows (new rows free)."""
        old = self.row_keys.numel()
        if rows <= old:
            return
        self.row_keys = grown(self.row_keys, grown_metadata_rows(old, rows))
        self.row_keys[old:] = EMPTY_KEY

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Row of each key, -1 where absent."""
        check_keys(keys, self.device)
        return self._kernels.find(self.slots, self.row_keys, keys)

    def insert(self, keys: torch.Tensor) -> torch.Tensor:
        """Give each of `keys` (sorted, unique, absent) a row, in order; returns those rows."""
        check_keys(keys, self.device)
        if keys.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("insert takes sorted unique keys (deduplicate misses with torch.unique)")
        if bool((self._kernels.find(self.slots, self.row_keys, keys) >= 0).any()):
            raise ValueError("insert takes absent keys only; a present key would get a second row")
        return self.insert_missed(keys)

    def insert_missed(self, keys: torch.Tensor) -> torch.Tensor:
        """`insert` without its checks, for a caller that holds the proof: keys this index's
        own find just missed, deduplicated (rows are given in their order), on the right device
        (the table's train step). The checks cost a second probe of every new key, each batch."""
        if keys.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        self._reserve(keys.numel())
        rows = self._allocate(keys.numel())
        self._kernels.insert(self.slots, self.row_keys, keys, rows)
        return rows

    def find_or_insert(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row of each key, inserting the absent ones (deduplicated in order of first occurrence,
        rows in that order: what inserting the batch key by key would give).

        Returns (rows per key, the new keys, their rows). One kernel call (the fused path on
        CUDA) when the whole batch would fit without a rehash; otherwise find first, so the
        table grows for the real number of new keys only.
        """
        check_keys(keys, self.device)
        if self._live + self._tombstones + keys.numel() <= self.max_load * self.capacity:
            self.reserve_rows(self._high_water + keys.numel())
            rows, new_keys, new_rows = self._kernels.find_or_insert(
                self.slots, self.row_keys, keys, self._free_rows(), self._high_water)
            self._took(new_rows.numel())
            return rows, new_keys, new_rows
        rows = self.find(keys)
        missing = rows < 0
        new_keys, inverse = distinct_in_first_seen_order(keys[missing])
        new_rows = self.insert_missed(new_keys)
        rows[missing] = new_rows[inverse]
        return rows, new_keys, new_rows

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        """Remove each key (duplicates allowed); returns its freed row, -1 where it was absent."""
        check_keys(keys, self.device)
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        freed = self._kernels.erase(self.slots, self.row_keys, unique_keys)
        released = freed[freed >= 0]
        if released.numel():
            self._free_from = min(self._free_from, int(released.min()))
        self._live -= released.numel()
        self._tombstones += released.numel()
        if self._live < SHRINK_LOAD * self.max_load * self.capacity:
            fitted = self._fitted(self._live)
            if fitted < self.capacity:
                self.rehash(fitted)
        return freed[inverse]

    def live_rows(self) -> torch.Tensor:
        """Rows holding a key, ascending."""
        return torch.nonzero(self.row_keys[: self._high_water] != EMPTY_KEY).flatten()

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (keys, rows), ordered by row."""
        rows = self.live_rows()
        return self.row_keys[rows], rows

    def rehash(self, capacity: int) -> None:
        """Move every key into a fresh table of `capacity` slots (tombstones dropped; rows kept).

        Keys are re-inserted in the order of their old slots: with scaled homes (any capacity on
        the CPU) that order is nearly sorted by home in the new table too, so the inserts walk
        the new slots almost sequentially instead of at random (several times faster)."""
        capacity = self._kernels.capacity_at_least(capacity)
        if self._live > self.max_load * capacity:
            raise ValueError(f"{self._live} keys do not fit {capacity} slots at max_load {self.max_load}")
        old = self.slots
        self._alloc_slots(capacity)
        if self.device.type == "cpu":  # one compiled pass, same slots as the insert below
            self._kernels.reinsert(old, self.row_keys, self.slots)
        else:
            rows = old[old >= 0].long()
            self._kernels.insert(self.slots, self.row_keys, self.row_keys.index_select(0, rows), rows)
        self._tombstones = 0

    def _reserve(self, incoming: int) -> None:
        """Rehash first if the insert would push load (tombstones included) past max_load."""
        if self._live + self._tombstones + incoming <= self.max_load * self.capacity:
            return
        self.rehash(max(self.capacity, self._fitted(self._live + incoming)))

    def _fitted(self, keys: int) -> int:
        """The capacity that holds `keys` at REFILL_LOAD of max_load."""
        return self._kernels.capacity_at_least(max(math.ceil(keys / (REFILL_LOAD * self.max_load)), 8))

    def _free_rows(self) -> torch.Tensor:
        """Rows below the high-water mark that hold no key, ascending (derived, not stored)."""
        if self._live == self._high_water:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        start = self._free_from
        return torch.nonzero(self.row_keys[start: self._high_water] == EMPTY_KEY).flatten() + start

    def _allocate(self, n: int) -> torch.Tensor:
        """The n lowest free rows, then fresh rows from the high-water mark. (On the CPU the
        search for free rows starts at `_free_from` and stops when it has n: the rows below
        the last one taken then hold keys too.)"""
        if self.device.type == "cpu" and self._live < self._high_water:
            reused = self._kernels.lowest_free_rows(self.row_keys, self._free_from, self._high_water, n)
        else:
            reused = self._free_rows()[:n]
        fresh = torch.arange(self._high_water, self._high_water + n - reused.numel(), device=self.device)
        self._free_from = int(reused[-1]) + 1 if fresh.numel() == 0 else self._high_water + fresh.numel()
        self.reserve_rows(self._high_water + fresh.numel())
        self._took(n)
        return torch.cat([reused, fresh])

    def _took(self, n: int) -> None:
        """Book n new keys that took the n lowest free rows, then fresh rows."""
        reused = min(n, self._high_water - self._live)
        self._high_water += n - reused
        self._live += n

    @classmethod
    def from_items(
        cls, keys: torch.Tensor, rows: torch.Tensor, *, high_water: int, capacity: int, max_load: float,
        device: torch.device | str, row_capacity: int = 0,
    ) -> HashIndex:
        """Rebuild an index holding exactly these (key, row) pairs; free rows are the rest below
        `high_water`, so later inserts allocate exactly as the original index would have."""
        index = cls(capacity, max_load=max_load, rows=max(high_water, row_capacity), device=device)
        check_keys(keys, index.device)
        if keys.numel() != rows.numel():
            raise ValueError(f"{keys.numel()} keys but {rows.numel()} rows")
        if keys.numel() and (int(rows.min()) < 0 or int(rows.max()) >= high_water):
            raise ValueError(f"rows must lie in [0, {high_water}), the high-water mark")
        if torch.unique(keys).numel() != keys.numel() or torch.unique(rows).numel() != rows.numel():
            raise ValueError("keys and rows must each be unique: two keys never share a row")
        if keys.numel() > index.max_load * index.capacity:
            index._alloc_slots(index._fitted(keys.numel()))
        index._kernels.insert(index.slots, index.row_keys, keys, rows)
        index._live = keys.numel()
        index._high_water = high_water
        return index
