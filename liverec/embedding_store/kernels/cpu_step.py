"""Compiled CPU kernels for the table's training step: one pass per stage instead of many torch ops.

A train step on a 65,536-key batch is, in torch ops, a sort (torch.unique), a probe, a dozen
gathers and scatters for the sketch and the row metadata, then a scatter-add of the gradients
and the optimizer's gathers, arithmetic and scatters: each materialises a batch-sized
temporary, and on a 2-core CPU those passes, not arithmetic, are the cost. Here:

- `dedup_find`: one hash-based deduplication of the batch (distinct keys in first-occurrence
  order, the inverse map, occurrences) and the probe of each distinct key, in one call.
  Nothing downstream depends on the distinct keys' order: new keys are sorted before they get
  rows (the allocation order of the contract), and per-key work is a sum.
- `sketch_add_estimate`: the count-min update of the missed keys and their estimates, with the
  same cells and the same saturating sums as `CountMinSketch.add_and_estimate` (all increments
  first, then the estimates, so colliding keys of one batch see each other's counts).
- `touch`: count and time-stamp the hit rows.
- `uniforms`: the counter-based uniforms new rows are initialised from (initializer.py).
- `apply_gradients`: per distinct row, sum its occurrences' gradients (in occurrence order, so
  the result is deterministic), reject a non-finite sum, and apply sgd / adagrad / adam to the
  row and its state, rows in parallel (distinct rows never share memory). Float32 weights only;
  the table falls back to the torch ops otherwise.

The arithmetic is the torch path's, in float32, so CPU results match the CUDA (torch) path to
float rounding, which is what the CPU/CUDA test allows for weights and optimizer state; the
integer state (keys, rows, counts, times, sketch) is identical.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from liverec.embedding_store.kernels.cpu import _find_one, _home, _next

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
OPTIMIZER_CODES = {"sgd": 0, "adagrad": 1, "adam": 2}


@numba.njit(cache=True, inline="always")
def _splitmix64(x: np.uint64) -> np.uint64:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _dedup(keys: np.ndarray, distinct: np.ndarray, inverse: np.ndarray, occurrences: np.ndarray) -> int:
    """Distinct keys in first-occurrence order; returns how many. A scratch open-addressing
    table of at least twice the batch maps each key to its distinct index."""
    n = keys.shape[0]
    size = 1
    while size < 2 * n:
        size *= 2
    cap = np.uint64(size)
    table = np.full(size, -1, dtype=np.int32)
    count = 0
    for i in range(n):
        key = keys[i]
        slot = _home(key, cap)
        while True:
            d = table[slot]
            if d < 0:
                d = count
                table[slot] = d
                distinct[d] = key
                occurrences[d] = 0
                count += 1
                break
            if distinct[d] == key:
                break
            slot = _next(slot, cap)
        inverse[i] = d
        occurrences[d] += 1
    return count


@numba.njit(cache=True, parallel=True)
def _find_all(slots: np.ndarray, row_keys: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    cap = np.uint64(slots.shape[0])
    for i in numba.prange(keys.shape[0]):
        out[i] = _find_one(slots, row_keys, keys[i], cap)


def dedup_find(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct keys, inverse, occurrences, row of each distinct key or -1) of a CPU batch."""
    n = keys.numel()
    distinct = torch.empty(n, dtype=torch.int64)
    inverse = torch.empty(n, dtype=torch.int64)
    occurrences = torch.empty(n, dtype=torch.int64)
    count = _dedup(keys.contiguous().numpy(), distinct.numpy(), inverse.numpy(), occurrences.numpy())
    distinct, occurrences = distinct[:count], occurrences[:count]
    rows = torch.empty(count, dtype=torch.int64)
    _find_all(slots.numpy(), row_keys.numpy(), distinct.numpy(), rows.numpy())
    return distinct, inverse, occurrences, rows


@numba.njit(cache=True, inline="always")
def _cell(h: np.uint64, r: int, width: int) -> np.int64:
    """Row r's cell of a key hashed to h: (h1 + r * h2) mod width, in row r's block."""
    wmask = np.uint64(width - 1)
    first, step = h & wmask, (h >> np.uint64(32)) | np.uint64(1)
    return np.int64((first + np.uint64(r) * step) & wmask) + r * width


