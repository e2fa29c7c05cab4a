"""Compiled CPU hash-index kernels (numba), implementing the contract in `kernels/__init__.py`.

Why numba: compositions of generic torch ops (a probe loop of gathers and compares) reach only
3–6 M keys/s on a 2-core CPU, because every probe round materialises whole-batch temporaries;
a compiled loop walks each key's probe sequence in registers and reaches >100 M keys/s.

`find` and `erase` run in parallel over the batch (`prange`): a find only reads, and an erase of
distinct keys writes distinct slots and rows, while a concurrent probe treats a slot that turns
into a TOMBSTONE, or a row whose key turns EMPTY, exactly as before (not its own key, not an
EMPTY slot: it walks on). `insert` is sequential: two new keys may race for the same free slot,
and the batch of new keys per step is small next to the batch of lookups.

Tensors are viewed zero-copy as numpy arrays; slots are int32, keys and rows int64, all CPU and
contiguous.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from liverec.embedding_store import hashing
from liverec.embedding_store.kernels import (
    EMPTY_KEY,
    EMPTY_SLOT,
    SLOT_DTYPE,
    TOMBSTONE_KEY,
    TOMBSTONE_SLOT,
    distinct_in_first_seen_order,
)

# Loops over keys prefetch the slot (or row) of the key this many iterations ahead; the
# row-walking kernels of cpu_step the rows (a row of a large table is a cache and TLB miss, and a
# loop body that works on a whole row is too long for the CPU to reach the next row's loads).
_AHEAD = 8
# Below this batch size a parallel launch (~0.1 ms of thread wake-up) costs more than the loop.
PARALLEL_MIN = 16384
_EMPTY = np.int64(EMPTY_KEY)
_TOMBSTONE = np.int64(TOMBSTONE_KEY)
_EMPTY_SLOT = np.int32(EMPTY_SLOT)
_TOMBSTONE_SLOT = np.int32(TOMBSTONE_SLOT)
_GOLDEN = np.uint64(hashing._GOLDEN)
_MIX1 = np.uint64(hashing._MIX1)
_MIX2 = np.uint64(hashing._MIX2)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_ONE = np.uint64(1)


@intrinsic
def _prefetch(typingctx, array, index):  # noqa: ANN001, ANN202 (numba's intrinsic protocol)
    """Hint the cache to fetch array[index] (a 1-D C-contiguous array) for reading: llvm.prefetch."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(cache=True, inline="always")
def _splitmix64(x: np.uint64) -> np.uint64:
    """splitmix64's finaliser (hashing.splitmix64, compiled): the slot and sketch hashes."""
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@numba.njit(cache=True, inline="always")
def _home(key: np.int64, cap: np.uint64) -> np.int64:
    """The key's home slot among `cap`: splitmix64(key) & (cap - 1) for a power of two (the
    layout the CUDA kernels share), else the high 32 hash bits scaled to [0, cap) (a multiply,
    not a division). All arithmetic stays in uint64."""
    z = _splitmix64(np.uint64(key))
    if cap & (cap - _ONE) == 0:
        return np.int64(z & (cap - _ONE))
    return np.int64(((z >> _S32) * cap) >> _S32)


@numba.njit(cache=True, inline="always")
def _next(slot: np.int64, cap: np.uint64) -> np.int64:
    """The slot after `slot`, wrapping at the end of the array (linear probing)."""
    slot += 1
    return np.int64(0) if np.uint64(slot) == cap else slot


@numba.njit(cache=True, inline="always")
def _slot_of(slots: np.ndarray, row_keys: np.ndarray, key: np.int64, cap: np.uint64) -> np.int64:
    """The slot holding key's row, or -1 (probe ended at an EMPTY slot, or the table is full)."""
    slot = _home(key, cap)
    for _ in range(slots.shape[0]):
        row = slots[slot]
        if row >= 0:
            if row_keys[row] == key:
                return slot
        elif row == _EMPTY_SLOT:
            return np.int64(-1)
        slot = _next(slot, cap)
    return np.int64(-1)


@numba.njit(cache=True, inline="always")
def _find_one(slots: np.ndarray, row_keys: np.ndarray, key: np.int64, cap: np.uint64) -> np.int64:
    if key == _EMPTY or key == _TOMBSTONE:
        return np.int64(-1)
    slot = _slot_of(slots, row_keys, key, cap)
    return np.int64(-1) if slot < 0 else np.int64(slots[slot])


