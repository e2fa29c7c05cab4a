"""Triton kernels for the hash index on CUDA (the contract is in `kernels/__init__.py`).

Same layout (int32 slots of row ids, keys per row), hash, sentinels and probing order as the CPU
kernels, so a table built on one backend can be searched on the other. One lane per key, no
per-key Python loop.

Probing reads the slot array in aligned groups of G = 8 slots (one 32-byte DRAM sector) and
takes the first slot of the group, from the home slot on, that ends the probe. For each
occupied slot before the group's first EMPTY the lane loads the row's key; those loads depend
only on the group's slot values, so they are issued together rather than one after another.
That is exactly linear probing, but a probe of length L costs about L / 8 dependent slot loads
plus one round of key loads per group: a hash lookup is bound by the latency of those loads,
and a block waits for its slowest lane.

Concurrency: lanes of one launch race for free slots with a compare-and-swap on the int32 slot.
A slot, once claimed, never changes within a launch, so a lane that loses the race learns the
winner's value from the CAS and either has met its own key or walks on. Triton's `atomic_cas`
has no mask: idle lanes CAS a private scratch cell with compare == new (a no-op).

`find_or_insert` (find -> dedup misses -> allocate -> insert) gives the CPU path's key -> row
mapping: the r-th new key in order of first occurrence in the batch gets the r-th row.
`fused=False` composes the contract's functions literally (a deduplication of the misses).
`fused=True` finds and claims in one kernel, deduplicating inside the table itself: a lane
claims a free slot by writing the pending code -3 - lane, from which any lane that meets it
reads the claimed key (keys[lane]); lanes of one key meet at the slot the first of them claims.
Every lane of a new key then takes an atomic min of its own index into the claiming lane's
cell, so that cell ends up holding the key's first occurrence; a flag per first occurrence and
a prefix sum over the batch rank the new keys, and a last kernel gives each lane of a new key
the row of its rank, writing it to the slot, the row's key and the output. All of it is queued
without waiting; the one host sync, for the count of new keys, comes at the end.
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

from liverec.embedding_store.kernels import (
    EMPTY_KEY,
    SLOT_DTYPE,
    TOMBSTONE_KEY,
    TOMBSTONE_SLOT,
    distinct_in_first_seen_order,
)

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly); used to test without a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK = 64  # lanes per program: small blocks keep the slowest lane's probe from idling many
NUM_WARPS = 1
GROUP = 8  # slots read per probe step: 8 x int32 = one 32-byte sector

_EMPTY = tl.constexpr(EMPTY_KEY)
_TOMB = tl.constexpr(TOMBSTONE_KEY)


@triton.jit
def _home(k, cmask):
    """splitmix64(k) & cmask, in uint64 arithmetic (wrapping multiply, logical shifts).

    cmask must arrive as a tensor: the kernels that take it say do_not_specialize, since Triton
    passes an int argument equal to 1 (a 2-slot table's mask) as a Python constant, which has no
    `.to`; that table's kernels failed to compile."""
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
def _key_at(row_keys, keys_ptr, v, want, PENDING: tl.constexpr):
    """The key a slot value stands for, where `want`: row_keys[v] for a row; keys[-3 - v] for a
    claim pending in this launch (PENDING only); EMPTY for a free slot."""
    key = tl.load(row_keys + v.to(tl.int64), mask=want & (v >= 0), other=_EMPTY)
    if PENDING:
        claimed = tl.load(keys_ptr + (-3 - v).to(tl.int64), mask=want & (v <= -3), other=_EMPTY)
        key = tl.where(v <= -3, claimed, key)
    return key


@triton.jit
def _scan(slots, row_keys, keys_ptr, base, first, k, active, G: tl.constexpr, FREE_STOPS: tl.constexpr,
          PENDING: tl.constexpr):
    """Look at slots base + first .. base + G - 1 (one aligned group) in probe order.

    Returns (jstop, vstop, kstop, jfree): the first j whose slot holds k or is EMPTY (or, if
    FREE_STOPS, holds k or is EMPTY or TOMBSTONE), G if none, with the slot value there and
    whether it is k's; and the first j that is EMPTY or TOMBSTONE, G if none. Keys are loaded
    only for occupied slots before the group's first EMPTY; the G slot loads are one sector.
    """
    jstop = first * 0 + G
    jfree = jstop
    vstop = (first * 0 - 1).to(tl.int32)
    kstop = active & (k != k)
    open_ = active
    for jj in tl.static_range(G):
        v = tl.load(slots + (base + jj), mask=active, other=-1)
        ok = first <= jj
        kj = _key_at(row_keys, keys_ptr, v, open_ & ok & (v != -2), PENDING)
        is_k = ok & (v != -1) & (v != -2) & (kj == k)
        empty = ok & (v == -1)
        free = empty | (ok & (v == -2))
        if FREE_STOPS:
            stop = (jstop == G) & (is_k | free)
        else:
            stop = (jstop == G) & (is_k | empty)
        vstop = tl.where(stop, v, vstop)
        kstop = kstop | (stop & is_k)
        jstop = tl.where(stop, jj, jstop)
        jfree = tl.where(free & (jfree == G), jj, jfree)
        open_ = open_ & ~empty
    return jstop, vstop, kstop, jfree


@triton.jit
def _locate(slots, row_keys, q, active, cmask, cap, G: tl.constexpr):
    """(found, slot, row) of each active query: walk G-slot groups to the key or an EMPTY slot."""
    home = _home(q, cmask)
    base = home & -G
    first = home - base
    found = active & (q != q)
    slot = home * 0
    row = (home * 0 - 1).to(tl.int32)
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        jstop, vstop, kstop, jfree = _scan(slots, row_keys, row_keys, base, first, q, active, G, False, False)
        ended = active & (jstop < G)
        hit = ended & kstop
        found = found | hit
        slot = tl.where(hit, base + jstop, slot)
        row = tl.where(hit, vstop, row)
        active = active & ~ended
        base = (base + G) & cmask
        first = first * 0
        steps += G
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap + G).to(tl.int32)
    return found, slot, row


