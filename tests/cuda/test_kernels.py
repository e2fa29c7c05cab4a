"""The Triton kernels give the CPU kernels' results, on random and adversarial keys.

Where the CUDA side runs one key per launch (sequential), even the slot layout must equal the
CPU's, which pins down hash, probing and tombstone reuse. Batched (concurrent) inserts may place
keys differently, so there the key -> row mapping and each backend searching the other's table
are compared. A table is (slots: int32 row per slot, row_keys: int64 key per row).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hash_reference import RefIndex, home_slots

from liverec.embedding_store.kernels import EMPTY_KEY, EMPTY_SLOT, TOMBSTONE_KEY, TOMBSTONE_SLOT, cpu, cuda

INT64_MAX = 2**63 - 1
ROWS = 1 << 16  # rows of every test table (row ids below this)


def _random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct valid keys over the whole int64 range."""
    keys = np.unique(rng.integers(TOMBSTONE_KEY + 1, INT64_MAX, size=2 * n, dtype=np.int64, endpoint=True))
    return rng.permutation(keys)[:n]


def _colliding_keys(rng: np.random.Generator, n: int, capacity: int, homes: int) -> np.ndarray:
    """n distinct keys whose home slots fall on only `homes` slots (long shared probe runs)."""
    targets = rng.choice(capacity, size=homes, replace=False)
    found: list[np.ndarray] = []
    total = 0
    while total < n:
        cand = rng.integers(TOMBSTONE_KEY + 1, INT64_MAX, size=1 << 20, dtype=np.int64)
        hit = cand[np.isin(home_slots(cand, capacity), targets)]
        found.append(hit)
        total += hit.size
    return np.unique(np.concatenate(found))[:n]


def _near_end(rng: np.random.Generator, n: int, capacity: int) -> np.ndarray:
    """n distinct keys whose home is in the last 4 slots, so probes wrap past the array's end."""
    found: list[np.ndarray] = []
    total = 0
    while total < n:
        cand = rng.integers(TOMBSTONE_KEY + 1, INT64_MAX, size=1 << 20, dtype=np.int64)
        hit = cand[home_slots(cand, capacity) >= capacity - 4]
        found.append(hit)
        total += hit.size
    return np.unique(np.concatenate(found))[:n]