@numba.njit(cache=True)
def _sketch(counters: np.ndarray, keys: np.ndarray, counts: np.ndarray, seed: np.int64, width: int, depth: int,
            bits: int, per_byte_log2: int, out: np.ndarray) -> None:
    cap = (1 << bits) - 1
    low = (1 << per_byte_log2) - 1
    for i in range(keys.shape[0]):
        h = _splitmix64(np.uint64(keys[i] ^ seed))
        add = min(counts[i], cap)
        for r in range(depth):
            cell = _cell(h, r, width)
            byte, shift = cell >> per_byte_log2, (cell & low) * bits
            packed = np.int64(counters[byte])
            value = (packed >> shift) & cap
            raised = min(value + add, cap)
            counters[byte] = np.uint8(packed + ((raised - value) << shift))
    for i in range(keys.shape[0]):
        h = _splitmix64(np.uint64(keys[i] ^ seed))
        best = cap
        for r in range(depth):
            cell = _cell(h, r, width)
            best = min(best, (np.int64(counters[cell >> per_byte_log2]) >> ((cell & low) * bits)) & cap)
        out[i] = best


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


@numba.njit(cache=True, parallel=True)
def _uniforms(keys: np.ndarray, seed: np.int64, out: np.ndarray) -> None:
    unit = np.float32(2.0**-24)
    for i in numba.prange(keys.shape[0]):
        s = _splitmix64(np.uint64(keys[i] ^ seed))
        low, high = s & _M32, s >> np.uint64(32)
        for j in range(out.shape[1]):
            h = ((np.uint64(j) * _GOLDEN32 + low) & _M32) ^ high
            h ^= h >> np.uint64(16)
            h = (h * _FMIX1) & _M32
            h ^= h >> np.uint64(13)
            h = (h * _FMIX2) & _M32
            h ^= h >> np.uint64(16)
            out[i, j] = np.float32(h >> np.uint64(8)) * unit


def uniforms(keys: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The initializer's (n, count) float32 uniforms (`initializer._uniforms`), bit for bit, in
    one compiled pass instead of a dozen int32 passes over an (n, count) buffer."""
    out = torch.empty(keys.numel(), count, dtype=torch.float32)
    _uniforms(keys.contiguous().numpy(), np.int64(seed), out.numpy())
    return out


@numba.njit(cache=True)
def _touch(counts: np.ndarray, last_update: np.ndarray, rows: np.ndarray, occurrences: np.ndarray, now: np.int32,
           cap: int) -> None:
    for i in range(rows.shape[0]):
        row = rows[i]
        if row >= 0:
            counts[row] = min(np.int64(counts[row]) + occurrences[i], cap)
            if last_update[row] < now:
                last_update[row] = now


def touch(counts: torch.Tensor, last_update: torch.Tensor, rows: torch.Tensor, occurrences: torch.Tensor,
          now_offset: int, cap: int) -> None:
    """counts[row] += occurrences (saturating at cap), last_update[row] = max(it, now), rows >= 0."""
    _touch(counts.numpy(), last_update.numpy(), rows.numpy(), occurrences.numpy(), np.int32(now_offset), cap)


@numba.njit(cache=True, parallel=True)
def _apply(weights: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray, rows: np.ndarray,
           inverse: np.ndarray, grads: np.ndarray, optimizer: int, lr: np.float32, eps: np.float32,
           beta1: np.float32, beta2: np.float32, rejected: np.ndarray) -> None:
    distinct, dim = rows.shape[0], grads.shape[1]
    starts = np.zeros(distinct + 1, dtype=np.int64)
    for i in range(inverse.shape[0]):
        starts[inverse[i] + 1] += 1
    for d in range(distinct):
        starts[d + 1] += starts[d]
    order = np.empty(inverse.shape[0], dtype=np.int64)
    fill = starts[:-1].copy()
    for i in range(inverse.shape[0]):
        d = inverse[i]
        order[fill[d]] = i
        fill[d] += 1
    one = np.float32(1.0)
    for d in numba.prange(distinct):
        row = rows[d]
        rejected[d] = 0
        if row < 0:
            continue
        g = np.zeros(dim, dtype=np.float32)
        for k in range(starts[d], starts[d + 1]):
            src = order[k]
            for j in range(dim):
                g[j] += grads[src, j]
        total = np.float32(0.0)
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
                    beta2: float) -> torch.Tensor:
    """One optimizer step per distinct row (rows: distinct, -1 skipped) on the sum of the
    gradients of its occurrences (inverse: occurrence -> distinct index). Float32 weights and
    state, in place. Returns a bool mask over `rows` of the rejected (non-finite) ones."""
    empty = np.zeros((1, 1), dtype=np.float32)
    columns = {"sgd": (), "adagrad": ("accumulator",), "adam": ("exp_avg", "exp_avg_sq", "step")}[optimizer]
    arrays = [state[name].numpy() for name in columns] + [empty] * (3 - len(columns))
    rejected = np.empty(rows.numel(), dtype=np.uint8)
    _apply(weights.numpy(), *arrays, rows.contiguous().numpy(), inverse.contiguous().numpy(),
           grads.float().contiguous().numpy(), OPTIMIZER_CODES[optimizer], np.float32(lr), np.float32(eps),
           np.float32(beta1), np.float32(beta2), rejected)
    return torch.from_numpy(rejected.view(np.bool_))