@triton.jit
def _claim(slots, row_keys, keys_ptr, k, claim_val, active, base, first, cmask, max_iters, scratch_ptr,
           G: tl.constexpr, PENDING: tl.constexpr):
    """Claim the first free slot (EMPTY or TOMBSTONE) from base + first on with claim_val, or
    meet k there.

    k must be absent from the table at launch, and every slot before base + first on its path
    must hold another key. Lanes of one key (PENDING: claim_val a pending code) walk the same
    path and meet at the slot the first of them claims. Returns (won, found, slot): won marks
    the lane whose CAS claimed the slot, found every lane that ended at k's slot. A lost CAS
    returns the slot's new value, so the lane decides from that (k's: met; another key's: walk
    on) without re-reading the slot.

    All tensors here are 1-D with one lane per thread: after a cross-thread reduction Triton
    may replicate a lane over several threads, and replicas of one CAS disagree on its result.
    """
    won = active & (k != k)
    found = won
    slot = k * 0
    steps = tl.program_id(0) * 0
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        jstop, vstop, kstop, jfree = _scan(slots, row_keys, keys_ptr, base, first, k, active, G, True, PENDING)
        at = active & (jstop < G)
        free = at & ~kstop
        s = base + jstop
        old = vstop
        if tl.max(free.to(tl.int32), axis=0) > 0:
            old = _cas(slots + s, vstop, claim_val, free, scratch_ptr)
        got = free & (old == vstop)
        met = at & ~got & kstop
        if PENDING:
            lost = free & ~got
            met = met | (lost & (_key_at(row_keys, keys_ptr, old, lost, PENDING) == k))
        won = won | got
        found = found | got | met
        slot = tl.where(got | met, s, slot)
        # Walk on past a group with no stop, or past a slot another key just took.
        nxt = tl.where(at, jstop + 1, G)
        moved = nxt >= G
        first = tl.where(moved, 0, nxt)
        base = tl.where(moved, (base + G) & cmask, base)
        active = active & ~(got | met)
        steps += 1
        go = tl.max(active.to(tl.int32), axis=0) * (steps < max_iters).to(tl.int32)
    return won, found, slot


