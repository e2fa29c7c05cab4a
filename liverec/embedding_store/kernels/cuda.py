"""Triton kernels for the hash index on CUDA (the contract is in `kernels/__init__.py`).

Same layout, hash, sentinels and probing as the CPU kernels, so a table built on one backend
can be searched on the other. One lane per key, no per-key Python loop. A block keeps probing
while any of its lanes is unsettled; at the load factors the store allows (≤ 0.75) that is a
handful of dependent loads, so the kernels are bound by random-access latency, not bandwidth.

Concurrency: lanes of one insert launch race for free slots with `tl.atomic_cas` on the int64
slot key; a slot, once claimed, never changes within a launch, which is what makes the probe
of a losing lane correct when it simply re-reads the slot and carries on. Triton's
`atomic_cas` has no mask, so lanes that must not touch the table point their CAS at a private
scratch cell with compare == new value (a no-op).

`find_or_insert` is the store's hot path (find → dedup misses → allocate → insert) in two
variants that give the same key → row mapping as the CPU path: new keys get rows in sorted
order of the unique missed keys. `fused=False` is the literal composition of the contract's
functions (torch.unique on the misses); `fused=True` deduplicates inside the table itself
(duplicate lanes meet at the slot the first of them claims) and only sorts to rank new keys.
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

BLOCK = 64  # lanes per program; small blocks keep the longest probe in a block short
NUM_WARPS = 1

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
def _find_kernel(slot_keys, slot_vals, q_ptr, out_ptr, n, cmask, cap, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(q_ptr + offs, mask=m, other=_EMPTY)
    active = m & (q != _EMPTY) & (q != _TOMB)
    pos = _home(q, cmask)
    res = tl.full([BLOCK], -1, tl.int64)
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        k = tl.load(slot_keys + pos, mask=active, other=_EMPTY)
        hit = active & (k == q)
        v = tl.load(slot_vals + pos, mask=hit, other=-1)
        res = tl.where(hit, v, res)
        steps += 1
        active = active & (k != q) & (k != _EMPTY)
        pos = (pos + 1) & cmask
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap).to(tl.int32)
    tl.store(out_ptr + offs, res, mask=m)


@triton.jit
def _insert_kernel(slot_keys, slot_vals, keys_ptr, vals_ptr, sel_ptr, pos_out, won_out, scratch,
                   fail_ptr, n, cmask, cap,
                   HAS_VALS: tl.constexpr, HAS_SEL: tl.constexpr, WRITE_POS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Claim the first free slot (EMPTY or TOMBSTONE) on each selected key's probe path.

    Keys must be absent from the table at launch; duplicates within the launch are allowed:
    all lanes of one key walk the same path and meet at the slot the first of them claims
    (`won` marks that lane, `pos` is the slot for every lane).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    active = m & (k != _EMPTY) & (k != _TOMB)
    if HAS_SEL:
        active = active & (tl.load(sel_ptr + offs, mask=m, other=0) != 0)
    wanted = active
    pos = _home(k, cmask)
    won = tl.zeros([BLOCK], dtype=tl.int1)
    found = tl.zeros([BLOCK], dtype=tl.int1)
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        cur = tl.load(slot_keys + pos, mask=active, other=0)
        dup = active & (cur == k)
        free = active & ((cur == _EMPTY) | (cur == _TOMB))
        # Lanes with nothing to claim CAS their own scratch cell with cmp == new: a no-op.
        ptr = tl.where(free, slot_keys + pos, scratch + offs)
        cmp = tl.where(free, cur, 0)
        new = tl.where(free, k, 0)
        old = tl.atomic_cas(ptr, cmp, new, sem="relaxed")
        got = free & (old == cur)
        won = won | got
        found = found | got | dup
        # Occupied by another key: move on. A lost CAS re-reads the same slot next round.
        pos = tl.where(active & ~free & ~dup, (pos + 1) & cmask, pos)
        steps += 1
        active = active & ~(got | dup)
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap).to(tl.int32)
    if HAS_VALS:
        tl.store(slot_vals + pos, tl.load(vals_ptr + offs, mask=won, other=-1), mask=won)
    if WRITE_POS:
        tl.store(pos_out + offs, tl.where(found, pos, 0), mask=m)
        tl.store(won_out + offs, won.to(tl.int8), mask=m)
    lost = tl.sum((wanted & ~found).to(tl.int32), axis=0)
    if lost > 0:
        tl.atomic_add(fail_ptr, lost)


@triton.jit
def _erase_kernel(slot_keys, slot_vals, keys_ptr, out_ptr, n, cmask, cap, BLOCK: tl.constexpr):
    """Tombstone each key's slot (value reset to -1, as on the CPU); keys are unique here."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(keys_ptr + offs, mask=m, other=_EMPTY)
    active = m & (q != _EMPTY) & (q != _TOMB)
    pos = _home(q, cmask)
    res = tl.full([BLOCK], -1, tl.int64)
    steps = tl.program_id(0) * 0  # a scalar tensor: the interpreter mishandles python-int compares
    go = tl.max(active.to(tl.int32), axis=0)
    while go > 0:
        k = tl.load(slot_keys + pos, mask=active, other=_EMPTY)
        hit = active & (k == q)
        v = tl.load(slot_vals + pos, mask=hit, other=-1)
        res = tl.where(hit, v, res)
        tl.store(slot_keys + pos, tl.full([BLOCK], _TOMB, tl.int64), mask=hit)
        tl.store(slot_vals + pos, tl.full([BLOCK], -1, tl.int64), mask=hit)
        steps += 1
        active = active & (k != q) & (k != _EMPTY)
        pos = (pos + 1) & cmask
        go = tl.max(active.to(tl.int32), axis=0) * (steps < cap).to(tl.int32)
    tl.store(out_ptr + offs, res, mask=m)


