"""Compiled CPU kernels for the table's training step: one pass per stage instead of many torch ops.

A train step on a 65,536-key batch is, in torch ops, a sort (torch.unique), a probe, a dozen
gathers and scatters for the sketch and the row metadata, then a scatter-add of the gradients
and the optimizer's gathers, arithmetic and scatters: each materialises a batch-sized
temporary, and on a 2-core CPU those passes, not arithmetic, are the cost. Here:

- `dedup_find`: one hash-based deduplication of the batch (distinct keys in first-occurrence
  order, the inverse map, occurrences, and each distinct key's occurrences as a linked list)
  and the probe of each distinct key, in one call; a row found is touched (counted and
  time-stamped) in the probe's own loop. Nothing downstream depends on the distinct keys'
  order: the table sorts new keys before they get rows (its allocation order), and per-key
  work is a sum.
- `admission_candidates`: the count-min update of the missed keys and their estimates, with the
  same cells and the same saturating sums as `CountMinSketch.add_and_estimate` (all increments
  first, then the estimates, so colliding keys of one batch see each other's counts), and the
  keys that reached min_count, sorted by a radix sort; `sketch_add_estimate` is the update
  alone, for the sketch's own callers.
- `write_normal_rows` / `write_uniform_rows` and `new_row_metadata`: new rows' initial weights
  (the initializer's values, bit for bit: the normals are `box_muller`'s, which needs no math
  library), optimizer state, last update and count, written in place; `uniforms` is the
  initializer's counter-based uniforms.
- `gather`: the forward's weights per key, zeros for keys without a row.
- `apply_gradients`: per distinct row, sum its occurrences' gradients (in occurrence order, so
  the result is deterministic), reject a non-finite sum, and apply sgd / adagrad / adam to the
  row and its state, rows in parallel (distinct rows never share memory). Float32 weights only;
  the table falls back to the torch ops otherwise.

The row-walking kernels (gather, the gradient step) prefetch the rows a few iterations ahead:
on a table of a few hundred MB each row is a cache miss, and their loop bodies are too long for
the CPU to reach the next rows' loads by itself (a third off the gradient step's CPU time).

The arithmetic is the torch path's, in float32, so CPU results match the CUDA (torch) path to
float rounding, which is what the CPU/CUDA test allows for trained weights and optimizer state;
new rows' initial weights and the integer state (keys, rows, counts, times, sketch) are
identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from liverec.embedding_store import box_muller
from liverec.embedding_store.kernels import TOMBSTONE_KEY, reserved_keys_error
from liverec.embedding_store.kernels.cpu import (
    _AHEAD,
    PARALLEL_MIN,
    _find_one,
    _home,
    _next,
    _prefetch,
    _splitmix64,
)

_CACHE_LINE_FLOATS = 16
# Row kernels (a row is `dim` floats of work) run in parallel from this many rows on; measured
# here, two threads overtake one between 4,096 and 8,192 rows for the gather and at ~4,096 for the
# gradient step and new rows' initial values.
PARALLEL_MIN_ROWS = 4096


@contextmanager
def _threads_for(items: int, parallel_min: int) -> Iterator[int]:
    """Run the parallel kernels called inside on one thread when `items` is below `parallel_min`;
    yields the thread count (the chunked kernels' `chunks`).

    Launching a parallel region wakes numba's sleeping worker thread: ~75 us per call on this VM
    with OMP_WAIT_POLICY=PASSIVE, against ~1 us on one thread, more than a small batch's whole
    loop. The trainer's receive path looks up and gathers a handful of keys per poll. numba's
    thread count belongs to the calling thread, so the receive path and the learner do not see
    each other's setting."""
    threads = numba.get_num_threads()
    if items >= parallel_min or threads == 1:
        yield threads
        return
    numba.set_num_threads(1)
    try:
        yield 1
    finally:
        numba.set_num_threads(threads)


@numba.njit(cache=True, inline="always")
def _prefetch_row(flat: np.ndarray, start: np.int64, length: int) -> None:
    for k in range(0, length, _CACHE_LINE_FLOATS):
        _prefetch(flat, start + k)


OPTIMIZER_CODES = {"sgd": 0, "adagrad": 1, "adam": 2}


@numba.njit(cache=True)
def _dedup(keys: np.ndarray, distinct: np.ndarray, inverse: np.ndarray, occurrences: np.ndarray, head: np.ndarray,
           nxt: np.ndarray) -> tuple[int, np.int64]:
    """Distinct keys in first-occurrence order; returns how many, and the smallest key (for the
    caller's check of the reserved keys). A scratch open-addressing table of at least twice the
    batch maps each key to its distinct index. Also each distinct key's occurrences as a list
    (`_occurrence_lists`), which the gradient step walks."""
    n = keys.shape[0]
    least = np.int64(np.iinfo(np.int64).max)
    tail = np.empty(n, dtype=np.int64)
    size = 1
    while size < 2 * n:
        size *= 2
    cap = np.uint64(size)
    table = np.full(size, -1, dtype=np.int32)
    count = 0
    for i in range(n):
        key = keys[i]
        least = min(least, key)
        slot = _home(key, cap)
        while True:
            d = table[slot]
            if d < 0:
                d = count
                table[slot] = d
                distinct[d] = key
                occurrences[d] = 0
                head[d] = i
                count += 1
                break
            if distinct[d] == key:
                nxt[tail[d]] = i
                break
            slot = _next(slot, cap)
        inverse[i] = d
        occurrences[d] += 1
        tail[d] = i
        nxt[i] = -1
    return count, least


@numba.njit(cache=True, parallel=True)
def _find_touch(slots: np.ndarray, row_keys: np.ndarray, keys: np.ndarray, occurrences: np.ndarray, out: np.ndarray,
                counts: np.ndarray, last_update: np.ndarray, now: np.int32, cap: int, chunks: int) -> None:
    """`find` of each (distinct) key, and `touch` of each row found, prefetching in two stages:
    the home slot of the key 2 * _AHEAD on, then the row its slot names for the key _AHEAD on
    (a probe is two dependent misses)."""
    n = keys.shape[0]
    index_cap = np.uint64(slots.shape[0])
    for c in numba.prange(chunks):
        stop = (c + 1) * n // chunks
        for i in range(c * n // chunks, stop):
            if i + 2 * _AHEAD < stop:
                _prefetch(slots, _home(keys[i + 2 * _AHEAD], index_cap))
            if i + _AHEAD < stop:
                ahead = slots[_home(keys[i + _AHEAD], index_cap)]
                if ahead >= 0:
                    _prefetch(row_keys, np.int64(ahead))
            row = _find_one(slots, row_keys, keys[i], index_cap)
            out[i] = row
            if row >= 0:  # keys are distinct, so are their rows: no two iterations write one row
                _touch_row(counts, last_update, row, occurrences[i], now, cap)


@numba.njit(cache=True, inline="always")
def _touch_row(counts: np.ndarray, last_update: np.ndarray, row: np.int64, occurrences: np.int64, now: np.int32,
               cap: int) -> None:
    """counts[row] += occurrences (saturating at cap); last_update[row] = max(it, now)."""
    counts[row] = min(np.int64(counts[row]) + occurrences, cap)
    if last_update[row] < now:
        last_update[row] = now


@dataclass(frozen=True)
class Dedup:
    """A CPU batch deduplicated: keys[i] == distinct[inverse[i]], occurrences per distinct
    key, and the occurrences of distinct key d listed from head[d] through nxt (ascending)."""

    distinct: torch.Tensor
    inverse: torch.Tensor
    occurrences: torch.Tensor
    head: torch.Tensor
    nxt: torch.Tensor


def dedup_find(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
               last_update: torch.Tensor, now_offset: int, cap: int) -> tuple[Dedup, torch.Tensor]:
    """The batch deduplicated, and the row of each distinct key (-1: none); each row found is
    touched at once (`touch_row`: count and time stamp), in the parallel pass of the probe.
    (The rows admitted later in the step are stamped as they are written: `new_row_metadata`.)
    A batch holding a reserved key is refused before anything is touched."""
    n = keys.numel()
    distinct, inverse, occurrences, head, nxt = (torch.empty(n, dtype=torch.int64) for _ in range(5))
    count, least = _dedup(keys.contiguous().numpy(), distinct.numpy(), inverse.numpy(), occurrences.numpy(),
                          head.numpy(), nxt.numpy())
    if least <= TOMBSTONE_KEY:
        raise reserved_keys_error()
    dedup = Dedup(distinct[:count], inverse, occurrences[:count], head[:count], nxt)
    rows = torch.empty(count, dtype=torch.int64)
    with _threads_for(count, PARALLEL_MIN) as chunks:
        _find_touch(slots.numpy(), row_keys.numpy(), dedup.distinct.numpy(), dedup.occurrences.numpy(), rows.numpy(),
                    counts.numpy(), last_update.numpy(), np.int32(now_offset), cap, chunks)
    return dedup, rows


@numba.njit(cache=True, inline="always")
def _cell(h: np.uint64, r: int, width: int) -> np.int64:
    """Row r's cell of a key hashed to h: (h1 + r * h2) mod width, in row r's block."""
    wmask = np.uint64(width - 1)
    first, step = h & wmask, (h >> np.uint64(32)) | np.uint64(1)
    return np.int64((first + np.uint64(r) * step) & wmask) + r * width


@numba.njit(cache=True, inline="always")
def _sketch_add(counters: np.ndarray, h: np.uint64, add: np.int64, width: int, depth: int, bits: int,
                per_byte_log2: int) -> np.int64:
    """Raise the key's `depth` cells (hashed to h) by `add`, saturating at 2**bits - 1; returns
    the smallest raised cell (the key's estimate at this point: later adds only raise it)."""
    cap = (1 << bits) - 1
    low = (1 << per_byte_log2) - 1
    add = min(add, cap)
    least = np.int64(cap)
    for r in range(depth):
        cell = _cell(h, r, width)
        byte, shift = cell >> per_byte_log2, (cell & low) * bits
        packed = np.int64(counters[byte])
        value = (packed >> shift) & cap
        raised = min(value + add, cap)
        counters[byte] = np.uint8(packed + ((raised - value) << shift))
        least = min(least, raised)
    return least


@numba.njit(cache=True, inline="always")
def _sketch_estimate(counters: np.ndarray, h: np.uint64, width: int, depth: int, bits: int,
                     per_byte_log2: int) -> np.int64:
    cap = (1 << bits) - 1
    low = (1 << per_byte_log2) - 1
    best = np.int64(cap)
    for r in range(depth):
        cell = _cell(h, r, width)
        best = min(best, (np.int64(counters[cell >> per_byte_log2]) >> ((cell & low) * bits)) & cap)
    return best


@numba.njit(cache=True, inline="always")
def _prefetch_cells(counters: np.ndarray, h: np.uint64, width: int, depth: int, per_byte_log2: int) -> None:
    for r in range(depth):
        _prefetch(counters, _cell(h, r, width) >> per_byte_log2)


@numba.njit(cache=True)
def _sketch(counters: np.ndarray, keys: np.ndarray, counts: np.ndarray, seed: np.int64, width: int, depth: int,
            bits: int, per_byte_log2: int, out: np.ndarray) -> None:
    for i in range(keys.shape[0]):
        _sketch_add(counters, _splitmix64(np.uint64(keys[i] ^ seed)), counts[i], width, depth, bits, per_byte_log2)
    for i in range(keys.shape[0]):
        out[i] = _sketch_estimate(counters, _splitmix64(np.uint64(keys[i] ^ seed)), width, depth, bits,
                                  per_byte_log2)


@numba.njit(cache=True)
def _candidates(distinct: np.ndarray, occurrences: np.ndarray, rows: np.ndarray, counters: np.ndarray,
                seed: np.int64, width: int, depth: int, bits: int, per_byte_log2: int, min_count: int,
                counted: bool) -> tuple[np.ndarray, np.ndarray, np.int64]:
    missed = np.empty(distinct.shape[0], dtype=np.int64)
    count = 0
    missed_occurrences = np.int64(0)
    for d in range(distinct.shape[0]):
        if rows[d] < 0:
            missed[count] = d
            count += 1
            missed_occurrences += occurrences[d]
    eligible = np.empty(count, dtype=np.int64)
    chosen = 0
    if counted:
        hashes = np.empty(count, dtype=np.uint64)
        for k in range(count):
            hashes[k] = _splitmix64(np.uint64(distinct[missed[k]] ^ seed))
        recheck = np.empty(count, dtype=np.int64)  # keys below min_count after their own add
        pending = 0
        for k in range(count):
            if k + _AHEAD < count:
                _prefetch_cells(counters, hashes[k + _AHEAD], width, depth, per_byte_log2)
            d = missed[k]
            if _sketch_add(counters, hashes[k], occurrences[d], width, depth, bits, per_byte_log2) >= min_count:
                eligible[chosen] = d  # cells only grow: the final estimate is at least this
                chosen += 1
            else:
                recheck[pending] = k
                pending += 1
        for p in range(pending):  # the rest, once every key is counted (a batch's colliding keys add up)
            if p + _AHEAD < pending:
                _prefetch_cells(counters, hashes[recheck[p + _AHEAD]], width, depth, per_byte_log2)
            k = recheck[p]
            if _sketch_estimate(counters, hashes[k], width, depth, bits, per_byte_log2) >= min_count:
                eligible[chosen] = missed[k]
                chosen += 1
    else:
        eligible[:count] = missed[:count]
        chosen = count
    keys = np.empty(chosen, dtype=np.int64)
    for k in range(chosen):
        keys[k] = distinct[eligible[k]]
    keys, index = _sorted_pairs(keys, eligible[:chosen])
    return keys, index, missed_occurrences


@numba.njit(cache=True)
def _sorted_pairs(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, values) ordered by key ascending, in place: an LSD radix sort on bytes (the key
    with its sign bit flipped, so signed order is unsigned order), skipping bytes all keys share.
    Linear in n, where the quicksort of np.argsort took 0.6 ms for the ~9k new keys of a batch."""
    n = keys.shape[0]
    sign = np.uint64(1) << np.uint64(63)
    bits = np.empty(n, dtype=np.uint64)
    for i in range(n):
        bits[i] = np.uint64(keys[i]) ^ sign
    spare_bits, spare_values = np.empty_like(bits), np.empty_like(values)
    counts = np.empty(257, dtype=np.int64)
    for shift in range(0, 64, 8):
        counts[:] = 0
        for i in range(n):
            counts[((bits[i] >> np.uint64(shift)) & np.uint64(255)) + 1] += 1
        if counts.max() == n:
            continue
        for b in range(256):
            counts[b + 1] += counts[b]
        for i in range(n):
            digit = (bits[i] >> np.uint64(shift)) & np.uint64(255)
            at = counts[digit]
            counts[digit] = at + 1
            spare_bits[at] = bits[i]
            spare_values[at] = values[i]
        bits, spare_bits = spare_bits, bits
        values, spare_values = spare_values, values
    for i in range(n):
        keys[i] = np.int64(bits[i] ^ sign)
    return keys, values


def admission_candidates(distinct: torch.Tensor, occurrences: torch.Tensor, rows: torch.Tensor,
                         sketch: tuple[torch.Tensor, int, int, int, int] | None, min_count: int
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The missed distinct keys (rows[d] < 0) that may be admitted, ascending, with their
    distinct indices, and the missed keys' occurrences (what a sketch counts). With a sketch
    (counters, seed, width, depth, bits) the missed keys are counted first, all of them, then
    those whose estimate reached min_count are the candidates (`sketch_add_estimate` on the
    missed keys); without one every missed key is."""
    if sketch is None:
        counters, seed, width, depth, bits = torch.zeros(1, dtype=torch.uint8), 0, 4, 0, 2
    else:
        counters, seed, width, depth, bits = sketch
    keys, index, missed = _candidates(distinct.numpy(), occurrences.numpy(), rows.numpy(), counters.numpy(),
                                     np.int64(seed), width, depth, bits, 3 - (bits.bit_length() - 1), min_count,
                                     sketch is not None)
    return torch.from_numpy(keys), torch.from_numpy(index), int(missed)


def sketch_add_estimate(counters: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, *, seed: int, width: int,
                        depth: int, bits: int) -> torch.Tensor:
    """Add each (distinct) key `counts` times to a count-min sketch of `bits`-bit counters
    packed in uint8 bytes (saturating at 2**bits - 1); each key's estimate."""
    out = torch.empty(keys.numel(), dtype=torch.int64)
    per_byte_log2 = 3 - (bits.bit_length() - 1)  # cells a byte: 4 of 2 bits, 2 of 4, 1 of 8
    _sketch(counters.numpy(), keys.contiguous().numpy(), counts.contiguous().numpy(), np.int64(seed), width, depth,
            bits, per_byte_log2, out.numpy())
    return out


_M32 = np.uint64(0xFFFFFFFF)
_GOLDEN32 = np.uint64(0x9E3779B9)
_FMIX1 = np.uint64(0x85EBCA6B)
_FMIX2 = np.uint64(0xC2B2AE35)
_UNIT = box_muller.UNIT
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_MINUS_TWO = np.float32(-2.0)
_QUARTER_UNIT = np.float32(2.0**-22)
_HALF_UNIT = np.float32(2.0**-25)


@numba.njit(cache=True, inline="always")
def _key_seed(key: np.int64, seed: np.int64) -> tuple[np.uint64, np.uint64]:
    s = _splitmix64(np.uint64(key ^ seed))
    return s & _M32, s >> np.uint64(32)


@numba.njit(cache=True, inline="always")
def _uniform_bits(low: np.uint64, high: np.uint64, j: int) -> np.uint64:
    """Uniform j of a key whose seed halves are (low, high), as its 24 bits: the top 24 of
    murmur3's finaliser of (j * golden + low) ^ high."""
    h = ((np.uint64(j) * _GOLDEN32 + low) & _M32) ^ high
    h ^= h >> np.uint64(16)
    h = (h * _FMIX1) & _M32
    h ^= h >> np.uint64(13)
    h = (h * _FMIX2) & _M32
    h ^= h >> np.uint64(16)
    return h >> np.uint64(8)


@numba.njit(cache=True, inline="always")
def _uniform(low: np.uint64, high: np.uint64, j: int) -> np.float32:
    """Uniform j in [0, 1): its 24 bits scaled."""
    return np.float32(_uniform_bits(low, high, j)) * _UNIT


@numba.njit(cache=True, parallel=True)
def _uniforms(keys: np.ndarray, seed: np.int64, out: np.ndarray) -> None:
    for i in numba.prange(keys.shape[0]):
        low, high = _key_seed(keys[i], seed)
        for j in range(out.shape[1]):
            out[i, j] = _uniform(low, high, j)


def uniforms(keys: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The initializer's (n, count) float32 uniforms (`initializer._uniforms`), bit for bit, in
    one compiled pass instead of a dozen int32 passes over an (n, count) buffer."""
    out = torch.empty(keys.numel(), count, dtype=torch.float32)
    with _threads_for(keys.numel(), PARALLEL_MIN_ROWS):
        _uniforms(keys.contiguous().numpy(), np.int64(seed), out.numpy())
    return out


# The row-walking kernels deal the distinct rows to the threads in blocks of this many, round
# robin: the first-seen keys of a batch are its frequent ones (more gradients to sum), and
# contiguous halves would leave one thread with most of them.
_DEAL_BLOCK = 256


@numba.njit(cache=True, inline="always")
def _dealt(n: int, chunk: int, chunks: int) -> int:
    """How many of n items chunk `chunk` of `chunks` gets when blocks are dealt round robin."""
    blocks = (n + _DEAL_BLOCK - 1) // _DEAL_BLOCK
    mine = 0
    for b in range(chunk, blocks, chunks):
        mine += min(_DEAL_BLOCK, n - b * _DEAL_BLOCK)
    return mine


@numba.njit(cache=True, inline="always")
def _dealt_index(m: int, chunk: int, chunks: int) -> int:
    """The item that is chunk `chunk`'s m-th under that dealing."""
    return ((m // _DEAL_BLOCK) * chunks + chunk) * _DEAL_BLOCK + m % _DEAL_BLOCK


@numba.njit(cache=True)
def _occurrence_lists(inverse: np.ndarray, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct index's occurrences as a linked list in ascending order: head[d] is the
    first, nxt[i] the one after i (-1: none). One backward pass, where a counting sort takes two
    passes and a prefix sum; and since distinct indices usually follow first occurrence, walking
    the heads in order reads the gradients nearly sequentially."""
    head = np.full(distinct, -1, dtype=np.int64)
    nxt = np.empty(inverse.shape[0], dtype=np.int64)
    for i in range(inverse.shape[0] - 1, -1, -1):
        d = inverse[i]
        nxt[i] = head[d]
        head[d] = i
    return head, nxt


@numba.njit(cache=True, parallel=True)
def _apply(weights: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray, rows: np.ndarray,
           head: np.ndarray, nxt: np.ndarray, grads: np.ndarray, optimizer: int, lr: np.float32, eps: np.float32,
           beta1: np.float32, beta2: np.float32, rejected: np.ndarray, chunks: int) -> None:
    distinct, dim = rows.shape[0], grads.shape[1]
    one, zero = np.float32(1.0), np.float32(0.0)
    flat_weights, flat_s1, flat_grads = weights.reshape(-1), s1.reshape(-1), grads.reshape(-1)
    for c in numba.prange(chunks):
        g = np.empty(dim, dtype=np.float32)  # one scratch row per chunk, not per row
        mine = _dealt(distinct, c, chunks)
        for m in range(mine):
            if m + _AHEAD < mine:  # the rows a few iterations on: their loads overlap this one's work
                ahead_d = _dealt_index(m + _AHEAD, c, chunks)
                ahead = rows[ahead_d]
                if ahead >= 0:
                    _prefetch_row(flat_weights, ahead * dim, dim)
                    if optimizer != 0:
                        _prefetch_row(flat_s1, ahead * dim, dim)
                    _prefetch_row(flat_grads, head[ahead_d] * dim, dim)
            d = _dealt_index(m, c, chunks)
            row = rows[d]
            rejected[d] = 0
            if row < 0:
                continue
            i = head[d]
            for j in range(dim):
                g[j] = zero + grads[i, j]  # 0 + x, as a sum from zero gives (-0.0 becomes +0.0)
            i = nxt[i]
            while i >= 0:
                for j in range(dim):
                    g[j] += grads[i, j]
                i = nxt[i]
            total = zero
            for j in range(dim):
                total += g[j]
            if not np.isfinite(total):
                rejected[d] = 1
                continue
            if optimizer == 0:
                for j in range(dim):
                    weights[row, j] -= lr * g[j]
            elif optimizer == 1:
                for j in range(dim):
                    acc = s1[row, j] + g[j] * g[j]
                    s1[row, j] = acc
                    weights[row, j] -= lr * (g[j] / (np.sqrt(acc) + eps))
            else:
                step = s3[row, 0] + one
                s3[row, 0] = step
                bias1 = one - beta1**step
                bias2 = one - beta2**step
                for j in range(dim):
                    m = s1[row, j] * beta1 + (one - beta1) * g[j]
                    v = s2[row, j] * beta2 + (one - beta2) * g[j] * g[j]
                    s1[row, j] = m
                    s2[row, j] = v
                    weights[row, j] -= lr * ((m / bias1) / (np.sqrt(v / bias2) + eps))


def apply_gradients(optimizer: str, weights: torch.Tensor, state: dict[str, torch.Tensor], rows: torch.Tensor,
                    inverse: torch.Tensor, grads: torch.Tensor, *, lr: float, eps: float, beta1: float,
                    beta2: float, lists: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One optimizer step per distinct row (rows: distinct, -1 skipped) on the sum of the
    gradients of its occurrences (inverse: occurrence -> distinct index; `lists`, the same as
    occurrence lists (head, nxt) when the caller already has them, as `dedup_find` gives).
    Float32 weights and state, in place. Returns a bool mask over `rows` of the rejected
    (non-finite) ones."""
    empty = np.zeros((1, 1), dtype=np.float32)
    columns = {"sgd": (), "adagrad": ("accumulator",), "adam": ("exp_avg", "exp_avg_sq", "step")}[optimizer]
    arrays = [state[name].numpy() for name in columns] + [empty] * (3 - len(columns))
    rejected = np.empty(rows.numel(), dtype=np.uint8)
    if lists is None:
        head, nxt = _occurrence_lists(inverse.contiguous().numpy(), rows.numel())
    else:
        head, nxt = lists[0].numpy(), lists[1].numpy()
    with _threads_for(rows.numel(), PARALLEL_MIN_ROWS) as chunks:
        _apply(weights.numpy(), *arrays, rows.contiguous().numpy(), head, nxt, grads.float().contiguous().numpy(),
               OPTIMIZER_CODES[optimizer], np.float32(lr), np.float32(eps), np.float32(beta1), np.float32(beta2),
               rejected, chunks)
    return torch.from_numpy(rejected.view(np.bool_))


@numba.njit(cache=True, parallel=True)
def _gather(weights: np.ndarray, rows: np.ndarray, out: np.ndarray, chunks: int) -> None:
    n, dim = rows.shape[0], weights.shape[1]
    flat = weights.reshape(-1)
    zero = np.float32(0.0)
    for c in numba.prange(chunks):
        stop = (c + 1) * n // chunks
        for i in range(c * n // chunks, stop):
            if i + _AHEAD < stop and rows[i + _AHEAD] >= 0:
                _prefetch_row(flat, rows[i + _AHEAD] * dim, dim)
            row = rows[i]
            if row < 0:
                for j in range(dim):
                    out[i, j] = zero
            else:
                for j in range(dim):
                    out[i, j] = weights[row, j]


def gather(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weights[rows] with zeros where the row is -1, in one parallel pass that prefetches the
    rows ahead (float32 weights; an index_select cannot overlap the misses of a large table)."""
    out = torch.empty(rows.numel(), weights.shape[1], dtype=weights.dtype)
    with _threads_for(rows.numel(), PARALLEL_MIN_ROWS) as chunks:
        _gather(weights.numpy(), rows.contiguous().numpy(), out.numpy(), chunks)
    return out


@intrinsic
def _leading_zeros(typingctx, value):
    """Leading zero bits of a uint64 (llvm.ctlz; 64 for 0)."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.ctlz.i64")
        return builder.call(function, [args[0], ir.Constant(ir.IntType(1), 0)])

    return types.uint64(types.uint64), codegen


@numba.njit(cache=True, inline="always")
def _horner(z: np.float32, coefficients: tuple) -> np.float32:
    value = coefficients[0]
    for k in range(1, len(coefficients)):
        value = value * z + coefficients[k]
    return value


@numba.njit(cache=True, inline="always")
def _normal_pair(radius_bits: np.uint64, angle_bits: np.uint64, scale: np.float32) -> tuple[np.float32, np.float32]:
    """`box_muller.normal_pairs` of the uniforms radius_bits * 2**-24 and angle_bits * 2**-24,
    step for step: the same float32 operations in the same order, so the same bits. frexp and
    the quarter turn come from the integers (exactly what the float operations give), so the
    loop calls no library function."""
    n = radius_bits + np.uint64(1)  # u + 2**-24 = n * 2**-24, n in [1, 2**24]
    width = np.uint64(64) - _leading_zeros(n)  # n = m * 2**width, m in [1/2, 1)
    m = np.float32(n << (np.uint64(25) - width)) * _HALF_UNIT  # exact: n's bits, scaled by 2**-width
    e = np.float32(np.int64(width) - 24)
    low = m < box_muller.SQRT_HALF
    m = m * _TWO if low else m
    e = e - _ONE if low else e
    f = m - _ONE
    s = f / (f + _TWO)
    ln_x = e * box_muller.LN2 + s * _horner(s * s, box_muller.LN)
    radius = np.sqrt(ln_x * _MINUS_TWO) * scale
    quarter = angle_bits >> np.uint64(22)  # floor(4 u)
    t = np.float32(angle_bits & np.uint64(0x3FFFFF)) * _QUARTER_UNIT * box_muller.HALF_PI  # 4 u - quarter, then * pi/2
    z = t * t
    sin, cos = t * _horner(z, box_muller.SIN), _horner(z, box_muller.COS)
    odd, back = (quarter & np.uint64(1)) != 0, (quarter & np.uint64(2)) != 0
    first = -sin if odd else cos
    second = cos if odd else sin
    first = -first if back else first
    second = -second if back else second
    return first * radius, second * radius


@numba.njit(cache=True, parallel=True)
def _write_normal(weights: np.ndarray, rows: np.ndarray, keys: np.ndarray, seed: np.int64, scale: np.float32) -> None:
    dim = weights.shape[1]
    pairs = (dim + 1) // 2
    for i in numba.prange(rows.shape[0]):
        low, high = _key_seed(keys[i], seed)
        row = rows[i]
        for p in range(pairs):
            first, second = _normal_pair(_uniform_bits(low, high, 2 * p), _uniform_bits(low, high, 2 * p + 1), scale)
            weights[row, 2 * p] = first
            if 2 * p + 1 < dim:
                weights[row, 2 * p + 1] = second


@numba.njit(cache=True, parallel=True)
def _write_uniform(weights: np.ndarray, rows: np.ndarray, keys: np.ndarray, seed: np.int64, width: np.float32,
                   half: np.float32) -> None:
    for i in numba.prange(rows.shape[0]):
        low, high = _key_seed(keys[i], seed)
        row = rows[i]
        for j in range(weights.shape[1]):
            weights[row, j] = _uniform(low, high, j) * width - half


def write_normal_rows(weights: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, seed: int, scale: float) -> None:
    """weights[rows] = the initializer's normal rows of `keys`, bit for bit (`initial_rows`):
    hashing, uniforms and Box-Muller (`box_muller`: no library log, cos or sin) in one pass that
    writes each row where it goes."""
    with _threads_for(rows.numel(), PARALLEL_MIN_ROWS):
        _write_normal(weights.numpy(), rows.numpy(), keys.numpy(), np.int64(seed), np.float32(scale))


def write_uniform_rows(weights: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, seed: int, scale: float) -> None:
    """weights[rows] = the initializer's uniform rows of `keys` (u * 2 scale - scale), bit for bit."""
    with _threads_for(rows.numel(), PARALLEL_MIN_ROWS):
        _write_uniform(weights.numpy(), rows.numpy(), keys.numpy(), np.int64(seed), np.float32(2.0 * scale),
                       np.float32(scale))


@numba.njit(cache=True, parallel=True)
def _new_row_metadata(rows: np.ndarray, index: np.ndarray, distinct_rows: np.ndarray, occurrences: np.ndarray,
                      s1: np.ndarray, v1: np.float32, s2: np.ndarray, v2: np.float32, s3: np.ndarray, v3: np.float32,
                      columns: int, last_update: np.ndarray, now: np.int32, counts: np.ndarray, cap: int) -> np.int64:
    stamped = np.int64(0)
    for i in numba.prange(rows.shape[0]):
        row, seen = rows[i], occurrences[index[i]]
        distinct_rows[index[i]] = row
        last_update[row] = now
        counts[row] = min(seen, cap)
        stamped += seen
        if columns > 0:
            for j in range(s1.shape[1]):
                s1[row, j] = v1
        if columns > 1:
            for j in range(s2.shape[1]):
                s2[row, j] = v2
        if columns > 2:
            for j in range(s3.shape[1]):
                s3[row, j] = v3
    return stamped


def new_row_metadata(rows: torch.Tensor, index: torch.Tensor, distinct_rows: torch.Tensor, occurrences: torch.Tensor,
                     state: list[tuple[torch.Tensor, float]], last_update: torch.Tensor, now_offset: int,
                     counts: torch.Tensor, cap: int) -> int:
    """For each new row (of distinct key index[i]): its optimizer state columns at their initial
    values, and the row touched as `dedup_find` touches the rows it finds (count: its key's
    occurrences, saturating at cap; last update: now); distinct_rows[index] = rows (the
    lookup's distinct keys get their new rows). Returns the new rows' occurrences."""
    if len(state) > 3:
        raise ValueError(f"at most 3 optimizer state columns, got {len(state)}")
    empty = (np.zeros((1, 1), dtype=np.float32), 0.0)
    arrays = [(tensor.numpy(), value) for tensor, value in state] + [empty] * (3 - len(state))
    with _threads_for(rows.numel(), PARALLEL_MIN_ROWS):
        return int(_new_row_metadata(rows.numpy(), index.numpy(), distinct_rows.numpy(), occurrences.numpy(),
                                     *(item for array, value in arrays for item in (array, np.float32(value))),
                                     len(state), last_update.numpy(), np.int32(now_offset), counts.numpy(), cap))
