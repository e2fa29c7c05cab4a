"""Hash-index kernels: one contract, a compiled CPU implementation and a Triton CUDA one.

The index is open addressing with linear probing over two parallel int64 arrays of a
power-of-two capacity C: `slot_keys` and `slot_vals`. A slot's home is
`splitmix64(key) & (C - 1)`. Two key values are reserved as sentinels and are never valid
feature ids: EMPTY_KEY (never used; ends a probe) and TOMBSTONE_KEY (erased; a probe walks past
it, an insert may reuse it).

Every backend module exposes the same three batched functions, with no per-key Python loop:

    find(slot_keys, slot_vals, queries) -> int64[N]        value per query, -1 where absent
    insert(slot_keys, slot_vals, keys, vals) -> None       keys unique and absent; in place
    erase(slot_keys, slot_vals, keys) -> int64[M]          erased value per key, -1 where absent

Row allocation happens outside the kernels (misses are deduplicated in sorted order and given
rows from the free list in that order), so the key -> row mapping is identical on every backend
even though slot positions under concurrent GPU inserts may differ.
"""

from __future__ import annotations

from types import ModuleType

import torch

EMPTY_KEY: int = -(2**63)
TOMBSTONE_KEY: int = -(2**63) + 1


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
