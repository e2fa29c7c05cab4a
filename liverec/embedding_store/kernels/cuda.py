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
`fused=True` finds and claims in one kernel, deduplicating inside the table itself (lanes of
one key meet at the slot the first of them claims) and appending each new key once to a
list; after one host sync that list is sorted, and a second kernel gives each lane of a new
key the row of its rank, writing it to the slot and the output.
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
def _scan(slot_keys, base, first, k, active, G: tl.constexpr, FREE_STOPS: tl.constexpr):
    """Look at slots base + first .. base + G - 1 (one aligned group) in probe order.

    Returns (jstop, held, jfree): the first j holding k or EMPTY (or, if FREE_STOPS, k, EMPTY
    or TOMBSTONE), G if none, with the key held there; and the first j holding EMPTY or
    TOMBSTONE, G if none. The G loads are independent (one sector), so they overlap.
    """
    jstop = first * 0 + G
    jfree = jstop
    held = k * 0
    for jj in tl.static_range(G):
        kj = tl.load(slot_keys + (base + jj), mask=active, other=_EMPTY)
        ok = first <= jj
        free = (kj == _EMPTY) | (kj == _TOMB)
        if FREE_STOPS:
            stop = ok & (jstop == G) & ((kj == k) | free)
        else:
            stop = ok & (jstop == G) & ((kj == k) | (kj == _EMPTY))
        held = tl.where(stop, kj, held)
        jstop = tl.where(stop, jj, jstop)
        jfree = tl.where(ok & free & (jfree == G), jj, jfree)
    return jstop, held, jfree


@triton.jit
def _locate(slot_keys, q, active, cmask, cap, G: tl.constexpr):
    """(found, slot) of each active query: walk G-slot groups to the key or an EMPTY slot."""
    home = _home(q, cmask)
    base = home & -G
    first = home - base
    found = active & (q != q)
    slot = home * 0
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        jstop, held, jfree = _scan(slot_keys, base, first, q, active, G, False)
        ended = active & (jstop < G)
        hit = ended & (held == q)
        found = found | hit
        slot = tl.where(hit, base + jstop, slot)
        active = active & ~ended
        base = (base + G) & cmask
        first = first * 0
        steps += G
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap + G).to(tl.int32)
    return found, slot


