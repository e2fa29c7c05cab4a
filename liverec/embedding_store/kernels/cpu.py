"""Compiled CPU hash-index kernels (numba), implementing the contract in `kernels/__init__.py`.

Why numba: compositions of generic torch ops (a probe loop of gathers and compares) reach only
3–6 M keys/s on a 2-core CPU, because every probe round materialises whole-batch temporaries;
a compiled loop walks each key's probe sequence in registers and reaches >100 M keys/s.

`find` and `erase` run in parallel over the batch (`prange`): a find only reads, and an erase of
distinct keys writes distinct slots, while a concurrent probe treats a key that turns into a
TOMBSTONE exactly as it treated the key (neither is its own key nor EMPTY, so it walks on).
`insert` is sequential: two new keys may race for the same free slot, and the batch of new keys
per step is small next to the batch of lookups, so it is not the bottleneck.

Tensors are viewed zero-copy as numpy arrays; they must be CPU, contiguous, int64.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from liverec.embedding_store.kernels import EMPTY_KEY, TOMBSTONE_KEY

# Below this batch size a parallel launch (~0.1 ms of thread wake-up) costs more than the loop.
PARALLEL_MIN = 16384
_EMPTY = np.int64(EMPTY_KEY)
_TOMBSTONE = np.int64(TOMBSTONE_KEY)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@numba.njit(cache=True, inline="always")
def _home(key: np.int64, mask: np.uint64) -> np.int64:
    """splitmix64(key) & mask: the key's home slot. All arithmetic stays in uint64."""
    z = np.uint64(key) + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return np.int64(z & mask)


@numba.njit(cache=True, inline="always")
def _find_one(slot_keys: np.ndarray, slot_vals: np.ndarray, key: np.int64, mask: np.uint64) -> np.int64:
    slot = _home(key, mask)
    while True:
        held = slot_keys[slot]
        if held == key:
            return slot_vals[slot]
        if held == _EMPTY:
            return np.int64(-1)
        slot = np.int64(np.uint64(slot + 1) & mask)


@numba.njit(cache=True, inline="always")
def _erase_one(slot_keys: np.ndarray, slot_vals: np.ndarray, key: np.int64, mask: np.uint64) -> np.int64:
    slot = _home(key, mask)
    while True:
        held = slot_keys[slot]
        if held == key:
            value = slot_vals[slot]
            slot_keys[slot] = _TOMBSTONE
            slot_vals[slot] = -1
            return value
        if held == _EMPTY:
            return np.int64(-1)
        slot = np.int64(np.uint64(slot + 1) & mask)


@numba.njit(cache=True, parallel=True)
def _find_parallel(slot_keys: np.ndarray, slot_vals: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    mask = np.uint64(slot_keys.shape[0] - 1)
    for i in numba.prange(queries.shape[0]):
        out[i] = _find_one(slot_keys, slot_vals, queries[i], mask)


@numba.njit(cache=True)
def _find_serial(slot_keys: np.ndarray, slot_vals: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    mask = np.uint64(slot_keys.shape[0] - 1)
    for i in range(queries.shape[0]):
        out[i] = _find_one(slot_keys, slot_vals, queries[i], mask)


@numba.njit(cache=True, parallel=True)
def _erase_parallel(slot_keys: np.ndarray, slot_vals: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    mask = np.uint64(slot_keys.shape[0] - 1)
    for i in numba.prange(keys.shape[0]):
        out[i] = _erase_one(slot_keys, slot_vals, keys[i], mask)


@numba.njit(cache=True)
def _erase_serial(slot_keys: np.ndarray, slot_vals: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    mask = np.uint64(slot_keys.shape[0] - 1)
    for i in range(keys.shape[0]):
        out[i] = _erase_one(slot_keys, slot_vals, keys[i], mask)


@numba.njit(cache=True)
def _insert(slot_keys: np.ndarray, slot_vals: np.ndarray, keys: np.ndarray, vals: np.ndarray) -> None:
    mask = np.uint64(slot_keys.shape[0] - 1)
    for i in range(keys.shape[0]):
        key = keys[i]
        slot = _home(key, mask)
        while True:
            held = slot_keys[slot]
            if held == _EMPTY or held == _TOMBSTONE:
                slot_keys[slot] = key
                slot_vals[slot] = vals[i]
                break
            slot = np.int64(np.uint64(slot + 1) & mask)


def _check(tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int64 or tensor.device.type != "cpu":
        raise TypeError(f"CPU kernels take CPU int64 tensors, got {tensor.dtype} on {tensor.device}")


def _view(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU int64 input (a copy only if it was not contiguous)."""
    _check(tensor)
    return tensor.contiguous().numpy()


def _slots(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a slot array the kernel writes through: never a copy."""
    _check(tensor)
    if not tensor.is_contiguous():
        raise ValueError("slot arrays must be contiguous: the kernels write through them in place")
    return tensor.numpy()


def find(slot_keys: torch.Tensor, slot_vals: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Value stored for each query, -1 where the query is absent."""
    out = torch.empty(queries.shape[0], dtype=torch.int64)
    kernel = _find_parallel if queries.shape[0] >= PARALLEL_MIN else _find_serial
    kernel(_slots(slot_keys), _slots(slot_vals), _view(queries), out.numpy())
    return out


def insert(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> None:
    """Insert unique, absent keys with their values, in place (slot arrays must be contiguous)."""
    _insert(_slots(slot_keys), _slots(slot_vals), _view(keys), _view(vals))


def erase(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Erase each key (its slot becomes a TOMBSTONE); the erased value per key, -1 where absent."""
    out = torch.empty(keys.shape[0], dtype=torch.int64)
    kernel = _erase_parallel if keys.shape[0] >= PARALLEL_MIN else _erase_serial
    kernel(_slots(slot_keys), _slots(slot_vals), _view(keys), out.numpy())
    return out