def _clustered_keys(n: int) -> np.ndarray:
    """Structured ids a real stream has: consecutive ints, strides, and the int64 extremes."""
    parts = [
        np.arange(n // 4, dtype=np.int64),
        np.arange(n // 4, dtype=np.int64) * (1 << 32),
        TOMBSTONE_KEY + 1 + np.arange(n // 8, dtype=np.int64),
        INT64_MAX - np.arange(n // 8, dtype=np.int64),
        -np.arange(1, n // 4 + 1, dtype=np.int64) * 4096,
    ]
    return np.unique(np.concatenate(parts))


def _key_set(kind: str, rng: np.random.Generator, n: int, capacity: int) -> np.ndarray:
    if kind == "random":
        return _random_keys(rng, n)
    if kind == "colliding":
        return _colliding_keys(rng, n, capacity, homes=max(n // 64, 1))
    if kind == "wrapping":  # a run of keys homed at the array's end, among random keys
        return np.unique(np.concatenate([_near_end(rng, n // 16, capacity), _random_keys(rng, n)]))[:n]
    return rng.permutation(_clustered_keys(n))[:n]


def _empty_table(capacity: int, device: torch.device, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((capacity,), EMPTY_SLOT, dtype=torch.int32, device=device),
            torch.full((rows,), EMPTY_KEY, dtype=torch.int64, device=device))


def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)


def _mapping(slots: torch.Tensor, row_keys: torch.Tensor) -> dict[int, int]:
    """key -> row of a table, after checking it is consistent: every row a slot holds is held by
    that slot only and has a key, every row with a key is held by a slot, no key twice."""
    slots, row_keys = slots.cpu().long(), row_keys.cpu()
    rows = slots[slots >= 0]
    assert torch.unique(rows).numel() == rows.numel(), "a row is held by two slots"
    keys = row_keys[rows]
    assert bool((keys > TOMBSTONE_KEY).all()), "a slot holds a free row"
    assert torch.unique(keys).numel() == keys.numel(), "a key holds two slots"
    assert int((row_keys != EMPTY_KEY).sum()) == rows.numel(), "a row has a key but no slot"
    return dict(zip(keys.tolist(), rows.tolist()))


def _queries(rng: np.random.Generator, present: np.ndarray, absent: np.ndarray) -> np.ndarray:
    q = np.concatenate([present, rng.choice(present, size=present.size), absent[: present.size],
                        [EMPTY_KEY, TOMBSTONE_KEY, 0, -1, INT64_MAX]])
    return rng.permutation(q)


def test_sequential_layout_equals_cpu(device: torch.device) -> None:
    """One key per launch: the CUDA slot arrays equal the CPU's after inserts, erases, reuse."""
    rng = np.random.default_rng(1)
    capacity = 512
    keys = np.concatenate([_colliding_keys(rng, 150, capacity, 5), _near_end(rng, 40, capacity),
                           _random_keys(rng, 150)])
    keys = np.unique(keys)[:300]
    vals = rng.permutation(10_000)[: keys.size].astype(np.int64)
    gk, gv = _empty_table(capacity, device)
    ck, cv = _empty_table(capacity, torch.device("cpu"))
    for k, v in zip(keys, vals):
        cuda.insert(gk, gv, _t([k], device), _t([v], device))
    cpu.insert(ck, cv, _t(keys, "cpu"), _t(vals, "cpu"))
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)

    gone = rng.choice(keys, size=120, replace=False)
    assert torch.equal(cuda.erase(gk, gv, _t(gone, device)).cpu(), cpu.erase(ck, cv, _t(gone, "cpu")))
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)

    fresh = _colliding_keys(np.random.default_rng(2), 100, capacity, 5)
    fresh = fresh[~np.isin(fresh, keys)]
    fresh_rows = 20_000 + np.arange(fresh.size, dtype=np.int64)
    for k, r in zip(fresh, fresh_rows):  # lands on tombstones left by the erase: reuse must match the CPU's
        cuda.insert(gk, gv, _t([k], device), _t([r], device))
    cpu.insert(ck, cv, _t(fresh, "cpu"), _t(fresh_rows, "cpu"))
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)


@pytest.mark.parametrize("kind", ["random", "colliding", "clustered", "wrapping"])
@pytest.mark.parametrize("load", [0.5, 0.75, 0.95])
def test_batched_insert_find_matches_cpu(device: torch.device, small: int, kind: str, load: float) -> None:
    """Concurrent inserts keep every key once; find agrees with the CPU, on either's table."""
    rng = np.random.default_rng(zlib.crc32(f"{kind}{load}".encode()))
    capacity = 1 << small
    keys = _key_set(kind, rng, int(load * capacity), capacity)
    vals = rng.permutation(keys.size).astype(np.int64) * 3 + 7
    gk, gv = _empty_table(capacity, device)
    ck, cv = _empty_table(capacity, torch.device("cpu"))
    cuda.insert(gk, gv, _t(keys, device), _t(vals, device))
    cpu.insert(ck, cv, _t(keys, "cpu"), _t(vals, "cpu"))
    assert _mapping(gk, gv) == _mapping(ck, cv) == dict(zip(keys.tolist(), vals.tolist()))

    absent = _random_keys(rng, keys.size + 64)
    absent = absent[~np.isin(absent, keys)]
    q = _queries(rng, keys, absent)
    want = cpu.find(ck, cv, _t(q, "cpu"))
    assert torch.equal(cuda.find(gk, gv, _t(q, device)).cpu(), want)
    # Each backend searches the other's table: same hash, same probing.
    assert torch.equal(cuda.find(ck.to(device), cv.to(device), _t(q, device)).cpu(), want)
    assert torch.equal(cpu.find(gk.cpu(), gv.cpu(), _t(q, "cpu")), want)


@pytest.mark.parametrize("kind", ["random", "colliding", "clustered"])
def test_erase_and_tombstone_reuse_match_cpu(device: torch.device, small: int, kind: str) -> None:
    """Erase returns the CPU's values; later inserts reuse tombstones and stay findable."""
    rng = np.random.default_rng(7)
    capacity = 1 << (small - 1)
    keys = _key_set(kind, rng, int(0.7 * capacity), capacity)
    vals = np.arange(keys.size, dtype=np.int64)
    gk, gv = _empty_table(capacity, device)
    ck, cv = _empty_table(capacity, torch.device("cpu"))
    cuda.insert(gk, gv, _t(keys, device), _t(vals, device))
    cpu.insert(ck, cv, _t(keys, "cpu"), _t(vals, "cpu"))

    empty_at_start, refilled, next_row = capacity - keys.size, 0, keys.size
    for _ in range(3):  # erase and refill repeatedly, so tombstones pile up and get reused
        gone = rng.choice(keys, size=keys.size // 3, replace=False)
        absent = _random_keys(rng, 50)
        e = rng.permutation(np.concatenate([gone, absent[~np.isin(absent, keys)]]))
        assert torch.equal(cuda.erase(gk, gv, _t(e, device)).cpu(), cpu.erase(ck, cv, _t(e, "cpu")))
        keys = keys[~np.isin(keys, gone)]
        new = _key_set(kind, rng, 4 * gone.size, capacity)
        new = new[~np.isin(new, keys)][: gone.size]
        new_vals = next_row + rng.permutation(new.size).astype(np.int64)
        next_row += new.size
        cuda.insert(gk, gv, _t(new, device), _t(new_vals, device))
        cpu.insert(ck, cv, _t(new, "cpu"), _t(new_vals, "cpu"))
        keys = np.concatenate([keys, new])
        refilled += new.size
        assert _mapping(gk, gv) == _mapping(ck, cv)
        empty_g = int((gk == EMPTY_SLOT).sum())
        assert empty_g == capacity - keys.size - int((gk == TOMBSTONE_SLOT).sum())
        q = _queries(rng, keys, _random_keys(rng, 200))
        assert torch.equal(cuda.find(gk, gv, _t(q, device)).cpu(), cpu.find(ck, cv, _t(q, "cpu")))
    # Without tombstone reuse every refilled key would have taken an EMPTY slot.
    assert int((gk == EMPTY_SLOT).sum()) > empty_at_start - refilled


def test_erase_duplicates_first_occurrence(device: torch.device, small: int) -> None:
    """A key repeated in one erase is erased once, reported at its first occurrence."""
    rng = np.random.default_rng(3)
    capacity = 1 << small
    n = capacity // 2
    keys = _random_keys(rng, n)
    gk, gv = _empty_table(capacity, device)
    cuda.insert(gk, gv, _t(keys, device), _t(np.arange(n), device))
    ref = RefIndex(capacity)
    ref.insert(keys, np.arange(n))
    e = np.concatenate([keys[: n // 8], keys[: n // 8], keys[n // 16: n // 4], [EMPTY_KEY, TOMBSTONE_KEY, 12345]])
    e = rng.permutation(e)
    assert cuda.erase(gk, gv, _t(e, device)).cpu().tolist() == ref.erase(e).tolist()
    assert _mapping(gk, gv) == ref.items()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["random", "colliding", "clustered"])
def test_find_or_insert_matches_sequential(device: torch.device, small: int, fused: bool, kind: str) -> None:
    """Batches with repeats and hits: rows equal the CPU kernels' and a key-by-key insert's (new
    keys in order of first occurrence, free rows first)."""
    rng = np.random.default_rng(11)
    capacity = 1 << small
    pool = _key_set(kind, rng, int(0.6 * capacity), capacity)
    gk, gv = _empty_table(capacity, device)
    ck, cv = _empty_table(capacity, torch.device("cpu"))
    ref = RefIndex(capacity)
    free = np.array([5, 9, 100], dtype=np.int64)
    next_row = 1000
    seen = np.empty(0, dtype=np.int64)
    for step in range(4):
        batch = rng.choice(pool[: (step + 1) * pool.size // 4], size=pool.size // 3)
        batch = np.concatenate([batch, batch[: batch.size // 8], [EMPTY_KEY, INT64_MAX]])
        got, new_keys, new_rows = cuda.find_or_insert(gk, gv, _t(batch, device), _t(free, device),
                                                      next_row, fused=fused)
        want, want_keys, want_rows = cpu.find_or_insert(ck, cv, _t(batch, "cpu"), _t(free, "cpu"), next_row)
        ref_rows, ref_keys = ref.find_or_insert(batch, free, next_row)
        assert torch.equal(want, torch.from_numpy(ref_rows)) and torch.equal(want_keys, torch.from_numpy(ref_keys))
        assert torch.equal(got.cpu(), want)
        assert torch.equal(new_keys.cpu(), want_keys) and torch.equal(new_rows.cpu(), want_rows)
        assert _mapping(gk, gv) == _mapping(ck, cv) == ref.items()
        seen = np.union1d(seen, want_keys.numpy())
        next_row += max(want_keys.numel() - free.size, 0)
        free = np.empty(0, dtype=np.int64)
    assert len(_mapping(gk, gv)) == seen.size


def test_growth_round_trip(device: torch.device, big: int) -> None:
    """Rehash to double capacity on CUDA, back to the CPU and down again: values survive."""
    rng = np.random.default_rng(5)
    capacity = 1 << big
    keys = _random_keys(rng, int(0.74 * capacity))
    vals = rng.permutation(keys.size).astype(np.int64)
    gk, gv = _empty_table(capacity, device, rows=keys.size)
    cuda.insert(gk, gv, _t(keys, device), _t(vals, device))
    gone = keys[: keys.size // 5]
    cuda.erase(gk, gv, _t(gone, device))
    live = {int(k): int(v) for k, v in zip(keys[gone.size:], vals[gone.size:])}

    held = gk[gk >= 0].long()
    bk, bv = _empty_table(2 * capacity, device, rows=keys.size)
    cuda.insert(bk, bv, gv[held].contiguous(), held.contiguous())
    assert _mapping(bk, bv) == live
    assert int((bk == TOMBSTONE_SLOT).sum()) == 0

    # Move the grown table to the CPU, shrink it there with the CPU kernels, and back.
    ck, cv = bk.cpu(), bv.cpu()
    q = _queries(rng, keys, _random_keys(rng, 1000))
    assert torch.equal(cpu.find(ck, cv, _t(q, "cpu")), cuda.find(bk, bv, _t(q, device)).cpu())
    held = ck[ck >= 0].long()
    sk, sv = _empty_table(capacity, torch.device("cpu"), rows=keys.size)
    cpu.insert(sk, sv, cv[held].contiguous(), held.contiguous())
    assert torch.equal(cuda.find(sk.to(device), sv.to(device), _t(q, device)).cpu(),
                       cpu.find(sk, sv, _t(q, "cpu")))


def test_full_table_raises_instead_of_hanging(device: torch.device) -> None:
    gk, gv = _empty_table(64, device)
    keys = _random_keys(np.random.default_rng(9), 80)
    with pytest.raises(RuntimeError, match="full"):
        cuda.insert(gk, gv, _t(keys, device), _t(np.arange(80), device))
    assert int((gk >= 0).sum()) == 64
    # find and erase still terminate on a table with no EMPTY slot
    q = _t(np.concatenate([keys, _random_keys(np.random.default_rng(4), 10)]), device)
    assert int((cuda.find(gk, gv, q) >= 0).sum()) == 64


@pytest.mark.parametrize("fused", [True, False])
def test_find_or_insert_on_a_full_table_raises_and_leaves_it_intact(device: torch.device, fused: bool) -> None:
    gk, gv = _empty_table(64, device)
    keys = _random_keys(np.random.default_rng(8), 100)
    cuda.insert(gk, gv, _t(keys[:60], device), _t(np.arange(60), device))
    before = _mapping(gk, gv)
    with pytest.raises(RuntimeError, match="full"):
        cuda.find_or_insert(gk, gv, _t(keys, device), _t(np.arange(0), device), 60, fused=fused)
    after = _mapping(gk, gv)
    if fused:  # the fused path undoes its claims
        assert after == before
    assert all(after[k] == v for k, v in before.items())
    assert torch.equal(cuda.find(gk, gv, _t(keys[:60], device)).cpu(), torch.arange(60))


def test_bad_input_is_refused(device: torch.device) -> None:
    gk, gv = _empty_table(64, device)
    with pytest.raises(TypeError):
        cuda.find(gk, gv, torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError):
        cuda.find(gk[:48].contiguous(), gv[:48].contiguous(), torch.zeros(3, dtype=torch.int64, device=device))
    if device.type == "cuda":
        with pytest.raises(ValueError):
            cuda.find(gk, gv, torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("block, warps, group", [(32, 1, 1), (64, 2, 8), (128, 4, 4), (256, 8, 2)])
def test_launch_configs_agree(device: torch.device, small: int, block: int, warps: int, group: int,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block size, warp count and probe group gives the CPU's results."""
    monkeypatch.setattr(cuda, "BLOCK", block)
    monkeypatch.setattr(cuda, "NUM_WARPS", warps)
    monkeypatch.setattr(cuda, "GROUP", group)
    rng = np.random.default_rng(block + group)
    capacity = 1 << small
    keys = _colliding_keys(rng, int(0.7 * capacity), capacity, homes=capacity // 32)
    gk, gv = _empty_table(capacity, device)
    ck, cv = _empty_table(capacity, torch.device("cpu"))
    half = keys.size // 2
    cuda.insert(gk, gv, _t(keys[:half], device), _t(np.arange(half), device))
    cpu.insert(ck, cv, _t(keys[:half], "cpu"), _t(np.arange(half), "cpu"))
    batch = rng.choice(keys, size=keys.size)
    got, new_keys, _ = cuda.find_or_insert(gk, gv, _t(batch, device), _t(np.arange(0), device), half)
    want, want_keys, _ = cpu.find_or_insert(ck, cv, _t(batch, "cpu"), _t(np.arange(0), "cpu"), half)
    assert torch.equal(got.cpu(), want) and torch.equal(new_keys.cpu(), want_keys)
    gone = rng.choice(keys, size=keys.size // 3, replace=False)
    assert torch.equal(cuda.erase(gk, gv, _t(gone, device)).cpu(), cpu.erase(ck, cv, _t(gone, "cpu")))
    assert _mapping(gk, gv) == _mapping(ck, cv)