@numba.njit(cache=True, inline="always")
def _erase_one(slots: np.ndarray, row_keys: np.ndarray, key: np.int64, cap: np.uint64) -> np.int64:
    if key == _EMPTY or key == _TOMBSTONE:
        return np.int64(-1)
    slot = _slot_of(slots, row_keys, key, cap)
    if slot < 0:
        return np.int64(-1)
    row = np.int64(slots[slot])
    slots[slot] = _TOMBSTONE_SLOT
    row_keys[row] = _EMPTY
    return row


@numba.njit(cache=True, inline="always")
def _insert_one(slots: np.ndarray, row_keys: np.ndarray, key: np.int64, row: np.int64, cap: np.uint64) -> bool:
    """Claim the first EMPTY or TOMBSTONE slot on key's path for row; False if there is none."""
    row_keys[row] = key
    slot = _home(key, cap)
    for _ in range(slots.shape[0]):
        if slots[slot] < 0:
            slots[slot] = np.int32(row)
            return True
        slot = _next(slot, cap)
    row_keys[row] = _EMPTY
    return False


@numba.njit(cache=True, parallel=True)
def _find_parallel(slots: np.ndarray, row_keys: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    cap = np.uint64(slots.shape[0])
    for i in numba.prange(queries.shape[0]):
        out[i] = _find_one(slots, row_keys, queries[i], cap)


@numba.njit(cache=True)
def _find_serial(slots: np.ndarray, row_keys: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    cap = np.uint64(slots.shape[0])
    for i in range(queries.shape[0]):
        out[i] = _find_one(slots, row_keys, queries[i], cap)


@numba.njit(cache=True, parallel=True)
def _erase_parallel(slots: np.ndarray, row_keys: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    cap = np.uint64(slots.shape[0])
    for i in numba.prange(keys.shape[0]):
        out[i] = _erase_one(slots, row_keys, keys[i], cap)


@numba.njit(cache=True)
def _erase_serial(slots: np.ndarray, row_keys: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    cap = np.uint64(slots.shape[0])
    for i in range(keys.shape[0]):
        out[i] = _erase_one(slots, row_keys, keys[i], cap)


@numba.njit(cache=True)
def _insert(slots: np.ndarray, row_keys: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.int64:
    """Insert in order; returns how many keys found no free slot (they are not inserted)."""
    cap = np.uint64(slots.shape[0])
    lost = 0
    for i in range(keys.shape[0]):
        if i + _AHEAD < keys.shape[0]:  # a serial loop: let the next keys' home slots load meanwhile
            _prefetch(slots, _home(keys[i + _AHEAD], cap))
        if not _insert_one(slots, row_keys, keys[i], rows[i], cap):
            lost += 1
    return lost


@numba.njit(cache=True)
def _reinsert(old_slots: np.ndarray, row_keys: np.ndarray, slots: np.ndarray) -> np.int64:
    """Insert every row of `old_slots` into the empty `slots`, in old slot order; returns how many
    found no free slot. The rows keep their keys (row_keys is only read)."""
    cap = np.uint64(slots.shape[0])
    lost = 0
    n = old_slots.shape[0]
    for s in range(n):
        if s + _AHEAD < n and old_slots[s + _AHEAD] >= 0:
            _prefetch(row_keys, np.int64(old_slots[s + _AHEAD]))
        row = old_slots[s]
        if row < 0:
            continue
        slot = _home(row_keys[row], cap)
        for _ in range(slots.shape[0]):
            if slots[slot] < 0:
                slots[slot] = row
                break
            slot = _next(slot, cap)
        else:
            lost += 1
    return lost


def reinsert(old_slots: torch.Tensor, row_keys: torch.Tensor, slots: torch.Tensor) -> None:
    """Move every row of the index `old_slots` into `slots` (empty, large enough): a rehash in
    one pass, without materialising the keys and rows or rewriting row_keys. Old slot order
    is nearly home order in any new capacity (scaled homes), so the writes walk the new slots
    almost sequentially."""
    lost = _reinsert(_inplace(old_slots, SLOT_DTYPE), _inplace(row_keys, torch.int64), _inplace(slots, SLOT_DTYPE))
    if lost:
        raise RuntimeError(f"hash index full: {lost} rows found no free slot")


def capacity_at_least(slots: int) -> int:
    """Slot count for at least `slots`: any size works here (see `_home`), so exactly that."""
    return max(int(slots), 1)


def _check(tensor: torch.Tensor, dtype: torch.dtype = torch.int64) -> None:
    if tensor.dtype != dtype or tensor.device.type != "cpu":
        raise TypeError(f"CPU kernels take CPU {dtype} tensors here, got {tensor.dtype} on {tensor.device}")


def _view(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU int64 input (a copy only if it was not contiguous)."""
    _check(tensor)
    return tensor.contiguous().numpy()


def _inplace(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A zero-copy numpy view of an array the kernel writes through: never a copy."""
    _check(tensor, dtype)
    if not tensor.is_contiguous():
        raise ValueError("slots and row_keys must be contiguous: the kernels write through them in place")
    return tensor.numpy()


def _table(slots: torch.Tensor, row_keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if slots.numel() == 0:
        raise ValueError("capacity must be at least 1 slot")
    return _inplace(slots, SLOT_DTYPE), _inplace(row_keys, torch.int64)


def find(slots: torch.Tensor, row_keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Row of each query, -1 where the query is absent."""
    table = _table(slots, row_keys)
    out = torch.empty(queries.shape[0], dtype=torch.int64)
    kernel = _find_parallel if queries.shape[0] >= PARALLEL_MIN else _find_serial
    kernel(*table, _view(queries), out.numpy())
    return out


def insert(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> None:
    """Insert unique, absent keys at their rows, in place. Raises if a key found no free slot
    (the caller grows the table first); the keys before it stay inserted."""
    if rows.numel() != keys.numel():
        raise ValueError("keys and rows must have the same length")
    lost = _insert(*_table(slots, row_keys), _view(keys), _view(rows))
    if lost:
        raise RuntimeError(f"hash index full: {lost} keys found no free slot")


def erase(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Erase each key (unique keys); the erased row per key, -1 where absent."""
    table = _table(slots, row_keys)
    out = torch.empty(keys.shape[0], dtype=torch.int64)
    kernel = _erase_parallel if keys.shape[0] >= PARALLEL_MIN else _erase_serial
    kernel(*table, _view(keys), out.numpy())
    return out


@numba.njit(cache=True)
def _lowest_free_rows(row_keys: np.ndarray, start: int, stop: int, out: np.ndarray) -> int:
    found = 0
    for row in range(start, stop):
        if found == out.shape[0]:
            break
        if row_keys[row] == _EMPTY:
            out[found] = row
            found += 1
    return found


def lowest_free_rows(row_keys: torch.Tensor, start: int, stop: int, count: int) -> torch.Tensor:
    """The `count` lowest rows in [start, stop) whose key is EMPTY (fewer if there are not as
    many), ascending: one serial pass that stops when it has them, where a mask and a nonzero
    over every row take two parallel passes over all of them."""
    out = torch.empty(count, dtype=torch.int64)
    found = _lowest_free_rows(_inplace(row_keys, torch.int64), start, stop, out.numpy())
    return out[:found]


def rows_for(count: int, free_rows: torch.Tensor, next_row: int) -> torch.Tensor:
    """Rows for `count` new keys: the free rows in order, then fresh rows from next_row."""
    take = free_rows[:count]
    fresh = torch.arange(next_row, next_row + count - take.numel(), dtype=torch.int64, device=free_rows.device)
    return torch.cat([take, fresh])


def find_or_insert(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor, free_rows: torch.Tensor,
                   next_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row per key, inserting the absent ones; returns (rows, new_keys, new_rows) as the contract says."""
    out = find(slots, row_keys, keys)
    miss = (out < 0) & (keys > TOMBSTONE_KEY)
    new_keys, inverse = distinct_in_first_seen_order(keys[miss])
    new_rows = rows_for(new_keys.numel(), free_rows, next_row)
    insert(slots, row_keys, new_keys, new_rows)
    out[miss] = new_rows[inverse]
    return out, new_keys, new_rows
