"""Triton kernels for the hash index on CUDA (the contract is in `kernels/__init__.py`).

Same layout, hash, sentinels and probing order as the CPU kernels, so a table built on one
backend can be searched on the other. One lane per key, no per-key Python loop.

Probing reads the slot array in aligned groups of G = 4 slots (one 32-byte DRAM sector) and
takes the first slot of the group, from the home slot on, that ends the probe. That is exactly
linear probing, but a probe of length L costs about L / 4 dependent loads instead of L: a hash
lookup is bound by the latency of those loads, and a block waits for its slowest lane.

Concurrency: lanes of one launch race for free slots with a compare-and-swap on the int64 slot
key. A slot, once claimed, never changes within a launch, so a lane that loses the race learns
the winner's key from the CAS and either has met its own key or walks on. Triton's
`atomic_cas` has no mask: idle lanes CAS a private scratch cell with compare == new (a no-op).

`find_or_insert` is the store's hot path (find -> dedup misses -> allocate -> insert) and gives
the CPU path's key -> row mapping: the r-th new key in ascending order gets the r-th row.
`fused=False` composes the contract's functions literally (torch.unique on the misses).
`fused=True` probes (read-only, G-slot groups) and claims (CAS, slot by slot) in two kernels,
deduplicating inside the table itself (lanes of one key meet at the slot the first of them
claims), ranks only the claimed keys with one keys-only sort, then writes rows and gathers them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        "liverec.embedding_store.kernels.cuda needs Triton (shipped with CUDA builds of "
        "PyTorch); on a machine without it use the CPU kernels (kernels_for('cpu'))"
    ) from exc

from liverec.embedding_store.kernels import EMPTY_KEY, TOMBSTONE_KEY

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly); used to test without a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK = 64  # lanes per program: small blocks keep the slowest lane's probe from idling many
NUM_WARPS = 1
GROUP = 4  # slots read per probe step: 4 x int64 = one 32-byte sector

_EMPTY = tl.constexpr(EMPTY_KEY)
_TOMB = tl.constexpr(TOMBSTONE_KEY)


@triton.jit
def _home(k, cmask):
    """splitmix64(k) & cmask, in uint64 arithmetic (wrapping multiply, logical shifts)."""
    z = k.to(tl.uint64, bitcast=True) + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z & cmask.to(tl.uint64)).to(tl.int64)


@triton.jit
def _cas(ptr, cmp, new, pred, scratch_ptr):
    """Compare-and-swap where `pred`; returns the old value (meaningless where not `pred`).

    Triton's atomic_cas has no mask, so idle lanes CAS their own scratch cell with cmp == new,
    which changes nothing.
    """
    return tl.atomic_cas(tl.where(pred, ptr, scratch_ptr), tl.where(pred, cmp, 0),
                         tl.where(pred, new, 0), sem="relaxed")


@triton.jit
def _pick(kk, j, jstop):
    """kk[lane, jstop[lane]] (0 where jstop is past the group)."""
    return tl.sum(tl.where(j[None, :] == jstop[:, None], kk, 0), axis=1)


@triton.jit
def _locate(slot_keys, q, active, cmask, cap, G: tl.constexpr):
    """(found, slot) of each active query: walk G-slot groups to the key or an EMPTY slot."""
    home = _home(q, cmask)
    base = home & -G
    first = home - base
    j = tl.arange(0, G)
    found = active & (q != q)
    slot = home * 0
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        kk = tl.load(slot_keys + (tl.multiple_of(base, G)[:, None] + j[None, :]),
                     mask=active[:, None], other=_EMPTY)
        stop = (j[None, :] >= first[:, None]) & ((kk == q[:, None]) | (kk == _EMPTY))
        jstop = tl.min(tl.where(stop, j[None, :], G), axis=1)
        ended = active & (jstop < G)
        hit = ended & (_pick(kk, j, jstop) == q)
        found = found | hit
        slot = tl.where(hit, base + jstop, slot)
        active = active & ~ended
        base = (base + G) & cmask
        first = first * 0
        steps += G
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap + G).to(tl.int32)
    return found, slot


@triton.jit
def _claim(slot_keys, k, active, pos, cmask, max_iters, scratch_ptr):
    """Claim the first free slot (EMPTY or TOMBSTONE) from `pos` on, or meet k there.

    The key must be absent from the table at launch, and every slot before `pos` on its path
    must hold another key. Lanes of one key walk the same path and meet at the slot the first
    of them claims. Returns (won, found, slot): won marks the lane whose CAS put k there, found
    every lane that ended at k's slot. A lost CAS returns the slot's new key, so the lane
    decides from that (k: met; another key: walk on).

    Slot by slot on 1-D tensors on purpose: after a cross-thread reduction Triton replicates a
    lane's values over several threads, and replicas of an atomic do not see the same result.
    """
    won = active & (k != k)
    found = won
    slot = pos
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        cur = tl.load(slot_keys + pos, mask=active, other=0)
        free = active & ((cur == _EMPTY) | (cur == _TOMB))
        old = cur
        if tl.max(free.to(tl.int32), axis=0) > 0:
            old = _cas(slot_keys + pos, cur, k, free, scratch_ptr)
        got = free & (old == cur)
        met = active & ~got & ((cur == k) | (free & (old == k)))
        won = won | got
        found = found | got | met
        slot = tl.where(got | met, pos, slot)
        active = active & ~(got | met)
        pos = tl.where(active, (pos + 1) & cmask, pos)
        steps += 1
        go = tl.max(active.to(tl.int32), axis=0) * (steps < max_iters).to(tl.int32)
    return won, found, slot


@triton.jit
def _find_kernel(slot_keys, slot_vals, q_ptr, out_ptr, n, cmask, cap,
                 BLOCK: tl.constexpr, G: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(q_ptr + offs, mask=m, other=_EMPTY)
    found, slot = _locate(slot_keys, q, m & (q != _EMPTY) & (q != _TOMB), cmask, cap, G)
    tl.store(out_ptr + offs, tl.load(slot_vals + slot, mask=found, other=-1), mask=m)


@triton.jit
def _erase_kernel(slot_keys, slot_vals, keys_ptr, out_ptr, n, cmask, cap,
                  BLOCK: tl.constexpr, G: tl.constexpr):
    """Tombstone each key's slot (value reset to -1, as on the CPU); keys are unique here."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    found, slot = _locate(slot_keys, q, m & (q != _EMPTY) & (q != _TOMB), cmask, cap, G)
    tl.store(out_ptr + offs, tl.load(slot_vals + slot, mask=found, other=-1), mask=m)
    tl.store(slot_keys + slot, tl.full([BLOCK], _TOMB, tl.int64), mask=found)
    tl.store(slot_vals + slot, tl.full([BLOCK], -1, tl.int64), mask=found)


