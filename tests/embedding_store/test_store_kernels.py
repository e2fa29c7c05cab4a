"""The compiled CPU kernels against the contract: a dict model, probe wrap-around, tombstones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liverec.embedding_store.hashing import shift_right_logical, splitmix64
from liverec.embedding_store.kernels import EMPTY_KEY, EMPTY_SLOT, TOMBSTONE_SLOT, cpu, kernels_for


def _table(capacity: int, rows: int = 1 << 15) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, row_keys) of an empty table."""
    return torch.full((capacity,), EMPTY_SLOT, dtype=torch.int32), torch.full((rows,), EMPTY_KEY, dtype=torch.int64)


def _keys(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_kernels_for_cpu_is_this_module() -> None:
    assert kernels_for("cpu") is cpu


OPS = st.lists(st.tuples(st.sampled_from(["insert", "erase", "find"]),
                         st.lists(st.integers(-(2**63) + 2, 2**63 - 1) | st.integers(0, 40), max_size=10)),
               max_size=40)


@pytest.mark.parametrize("capacity", [64, 61])
@settings(max_examples=150, derandomize=True, deadline=None)
@given(ops=OPS)
def test_kernels_match_a_dict(capacity: int, ops: list[tuple[str, list[int]]]) -> None:
    """Random inserts (of new keys only, as the contract requires), erases and finds on a
    table never exceeding half load, against a dict; a power of two (masked homes) and not
    (scaled homes, explicit wrap)."""
    slots, row_keys = _table(capacity)
    model: dict[int, int] = {}
    next_value = 0
    for op, keys in ops:
        if op == "insert":
            fresh = sorted(set(keys) - set(model))[: capacity // 2 - len(model)]
            values = list(range(next_value, next_value + len(fresh)))
            next_value += len(fresh)
            cpu.insert(slots, row_keys, _keys(fresh), _keys(values))
            model.update(zip(fresh, values))
        elif op == "erase":
            unique = list(dict.fromkeys(keys))
            erased = cpu.erase(slots, row_keys, _keys(unique)).tolist()
            assert erased == [model.pop(k, -1) for k in unique]
        assert cpu.find(slots, row_keys, _keys(keys)).tolist() == [model.get(k, -1) for k in keys]
    rows = slots[slots >= 0].long()
    assert sorted(row_keys[rows].tolist()) == sorted(model)
    assert int((row_keys != EMPTY_KEY).sum()) == len(model)


def _keys_homed_at(slot: int, capacity: int, count: int) -> list[int]:
    candidates = torch.arange(200_000, dtype=torch.int64)
    homes = splitmix64(candidates) & (capacity - 1)
    found = candidates[homes == slot][:count].tolist()
    assert len(found) == count
    return found


def test_probe_wraps_around_the_end() -> None:
    """Keys whose home is the last slot spill into slots 0, 1, ... and are still found."""
    capacity = 16
    slots, row_keys = _table(capacity)
    keys = _keys_homed_at(capacity - 1, capacity, 3)
    cpu.insert(slots, row_keys, _keys(keys), _keys([10, 11, 12]))
    assert slots[[15, 0, 1]].tolist() == [10, 11, 12]
    assert cpu.find(slots, row_keys, _keys(keys)).tolist() == [10, 11, 12]


def test_erase_leaves_a_tombstone_that_probes_walk_past_and_inserts_reuse() -> None:
    capacity = 16
    slots, row_keys = _table(capacity)
    first, second, third = _keys_homed_at(3, capacity, 3)
    cpu.insert(slots, row_keys, _keys([first, second]), _keys([0, 1]))
    assert cpu.erase(slots, row_keys, _keys([first])).tolist() == [0]
    assert int(slots[3]) == TOMBSTONE_SLOT and int(row_keys[0]) == EMPTY_KEY
    assert cpu.find(slots, row_keys, _keys([second, first])).tolist() == [1, -1]
    cpu.insert(slots, row_keys, _keys([third]), _keys([2]))
    assert int(slots[3]) == 2 and int(row_keys[2]) == third
    assert cpu.find(slots, row_keys, _keys([third, second])).tolist() == [2, 1]


def test_parallel_and_serial_paths_agree() -> None:
    """Batches above PARALLEL_MIN take the prange kernels; results must not depend on it."""
    slots, row_keys = _table(1 << 16)
    keys = torch.unique(torch.randint(-(2**62), 2**62, (20_000,), generator=torch.Generator().manual_seed(1)))
    cpu.insert(slots, row_keys, keys, torch.arange(keys.numel()))
    queries = torch.cat([keys, keys + 1])
    assert queries.numel() >= cpu.PARALLEL_MIN
    big = cpu.find(slots, row_keys, queries)
    small = torch.cat([cpu.find(slots, row_keys, chunk) for chunk in queries.split(1000)])
    assert torch.equal(big, small)
    assert torch.equal(big[: keys.numel()], torch.arange(keys.numel()))
    erased = cpu.erase(slots, row_keys, keys)
    assert torch.equal(erased, torch.arange(keys.numel()))
    assert bool((cpu.find(slots, row_keys, keys) == -1).all())


def test_kernels_refuse_wrong_dtypes_and_non_contiguous_slots() -> None:
    slots, row_keys = _table(16)
    with pytest.raises(TypeError, match="torch.int32"):
        cpu.find(slots, row_keys, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.int64"):
        cpu.find(row_keys[:16].clone(), row_keys, _keys([1]))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.find(torch.full((32,), EMPTY_SLOT, dtype=torch.int32)[::2], row_keys, _keys([1]))


def test_any_capacity_wraps_probes_past_the_end() -> None:
    """On a 37-slot table (not a power of two) keys homed at the last slot wrap to slot 0 on."""
    capacity = 37
    candidates = torch.arange(200_000, dtype=torch.int64)
    homes = (shift_right_logical(splitmix64(candidates), 32) * capacity) >> 32
    keys = candidates[homes == capacity - 1][:3].tolist()
    slots, row_keys = _table(capacity)
    cpu.insert(slots, row_keys, _keys(keys), _keys([0, 1, 2]))
    assert slots[[capacity - 1, 0, 1]].tolist() == [0, 1, 2]
    cpu.erase(slots, row_keys, _keys(keys[:1]))
    assert cpu.find(slots, row_keys, _keys(keys)).tolist() == [-1, 1, 2]
    assert cpu.capacity_at_least(37) == 37