@triton.jit
def _claim(slot_keys, k, active, base, first, cmask, max_iters, scratch_ptr, G: tl.constexpr):
    """Claim the first free slot (EMPTY or TOMBSTONE) from base + first on, or meet k there.

    k must be absent from the table at launch, and every slot before base + first on its path
    must hold another key. Lanes of one key walk the same path and meet at the slot the first
    of them claims. Returns (won, found, slot): won marks the lane whose CAS put k there, found
    every lane that ended at k's slot. A lost CAS returns the slot's new key, so the lane
    decides from that (k: met; another key: walk on) without re-reading the slot.

    All tensors here are 1-D with one lane per thread: after a cross-thread reduction Triton
    may replicate a lane over several threads, and replicas of one CAS disagree on its result.
    """
    won = active & (k != k)
    found = won
    slot = k * 0
    steps = tl.program_id(0) * 0
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        jstop, held, jfree = _scan(slot_keys, base, first, k, active, G, True)
        at = active & (jstop < G)
        free = at & (held != k)
        s = base + jstop
        old = held
        if tl.max(free.to(tl.int32), axis=0) > 0:
            old = _cas(slot_keys + s, held, k, free, scratch_ptr)
        got = free & (old == held)
        met = at & ~got & ((held == k) | (old == k))
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
                   BLOCK: tl.constexpr, G: tl.constexpr):
    """Insert unique, absent keys: each claims the first free slot on its probe path."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    active = m & (k != _EMPTY) & (k != _TOMB)
    home = _home(k, cmask)
    base = home & -G
    won, found, slot = _claim(slot_keys, k, active, base, home - base, cmask, max_iters,
                              scratch + offs, G)
    tl.store(slot_vals + slot, tl.load(vals_ptr + offs, mask=won, other=-1), mask=won)
    lost = tl.sum((active & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(fail_ptr, lost)


@triton.jit
def _find_or_claim_kernel(slot_keys, slot_vals, keys_ptr, out_ptr, pos_out, fresh_out, new_keys,
                          counter, scratch, n, cmask, cap, max_iters,
                          BLOCK: tl.constexpr, G: tl.constexpr):
    """First half of find_or_insert: find each key, or claim a slot for it.

    A present key's value goes to out. For a new key: out = -1, fresh = 1, pos = its slot,
    and the one lane whose CAS inserted it appends it to new_keys (counter[0] counts them;
    counter[1] counts keys that found no free slot). Its value is negative until the rows
    are ranked (-1 as a free slot, then -2 - index), so a lane that meets a key another lane
    claimed in this launch knows it is new: free slots always hold -1 (the kernels and the
    index keep it so) and stored values (rows) are >= 0.
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
    free_at = slot - 1  # first free slot on the path: where an absent key claims
    steps = tl.program_id(0) * 0
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        jstop, held, jfree = _scan(slot_keys, base, first, k, active, G, False)
        free_at = tl.where(active & (free_at < 0) & (jfree < G), base + jfree, free_at)
        ended = active & (jstop < G)
        h = ended & (held == k)
        hit = hit | h
        slot = tl.where(h, base + jstop, slot)
        active = active & ~ended
        base = (base + G) & cmask
        first = first * 0
        steps += G
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap + G).to(tl.int32)
    val = tl.load(slot_vals + slot, mask=hit, other=-1)
    # Every slot before free_at held another key and still does, so k cannot be there.
    claim = valid & ~hit & (free_at >= 0)
    cbase = free_at & -G
    won, found, cslot = _claim(slot_keys, k, claim, cbase, free_at - cbase, cmask, max_iters,
                               scratch + offs, G)
    fresh = (hit & (val < 0)) | found
    tl.store(out_ptr + offs, tl.where(fresh, -1, val), mask=m)
    tl.store(pos_out + offs, tl.where(found, cslot, slot), mask=m)
    tl.store(fresh_out + offs, fresh.to(tl.int8), mask=m)
    n_won = tl.sum(won.to(tl.int32), axis=0)
    at = n_won * 0
    if n_won > 0:
        at = tl.atomic_add(counter, n_won)
    idx = at + tl.cumsum(won.to(tl.int32), axis=0) - 1
    tl.store(new_keys + idx, k, mask=won)
    # The slot's value says where the key sits in new_keys (-2 - idx) until its row is known.
    tl.store(slot_vals + cslot, -2 - idx.to(tl.int64), mask=won)
    lost = tl.sum((valid & ~hit & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(counter + 1, lost)


@triton.jit
def _finish_kernel(slot_vals, pos, fresh_ptr, rank_of, free_rows, n_free, next_row, out_ptr,
                   new_rows, n, BLOCK: tl.constexpr):
    """Second half: give each new key its row, from its rank among the sorted new keys.

    A new key's slot holds -2 - (its index in new_keys) until a lane of it writes the row;
    every lane of the key reads either, derives the same row and writes it to the slot, to
    out and to new_rows[rank]: no lane waits for another.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    fresh = m & (tl.load(fresh_ptr + offs, mask=m, other=0) != 0)
    p = tl.load(pos + offs, mask=fresh, other=0)
    v = tl.load(slot_vals + p, mask=fresh, other=-1)
    coded = fresh & (v <= -2)
    rank = tl.load(rank_of + (-2 - v), mask=coded, other=0)
    from_free = coded & (rank < n_free)
    row = tl.load(free_rows + rank, mask=from_free, other=0)
    row = tl.where(coded, tl.where(from_free, row, next_row + rank - n_free), v)
    ok = fresh & (row >= 0)
    tl.store(slot_vals + p, row, mask=ok)
    tl.store(out_ptr + offs, row, mask=ok)
    tl.store(new_rows + rank, row, mask=coded)


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


def _max_claim_steps(cmask: int) -> int:
    """A claim step leaves a group or passes a slot: capacity + capacity / G steps at most."""
    return 2 * (cmask + 1) + 2


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
    _run(_insert_kernel, n, slot_keys, slot_vals, keys, vals, _scratch(n, keys.device), fail, n,
         cmask, _max_claim_steps(cmask), G=_group(cmask))
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
    Raises if the table had no free slot for a new key (the caller grows it beforehand); the
    fused path then erases what it claimed. The fused path relies on stored values (rows)
    being >= 0 and free slots holding -1, as every kernel and HashIndex keep them.
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
    dev = keys.device
    out = torch.empty_like(keys)
    pos = torch.empty_like(keys)
    fresh = torch.empty(n, dtype=torch.int8, device=dev)
    new_keys = torch.empty_like(keys)
    counter = torch.zeros(2, dtype=torch.int32, device=dev)
    _run(_find_or_claim_kernel, n, slot_keys, slot_vals, keys, out, pos, fresh, new_keys, counter,
         _scratch(n, dev), n, cmask, cmask + 1, _max_claim_steps(cmask), G=_group(cmask))
    # The one host sync. Sorting only the new keys after it beats sorting a padded batch-sized
    # list without it when few keys are new (the usual case in training: the sort's launches,
    # not its bytes, dominate on the host), and it was no slower at half the batch new.
    n_new, lost = counter.tolist()
    if lost:
        erase(slot_keys, slot_vals, new_keys[:n_new])  # undo the claims: no half-made keys stay
        raise RuntimeError(f"hash index full: {lost} keys found no free slot")
    new_keys, order = torch.sort(new_keys[:n_new])
    new_rows = torch.empty_like(new_keys)
    if n_new:
        rank_of = torch.empty_like(order).scatter_(0, order, torch.arange(n_new, device=dev))
        _run(_finish_kernel, n, slot_vals, pos, fresh, rank_of, free_rows, free_rows.numel(),
             next_row, out, new_rows, n)
    return out, new_keys, new_rows