@triton.jit
def _insert_kernel(slot_keys, slot_vals, keys_ptr, vals_ptr, scratch, fail_ptr, n, cmask, max_iters,
                   BLOCK: tl.constexpr):
    """Insert unique, absent keys: each claims the first free slot on its probe path."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    active = m & (k != _EMPTY) & (k != _TOMB)
    won, found, slot = _claim(slot_keys, k, active, _home(k, cmask), cmask, max_iters, scratch + offs)
    tl.store(slot_vals + slot, tl.load(vals_ptr + offs, mask=won, other=-1), mask=won)
    lost = tl.sum((active & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(fail_ptr, lost)


@triton.jit
def _probe_kernel(slot_keys, keys_ptr, pos_out, from_out, fail_ptr, n, cmask, cap,
                  BLOCK: tl.constexpr, G: tl.constexpr):
    """Read-only first half of find_or_insert: each key's slot, or where it would be claimed.

    pos_out: the key's slot, -1 if absent; from_out: for an absent valid key the first free
    slot (TOMBSTONE or EMPTY) on its path, else -1.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    valid = m & (k != _EMPTY) & (k != _TOMB)
    home = _home(k, cmask)
    base = home & -G
    first = home - base
    j = tl.arange(0, G)
    active = valid
    hit = valid & (k != k)
    slot = home * 0 - 1
    free_at = slot
    steps = tl.program_id(0) * 0
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        kk = tl.load(slot_keys + (tl.multiple_of(base, G)[:, None] + j[None, :]),
                     mask=active[:, None], other=_EMPTY)
        ok = j[None, :] >= first[:, None]
        jfree = tl.min(tl.where(ok & ((kk == _EMPTY) | (kk == _TOMB)), j[None, :], G), axis=1)
        free_at = tl.where(active & (free_at < 0) & (jfree < G), base + jfree, free_at)
        jstop = tl.min(tl.where(ok & ((kk == k[:, None]) | (kk == _EMPTY)), j[None, :], G), axis=1)
        ended = active & (jstop < G)
        h = ended & (_pick(kk, j, jstop) == k)
        hit = hit | h
        slot = tl.where(h, base + jstop, slot)
        active = active & ~ended
        base = (base + G) & cmask
        first = first * 0
        steps += G
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap + G).to(tl.int32)
    tl.store(pos_out + offs, slot, mask=m)
    tl.store(from_out + offs, tl.where(valid & ~hit, free_at, -1), mask=m)
    lost = tl.sum((valid & ~hit & (free_at < 0)).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(fail_ptr, lost)


@triton.jit
def _claim_kernel(slot_keys, keys_ptr, from_ptr, pos_out, claimed_out, scratch, fail_ptr, n, cmask,
                  max_iters, BLOCK: tl.constexpr):
    """Second half: each absent key claims a slot from its `from` on (lanes of one key meet).

    claimed_out: the key on the one lane whose CAS inserted it, EMPTY elsewhere; its value is
    written later, once the new keys are ranked. Every slot before `from` on the path held
    another key at probe time and still does, so the key cannot be there.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    start = tl.load(from_ptr + offs, mask=m, other=-1)
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    active = m & (start >= 0)
    won, found, slot = _claim(slot_keys, k, active, tl.maximum(start, 0), cmask, max_iters,
                              scratch + offs)
    tl.store(pos_out + offs, slot, mask=found)
    tl.store(claimed_out + offs, tl.where(won, k, _EMPTY), mask=m)
    lost = tl.sum((active & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(fail_ptr, lost)


@triton.jit
def _assign_kernel(slot_keys, slot_vals, uniq, rows_out, n_uniq, free_rows, n_free, next_row, cmask,
                   cap, BLOCK: tl.constexpr, G: tl.constexpr):
    """The r-th claimed key (ascending) gets free_rows[r] while they last, then next_row + ...

    `uniq` is sorted and may start with one EMPTY (lanes that claimed nothing), skipped here.
    """
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < n_uniq
    key = tl.load(uniq + j, mask=m, other=_EMPTY)
    rank = j - (tl.load(uniq) == _EMPTY).to(tl.int64)
    active = m & (key != _EMPTY)
    from_free = active & (rank < n_free)
    row = tl.load(free_rows + rank, mask=from_free, other=0)
    row = tl.where(from_free, row, next_row + rank - n_free)
    found, slot = _locate(slot_keys, key, active, cmask, cap, G)
    tl.store(slot_vals + slot, row, mask=found)
    tl.store(rows_out + j, row, mask=m)


@triton.jit
def _gather_kernel(slot_vals, pos, out_ptr, n, BLOCK: tl.constexpr):
    """out[i] = slot_vals[pos[i]], -1 where pos is -1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    p = tl.load(pos + offs, mask=m, other=-1)
    tl.store(out_ptr + offs, tl.load(slot_vals + p, mask=m & (p >= 0), other=-1), mask=m)


def _check(slot_keys: torch.Tensor, slot_vals: torch.Tensor, *keys: torch.Tensor) -> int:
    """Validate the table and key tensors; return capacity - 1 (the probe mask)."""
    cap = slot_keys.numel()
    if cap == 0 or cap & (cap - 1):
        raise ValueError(f"capacity must be a power of two, got {cap}")
    for t in (slot_keys, slot_vals, *keys):
        if t.dtype != torch.int64:
            raise TypeError(f"hash-index tensors must be int64, got {t.dtype}")
        if not (t.is_cuda or _INTERPRET):
            raise ValueError(f"CUDA kernels got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError("hash-index tensors must be contiguous")
    if slot_vals.numel() != cap:
        raise ValueError("slot_keys and slot_vals must have the same length")
    return cap - 1


def _launch(n: int) -> dict[str, object]:
    """Grid and launch options for n lanes.

    BLOCK must cover every thread: a smaller block would replicate lanes over threads, and
    replicas of a CAS would not agree on its result.
    """
    if BLOCK < 32 * NUM_WARPS:
        raise ValueError(f"BLOCK={BLOCK} is smaller than the {32 * NUM_WARPS} threads of {NUM_WARPS} warps")
    return {"grid": (triton.cdiv(max(n, 1), BLOCK),), "BLOCK": BLOCK, "num_warps": NUM_WARPS}


def _group(cmask: int) -> int:
    return min(GROUP, cmask + 1)


def _scratch(n: int, device: torch.device) -> torch.Tensor:
    """One cell per lane for the no-op CAS of idle lanes (contents never matter)."""
    return torch.empty(n, dtype=torch.int64, device=device)


def _run(kernel: triton.JITFunction, n: int, *args: object, **meta: object) -> None:
    opts = _launch(n)
    kernel[opts.pop("grid")](*args, **opts, **meta)


def find(slot_keys: torch.Tensor, slot_vals: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Value per query, -1 where absent (sentinel queries are absent)."""
    cmask = _check(slot_keys, slot_vals, queries)
    out = torch.empty_like(queries)
    if queries.numel():
        _run(_find_kernel, queries.numel(), slot_keys, slot_vals, queries, out, queries.numel(),
             cmask, cmask + 1, G=_group(cmask))
    return out


def insert(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor,
           vals: torch.Tensor) -> None:
    """Insert unique, absent keys with their values, in place.

    Raises if a key found no free slot (the table was full: the caller grows it first).
    """
    cmask = _check(slot_keys, slot_vals, keys, vals)
    if vals.numel() != keys.numel():
        raise ValueError("keys and vals must have the same length")
    n = keys.numel()
    if not n:
        return
    fail = torch.zeros(1, dtype=torch.int32, device=keys.device)
    # A step passes an occupied slot or ends: at most capacity steps.
    _run(_insert_kernel, n, slot_keys, slot_vals, keys, vals, _scratch(n, keys.device), fail, n,
         cmask, cmask + 2)
    lost = int(fail.item())
    if lost:
        raise RuntimeError(f"hash index full: {lost} keys found no free slot")


def erase(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Erased value per key, -1 where absent; a repeated key is erased at its first occurrence."""
    cmask = _check(slot_keys, slot_vals, keys)
    n = keys.numel()
    out = torch.full_like(keys, -1)
    if not n:
        return out
    uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=keys.device), reduce="amin")
    erased = torch.empty_like(uniq)
    _run(_erase_kernel, uniq.numel(), slot_keys, slot_vals, uniq, erased, uniq.numel(), cmask,
         cmask + 1, G=_group(cmask))
    out[first] = erased
    return out


def _rows_for(count: int, free_rows: torch.Tensor, next_row: int) -> torch.Tensor:
    """Rows for `count` new keys: the free rows in order, then fresh rows from next_row."""
    take = free_rows[:count]
    if take.numel() == count:
        return take.clone()
    fresh = torch.arange(next_row, next_row + count - take.numel(), dtype=torch.int64,
                         device=free_rows.device)
    return torch.cat([take, fresh])


def find_or_insert(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor,
                   free_rows: torch.Tensor, next_row: int, fused: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row per key, inserting absent keys; returns (rows, new_keys, new_rows).

    new_keys are the distinct absent keys in ascending order; the r-th gets free_rows[r] while
    they last, then next_row + r - len(free_rows). Sentinel keys get -1 and are not inserted.
    Raises if the table had no free slot for a new key (the caller grows it beforehand).
    """
    cmask = _check(slot_keys, slot_vals, keys, free_rows)
    n = keys.numel()
    if not fused:
        out = find(slot_keys, slot_vals, keys)
        miss = (out < 0) & (keys != EMPTY_KEY) & (keys != TOMBSTONE_KEY)
        idx = miss.nonzero().squeeze(1)
        uniq, inv = torch.unique(keys[idx], sorted=True, return_inverse=True)
        rows = _rows_for(uniq.numel(), free_rows, next_row)
        insert(slot_keys, slot_vals, uniq, rows)
        out[idx] = rows[inv]
        return out, uniq, rows
    if not n:
        return torch.empty_like(keys), keys[:0].clone(), free_rows[:0].clone()
    pos = torch.empty_like(keys)
    start = torch.empty_like(keys)
    claimed = torch.empty_like(keys)
    fail = torch.zeros(1, dtype=torch.int32, device=keys.device)
    _run(_probe_kernel, n, slot_keys, keys, pos, start, fail, n, cmask, cmask + 1, G=_group(cmask))
    _run(_claim_kernel, n, slot_keys, keys, start, pos, claimed, _scratch(n, keys.device), fail, n,
         cmask, cmask + 2)
    uniq = torch.unique(claimed)  # sorted; keys only (no inverse), so a keys-only sort
    rows = torch.empty_like(uniq)
    _run(_assign_kernel, uniq.numel(), slot_keys, slot_vals, uniq, rows, uniq.numel(), free_rows,
         free_rows.numel(), next_row, cmask, cmask + 1, G=_group(cmask))
    out = torch.empty_like(keys)
    _run(_gather_kernel, n, slot_vals, pos, out, n)
    head, lost = torch.stack([uniq[0], fail[0].to(torch.int64)]).tolist()
    if lost:
        raise RuntimeError(f"hash index full: {lost} keys found no free slot")
    skip = int(head == EMPTY_KEY)
    return out, uniq[skip:], rows[skip:]