@triton.jit
def _assign_kernel(sorted_perm, pos, slot_vals, out, n_new_ptr, free_rows, n_free, next_row, n,
                   BLOCK: tl.constexpr):
    """Give the r-th new key (sorted order) row free_rows[r], else next_row + r - n_free."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    start = n - tl.load(n_new_ptr)
    m = (j < n) & (j >= start)
    rank = j - start
    from_free = m & (rank < n_free)
    row = tl.load(free_rows + rank, mask=from_free, other=0)
    row = tl.where(from_free, row, next_row + rank - n_free)
    lane = tl.load(sorted_perm + j, mask=m, other=0)
    p = tl.load(pos + lane, mask=m, other=0)
    tl.store(slot_vals + p, row, mask=m)
    tl.store(out + j, row, mask=m)


@triton.jit
def _gather_kernel(slot_vals, pos, sel_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[i] = slot_vals[pos[i]] for the selected (missed) lanes."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    sel = m & (tl.load(sel_ptr + offs, mask=m, other=0) != 0)
    p = tl.load(pos + offs, mask=sel, other=0)
    v = tl.load(slot_vals + p, mask=sel, other=-1)
    tl.store(out_ptr + offs, v, mask=sel)


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


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(max(n, 1), BLOCK),)


def find(slot_keys: torch.Tensor, slot_vals: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Value per query, -1 where absent (sentinel queries are absent)."""
    cmask = _check(slot_keys, slot_vals, queries)
    out = torch.empty_like(queries)
    if queries.numel():
        _find_kernel[_grid(queries.numel())](slot_keys, slot_vals, queries, out, queries.numel(),
                                             cmask, cmask + 1, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def _launch_insert(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor,
                   vals: torch.Tensor | None, sel: torch.Tensor | None,
                   want_pos: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = keys.numel()
    cmask = slot_keys.numel() - 1
    dev = keys.device
    scratch = torch.zeros(n, dtype=torch.int64, device=dev)
    fail = torch.zeros(1, dtype=torch.int32, device=dev)
    pos = torch.empty(n if want_pos else 1, dtype=torch.int64, device=dev)
    won = torch.empty(n if want_pos else 1, dtype=torch.int8, device=dev)
    if n:
        # A lost CAS retries the same slot, so allow capacity advances plus one loss per lane.
        _insert_kernel[_grid(n)](
            slot_keys, slot_vals, keys, keys if vals is None else vals,
            keys if sel is None else sel, pos, won, scratch, fail, n, cmask, cmask + 1 + n,
            HAS_VALS=vals is not None, HAS_SEL=sel is not None, WRITE_POS=want_pos,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return pos, won, fail


def insert(slot_keys: torch.Tensor, slot_vals: torch.Tensor, keys: torch.Tensor,
           vals: torch.Tensor) -> None:
    """Insert unique, absent keys with their values, in place.

    Raises if a key found no free slot (the table was full: the caller grows it first).
    """
    _check(slot_keys, slot_vals, keys, vals)
    if vals.numel() != keys.numel():
        raise ValueError("keys and vals must have the same length")
    _, _, fail = _launch_insert(slot_keys, slot_vals, keys, vals, None, want_pos=False)
    if int(fail.item()):
        raise RuntimeError(f"hash index full: {int(fail.item())} keys found no free slot")


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
    _erase_kernel[_grid(uniq.numel())](slot_keys, slot_vals, uniq, erased, uniq.numel(), cmask,
                                       cmask + 1, BLOCK=BLOCK, num_warps=NUM_WARPS)
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
    out = find(slot_keys, slot_vals, keys)
    valid = (keys != EMPTY_KEY) & (keys != TOMBSTONE_KEY)
    miss = (out < 0) & valid
    if not fused:
        idx = miss.nonzero().squeeze(1)
        uniq, inv = torch.unique(keys[idx], sorted=True, return_inverse=True)
        rows = _rows_for(uniq.numel(), free_rows, next_row)
        insert(slot_keys, slot_vals, uniq, rows)
        out[idx] = rows[inv]
        return out, uniq, rows
    if not n:
        return out, keys[:0], free_rows[:0].clone()
    pos, won, fail = _launch_insert(slot_keys, slot_vals, keys, None, miss, want_pos=True)
    wkeys = torch.where(won.bool(), keys, torch.full_like(keys, EMPTY_KEY))
    sorted_keys, perm = torch.sort(wkeys)
    n_new = won.sum(dtype=torch.int64).reshape(1)
    new_rows_full = torch.empty_like(keys)
    _assign_kernel[_grid(n)](perm, pos, slot_vals, new_rows_full, n_new, free_rows,
                             free_rows.numel(), next_row, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _gather_kernel[_grid(n)](slot_vals, pos, miss, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    n_new_i, fail_i = torch.cat([n_new, fail.to(torch.int64)]).tolist()
    if fail_i:
        raise RuntimeError(f"hash index full: {fail_i} keys found no free slot")
    del cmask
    return out, sorted_keys[n - n_new_i:], new_rows_full[n - n_new_i:]