@triton.jit(do_not_specialize=["cmask"])
def _find_kernel(slots, row_keys, q_ptr, out_ptr, n, cmask, cap, BLOCK: tl.constexpr, G: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(q_ptr + offs, mask=m, other=_EMPTY)
    found, slot, row = _locate(slots, row_keys, q, m & (q != _EMPTY) & (q != _TOMB), cmask, cap, G)
    tl.store(out_ptr + offs, tl.where(found, row.to(tl.int64), -1), mask=m)


@triton.jit(do_not_specialize=["cmask"])
def _erase_kernel(slots, row_keys, keys_ptr, out_ptr, n, cmask, cap, BLOCK: tl.constexpr, G: tl.constexpr):
    """Tombstone each key's slot and free its row's key (EMPTY); keys are unique here."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    found, slot, row = _locate(slots, row_keys, q, m & (q != _EMPTY) & (q != _TOMB), cmask, cap, G)
    row64 = row.to(tl.int64)
    tl.store(out_ptr + offs, tl.where(found, row64, -1), mask=m)
    tl.store(slots + slot, tl.full([BLOCK], -2, tl.int32), mask=found)
    tl.store(row_keys + row64, tl.full([BLOCK], _EMPTY, tl.int64), mask=found)


@triton.jit(do_not_specialize=["cmask"])
def _insert_kernel(slots, row_keys, keys_ptr, rows_ptr, scratch, fail_ptr, n, cmask, max_iters,
                   BLOCK: tl.constexpr, G: tl.constexpr):
    """Insert unique, absent keys (their row_keys already written): each claims the first free
    slot on its probe path with its row."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    r = tl.load(rows_ptr + offs, mask=m, other=-1).to(tl.int32)
    active = m & (k != _EMPTY) & (k != _TOMB)
    home = _home(k, cmask)
    base = home & -G
    won, found, slot = _claim(slots, row_keys, keys_ptr, k, r, active, base, home - base, cmask, max_iters,
                              scratch + offs, G, False)
    lost = tl.sum((active & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(fail_ptr, lost)


@triton.jit(do_not_specialize=["cmask"])
def _find_or_claim_kernel(slots, row_keys, keys_ptr, out_ptr, pos_out, fresh_out, lost_ptr, scratch, n, cmask,
                          cap, max_iters, BLOCK: tl.constexpr, G: tl.constexpr):
    """First part of find_or_insert: find each key, or claim a slot for it.

    A present key's row goes to out. For a new key: out = -1, fresh = 1, pos = its slot; lost
    counts keys that found no free slot. The slot holds the pending code -3 - (claiming lane)
    until the rows are ranked, so a lane that meets a key another lane claimed in this launch
    knows it is new: stored rows are >= 0.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    valid = m & (k != _EMPTY) & (k != _TOMB)
    home = _home(k, cmask)
    base = home & -G
    first = home - base
    active = valid
    hit = valid & (k != k)
    slot = home * 0
    val = (home * 0 - 1).to(tl.int32)
    free_at = slot - 1  # first free slot on the path: where an absent key claims
    steps = tl.program_id(0) * 0
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        jstop, vstop, kstop, jfree = _scan(slots, row_keys, keys_ptr, base, first, k, active, G, False, True)
        free_at = tl.where(active & (free_at < 0) & (jfree < G), base + jfree, free_at)
        ended = active & (jstop < G)
        h = ended & kstop
        hit = hit | h
        slot = tl.where(h, base + jstop, slot)
        val = tl.where(h, vstop, val)
        active = active & ~ended
        base = (base + G) & cmask
        first = first * 0
        steps += G
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap + G).to(tl.int32)
    # Every slot before free_at held another key and still does, so k cannot be there.
    claim = valid & ~hit & (free_at >= 0)
    cbase = free_at & -G
    won, found, cslot = _claim(slots, row_keys, keys_ptr, k, (-3 - offs).to(tl.int32), claim, cbase,
                               free_at - cbase, cmask, max_iters, scratch + offs, G, True)
    fresh = (hit & (val < 0)) | found
    tl.store(out_ptr + offs, tl.where(fresh, -1, val.to(tl.int64)), mask=m)
    tl.store(pos_out + offs, tl.where(found, cslot, slot), mask=m)
    tl.store(fresh_out + offs, fresh.to(tl.int8), mask=m)
    lost = tl.sum((valid & ~hit & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(lost_ptr, lost)


@triton.jit
def _pending_claim(slots, pos, fresh_ptr, offs, m):
    """(the lanes of new keys, those whose slot still holds a pending code, the claiming lane
    there, the slot's value)."""
    fresh = m & (tl.load(fresh_ptr + offs, mask=m, other=0) != 0)
    v = tl.load(slots + tl.load(pos + offs, mask=fresh, other=0), mask=fresh, other=-1)
    coded = fresh & (v <= -3)
    return fresh, coded, (-3 - v).to(tl.int64), v


@triton.jit
def _first_lane_kernel(slots, pos, fresh_ptr, first_lane, n, BLOCK: tl.constexpr):
    """first_lane[claiming lane] = the smallest lane of that key (atomic min; cells start at n)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _fresh, coded, claimer, _v = _pending_claim(slots, pos, fresh_ptr, offs, offs < n)
    tl.atomic_min(first_lane + claimer, offs.to(tl.int32), mask=coded, sem="relaxed")


@triton.jit
def _first_flag_kernel(slots, pos, fresh_ptr, first_lane, flag, n, BLOCK: tl.constexpr):
    """flag[lane] = 1 where the lane is its new key's first occurrence, else 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _fresh, coded, claimer, _v = _pending_claim(slots, pos, fresh_ptr, offs, m)
    first = tl.load(first_lane + claimer, mask=coded, other=-1)
    tl.store(flag + offs, (coded & (first == offs)).to(tl.int32), mask=m)


@triton.jit
def _finish_kernel(slots, row_keys, keys_ptr, pos, fresh_ptr, first_lane, ranks, free_rows, n_free, next_row,
                   out_ptr, new_keys, new_rows, n, BLOCK: tl.constexpr):
    """Last part: give each new key the row of its rank (ranks: inclusive prefix sum of the
    first-occurrence flags, read at the key's first lane).

    A new key's slot holds -3 - (claiming lane) until a lane of the key writes the row; every
    lane of the key reads either, derives the same row and writes it to the slot, to the row's
    key, to out and (having read the code) to new_keys / new_rows[rank]: no lane waits for another.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    fresh, coded, claimer, v = _pending_claim(slots, pos, fresh_ptr, offs, m)
    first = tl.load(first_lane + claimer, mask=coded, other=0).to(tl.int64)
    rank = tl.load(ranks + first, mask=coded, other=1).to(tl.int64) - 1
    from_free = coded & (rank < n_free)
    row = tl.load(free_rows + rank, mask=from_free, other=0)
    row = tl.where(coded, tl.where(from_free, row, next_row + rank - n_free), v.to(tl.int64))
    ok = fresh & (row >= 0)
    k = tl.load(keys_ptr + offs, mask=ok, other=_EMPTY)
    p = tl.load(pos + offs, mask=ok, other=0)
    tl.store(slots + p, row.to(tl.int32), mask=ok)
    tl.store(row_keys + row, k, mask=ok)
    tl.store(out_ptr + offs, row, mask=ok)
    tl.store(new_keys + rank, k, mask=coded)
    tl.store(new_rows + rank, row, mask=coded)


def capacity_at_least(slots: int) -> int:
    """Slot count for at least `slots`: the next power of two (the probe wraps with a mask)."""
    return 1 << max(int(slots) - 1, 1).bit_length()


def _check(slots: torch.Tensor, row_keys: torch.Tensor, *keys: torch.Tensor) -> int:
    """Validate the table and key tensors; return capacity - 1 (the probe mask)."""
    cap = slots.numel()
    if cap == 0 or cap & (cap - 1):
        raise ValueError(f"capacity must be a power of two, got {cap}")
    if slots.dtype != SLOT_DTYPE:
        raise TypeError(f"slots must be {SLOT_DTYPE}, got {slots.dtype}")
    for t in (row_keys, *keys):
        if t.dtype != torch.int64:
            raise TypeError(f"keys and rows must be int64, got {t.dtype}")
    for t in (slots, row_keys, *keys):
        if not (t.is_cuda or _INTERPRET):
            raise ValueError(f"CUDA kernels got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError("hash-index tensors must be contiguous")
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


def _max_claim_steps(cmask: int) -> int:
    """A claim step leaves a group or passes a slot: capacity + capacity / G steps at most."""
    return 2 * (cmask + 1) + 2


def _scratch(n: int, device: torch.device) -> torch.Tensor:
    """One cell per lane for the no-op CAS of idle lanes (contents never matter)."""
    return torch.empty(n, dtype=SLOT_DTYPE, device=device)


def _run(kernel: triton.JITFunction, n: int, *args: object, **meta: object) -> None:
    opts = _launch(n)
    kernel[opts.pop("grid")](*args, **opts, **meta)


def find(slots: torch.Tensor, row_keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Row per query, -1 where absent (sentinel queries are absent)."""
    cmask = _check(slots, row_keys, queries)
    out = torch.empty_like(queries)
    if queries.numel():
        _run(_find_kernel, queries.numel(), slots, row_keys, queries, out, queries.numel(), cmask, cmask + 1,
             G=_group(cmask))
    return out


def insert(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> None:
    """Insert unique, absent keys at their rows, in place.

    Raises if a key found no free slot (the table was full: the caller grows it first); the
    rows of the keys that found none get their key cleared again.
    """
    cmask = _check(slots, row_keys, keys, rows)
    if rows.numel() != keys.numel():
        raise ValueError("keys and rows must have the same length")
    n = keys.numel()
    if not n:
        return
    row_keys[rows] = keys  # before the launch: lanes probing past a claimed slot read its key
    fail = torch.zeros(1, dtype=torch.int32, device=keys.device)
    _run(_insert_kernel, n, slots, row_keys, keys, rows, _scratch(n, keys.device), fail, n, cmask,
         _max_claim_steps(cmask), G=_group(cmask))
    lost = int(fail.item())
    if lost:
        row_keys[rows[find(slots, row_keys, keys) < 0]] = EMPTY_KEY
        raise RuntimeError(f"hash index full: {lost} keys found no free slot")


def erase(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Erased row per key, -1 where absent; a repeated key is erased at its first occurrence."""
    cmask = _check(slots, row_keys, keys)
    n = keys.numel()
    out = torch.full_like(keys, -1)
    if not n:
        return out
    uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=keys.device), reduce="amin")
    erased = torch.empty_like(uniq)
    _run(_erase_kernel, uniq.numel(), slots, row_keys, uniq, erased, uniq.numel(), cmask, cmask + 1,
         G=_group(cmask))
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


def find_or_insert(slots: torch.Tensor, row_keys: torch.Tensor, keys: torch.Tensor,
                   free_rows: torch.Tensor, next_row: int, fused: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row per key, inserting absent keys; returns (rows, new_keys, new_rows).

    new_keys are the distinct absent keys in the order of their first occurrence in keys; the
    r-th gets free_rows[r] while they last, then next_row + r - len(free_rows). Sentinel keys
    get -1 and are not inserted. row_keys must already have a row for every row this can hand
    out. Raises if the table had no free slot for a new key (the caller grows it beforehand);
    the fused path then erases the keys it inserted, so no half-made key stays.
    """
    cmask = _check(slots, row_keys, keys, free_rows)
    n = keys.numel()
    if not fused:
        out = find(slots, row_keys, keys)
        miss = (out < 0) & (keys != EMPTY_KEY) & (keys != TOMBSTONE_KEY)
        idx = miss.nonzero().squeeze(1)
        uniq, inv = distinct_in_first_seen_order(keys[idx])
        rows = _rows_for(uniq.numel(), free_rows, next_row)
        insert(slots, row_keys, uniq, rows)
        out[idx] = rows[inv]
        return out, uniq, rows
    if not n:
        return torch.empty_like(keys), keys[:0].clone(), free_rows[:0].clone()
    dev = keys.device
    out = torch.empty_like(keys)
    pos = torch.empty_like(keys)
    fresh = torch.empty(n, dtype=torch.int8, device=dev)
    lost = torch.zeros(1, dtype=torch.int32, device=dev)
    _run(_find_or_claim_kernel, n, slots, row_keys, keys, out, pos, fresh, lost, _scratch(n, dev), n, cmask,
         cmask + 1, _max_claim_steps(cmask), G=_group(cmask))
    first_lane = torch.full((n,), n, dtype=torch.int32, device=dev)
    _run(_first_lane_kernel, n, slots, pos, fresh, first_lane, n)
    flag = torch.empty(n, dtype=torch.int32, device=dev)
    _run(_first_flag_kernel, n, slots, pos, fresh, first_lane, flag, n)
    ranks = torch.cumsum(flag, 0, dtype=torch.int32)
    new_keys = torch.empty_like(keys)
    new_rows = torch.empty_like(keys)
    _run(_finish_kernel, n, slots, row_keys, keys, pos, fresh, first_lane, ranks, free_rows, free_rows.numel(),
         next_row, out, new_keys, new_rows, n)
    # The one host sync, after everything is queued: how many keys are new, and were any lost.
    n_new, n_lost = torch.cat([ranks[-1:], lost]).tolist()
    if n_lost:
        slots[pos[fresh.bool()]] = TOMBSTONE_SLOT  # erase what this call inserted: no half-made keys stay
        row_keys[new_rows[:n_new]] = EMPTY_KEY
        raise RuntimeError(f"hash index full: {n_lost} keys found no free slot")
    return out, new_keys[:n_new], new_rows[:n_new]
