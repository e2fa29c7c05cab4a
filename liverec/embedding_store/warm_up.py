"""Compile (or load from numba's on-disk cache) every kernel a store's tables call, before a batch waits on it.

numba compiles a kernel on its first call. A process that starts with an empty cache (a new
Kubernetes pod: the cache lives in an emptyDir) paid ~11 s for it on its first train lookup
here, and one with a warm cache still ~40 ms of loading; a trainer's first events would wait on
that. `warm_up_kernels` runs the store's own operations on a scratch store with the same table
settings (optimizer, initializer, dtype, admission, TTL, row budget: each picks its kernels and
their argument types), so what gets compiled is what the real tables will call: the one-thread
and the parallel variants (batches on both sides of PARALLEL_MIN), growth by rehash, admission,
expiry and eviction, and the reuse of freed rows. The real store is not touched. On a CUDA
device the same calls compile the Triton kernels, for the sizes they meet: Triton compiles a
kernel once more for a size argument of 1 or a multiple of 16 (its specialisations), so other
batch sizes can still compile a variant on first use there. (The trainer's store is on the CPU.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.kernels.cpu import PARALLEL_MIN
from liverec.embedding_store.store import EmbeddingStore
from liverec.embedding_store.table import TIME_BASE_S

_FEW = 8


def warm_up_kernels(configs: Sequence[TableConfig], *, device: torch.device | str = "cpu") -> None:
    for config in configs:
        # From one row up, so the scratch table grows (rehash and row growth) like a real one.
        scratch = dataclasses.replace(config, initial_capacity=1)
        _exercise(EmbeddingStore([scratch], device=device), config)


def _exercise(store: EmbeddingStore, config: TableConfig) -> None:
    name = config.name
    many = torch.arange(1, PARALLEL_MIN + 1, dtype=torch.int64, device=store.device)
    few = many[:_FEW] + PARALLEL_MIN  # keys of their own, so that they expire on their own
    start_s = TIME_BASE_S
    for now_s, keys in ((start_s, few), (start_s + 1, many)):
        keys = keys.repeat(config.min_count)  # every key reaches min_count in this lookup: all admitted
        rows = store.lookup(name, keys, train=True, now_s=now_s)
        store.apply_gradients(name, rows, torch.zeros_like(store.gather(name, rows)))  # the lookup's deduplication
        rows = store.lookup(name, keys)
        store.apply_gradients(name, rows, torch.zeros_like(store.gather(name, rows)))  # deduplicated afresh
        store.frequency(name, keys)
    store.table_items(name)
    if config.ttl_s is not None:
        store.expire(start_s + config.ttl_s + 1)  # the few rows
        store.expire(start_s + config.ttl_s + 2)  # the many
    store.lookup(name, many.repeat(config.min_count), train=True, now_s=start_s + (config.ttl_s or 0) + 2)
    store.unpin()  # the last lookup reused the freed rows
