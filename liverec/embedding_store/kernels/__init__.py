"""Hash-index kernels: one contract, a compiled CPU implementation and a Triton CUDA one.

Layout (format 2). The index is open addressing with linear probing over `slots`, an int32
array of capacity C holding row ids; the keys live per row, in `row_keys` (int64, one per row,
EMPTY_KEY for a free row), which the table needs anyway (expiry, eviction, deltas and
checkpoints go from rows to keys). For a power-of-two C a slot's home is
`splitmix64(key) & (C - 1)` on every backend, so such a table built on one backend can be
searched on another. The CPU kernels also take any other C (home: the hash's high 32 bits
scaled to [0, C)), which lets the index grow by a quarter instead of doubling and so hold its
load between 0.6 and 0.75 (4 / load bytes of slots per key) rather than between 0.375 and 0.75;
the Triton kernels probe in aligned groups under a mask and keep powers of two. Each backend
says which sizes it takes with `capacity_at_least(n)`. A probe compares `row_keys[slots[s]]`
with the key. So the index costs 4 bytes per slot (4 / load
per row) instead of the 16 of (key, value) slots; the price is one more dependent load per
occupied slot probed, which the kernels overlap across the slots of a probe group.

Slot values: a row id (>= 0), EMPTY_SLOT (-1: never used; ends a probe) or TOMBSTONE_SLOT (-2:
erased; a probe walks past it, an insert may reuse it). Key values EMPTY_KEY and TOMBSTONE_KEY
are reserved and never valid feature ids (EMPTY_KEY marks free rows in `row_keys`).

Every backend module exposes the same batched functions, with no per-key Python loop:

    capacity_at_least(n) -> int                          the smallest slot count >= n it takes

    find(slots, row_keys, queries) -> int64[N]           row per query, -1 where absent
    insert(slots, row_keys, keys, rows) -> None          keys unique and absent: row_keys[rows] = keys
                                                         and each key gets a slot; in place
    erase(slots, row_keys, keys) -> int64[M]             erased row per key (-1 where absent); its
                                                         slot becomes a tombstone, its row_keys EMPTY_KEY
    find_or_insert(slots, row_keys, keys, free_rows, next_row)
        -> (rows per key, new_keys, new_rows)            new_keys: the distinct absent keys in the
                                                         order of their first occurrence in `keys`;
                                                         the r-th gets free_rows[r], then
                                                         next_row + r - len(free_rows)

`row_keys` must have a row for every row id the call may store. Row allocation is decided
outside the probing (misses deduplicated in order of first occurrence, rows from the free list
in that order: what a loop inserting the batch key by key would give), so the key -> row mapping
is identical on every backend even though slot positions under concurrent GPU inserts may
differ. First occurrence rather than key order because the GPU ranks it with a scan over the
batch, where key order would take a sort of the new keys and a host sync before it.
"""

from __future__ import annotations

from types import ModuleType

import torch

EMPTY_KEY: int = -(2**63)
TOMBSTONE_KEY: int = -(2**63) + 1
EMPTY_SLOT: int = -1
TOMBSTONE_SLOT: int = -2
SLOT_DTYPE = torch.int32


def reserved_keys_error() -> ValueError:
    """What a batch holding EMPTY_KEY or TOMBSTONE_KEY is refused with."""
    return ValueError(f"keys {EMPTY_KEY} and {TOMBSTONE_KEY} are reserved sentinels, not feature ids")


def distinct_in_first_seen_order(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct keys in the order of their first occurrence, each key's index in them)."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=keys.device)
    return uniq[order], rank[inverse]


def kernels_for(device: torch.device | str) -> ModuleType:
    """The kernel module for tensors on `device`."""
    kind = torch.device(device).type
    if kind == "cpu":
        from liverec.embedding_store.kernels import cpu

        return cpu
    if kind == "cuda":
        from liverec.embedding_store.kernels import cuda

        return cuda
    raise ValueError(f"no hash-index kernels for device type {kind!r}")
