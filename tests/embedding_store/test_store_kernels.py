"""The compiled CPU kernels against the contract: a dict model, probe wrap-around, tombstones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liverec.embedding_store.hashing import splitmix64
from liverec.embedding_store.kernels import EMPTY_KEY, TOMBSTONE_KEY, cpu, kernels_for


def _table(capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((capacity,), EMPTY_KEY, dtype=torch.int64), torch.full((capacity,), -1, dtype=torch.int64)


def _keys(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_kernels_for_cpu_is_this_module() -> None:
    assert kernels_for("cpu") is cpu


OPS = st.lists(st.tuples(st.sampled_from(["insert", "erase", "find"]),
                         st.lists(st.integers(-(2**63) + 2, 2**63 - 1) | st.integers(0, 40), max_size=10)),
               max_size=40)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(ops=OPS)
def test_kernels_match_a_dict(ops: list[tuple[str, list[int]]]) -> None:
    """Random inserts (of new keys only, as the contract requires), erases and finds on a
    64-slot table never exceeding half load, against a dict."""
    slot_keys, slot_vals = _table(64)
    model: dict[int, int] = {}
    next_value = 0
    for op, keys in ops:
        if op == "insert":
            fresh = sorted(set(keys) - set(model))[: 32 - len(model)]
            values = list(range(next_value, next_value + len(fresh)))
            next_value += len(fresh)
            cpu.insert(slot_keys, slot_vals, _keys(fresh), _keys(values))
            model.update(zip(fresh, values))
        elif op == "erase":
            unique = list(dict.fromkeys(keys))
            erased = cpu.erase(slot_keys, slot_vals, _keys(unique)).tolist()
            assert erased == [model.pop(k, -1) for k in unique]
        assert cpu.find(slot_keys, slot_vals, _keys(keys)).tolist() == [model.get(k, -1) for k in keys]
    held = slot_keys > TOMBSTONE_KEY
    assert sorted(slot_keys[held].tolist()) == sorted(model)


def _keys_homed_at(slot: int, capacity: int, count: int) -> list[int]:
    candidates = torch.arange(200_000, dtype=torch.int64)
    homes = splitmix64(candidates) & (capacity - 1)
    found = candidates[homes == slot][:count].tolist()
    assert len(found) == count
    return found


def test_probe_wraps_around_the_end() -> None:
    """Keys whose home is the last slot spill into slots 0, 1, ... and are still found."""
    capacity = 16
    slot_keys, slot_vals = _table(capacity)
    keys = _keys_homed_at(capacity - 1, capacity, 3)
    cpu.insert(slot_keys, slot_vals, _keys(keys), _keys([10, 11, 12]))
    assert slot_keys[[15, 0, 1]].tolist() == keys
    assert cpu.find(slot_keys, slot_vals, _keys(keys)).tolist() == [10, 11, 12]


def test_erase_leaves_a_tombstone_that_probes_walk_past_and_inserts_reuse() -> None:
    capacity = 16
    slot_keys, slot_vals = _table(capacity)
    first, second, third = _keys_homed_at(3, capacity, 3)
    cpu.insert(slot_keys, slot_vals, _keys([first, second]), _keys([0, 1]))
    assert cpu.erase(slot_keys, slot_vals, _keys([first])).tolist() == [0]
    assert int(slot_keys[3]) == TOMBSTONE_KEY
    assert cpu.find(slot_keys, slot_vals, _keys([second, first])).tolist() == [1, -1]
    cpu.insert(slot_keys, slot_vals, _keys([third]), _keys([2]))
    assert int(slot_keys[3]) == third
    assert cpu.find(slot_keys, slot_vals, _keys([third, second])).tolist() == [2, 1]


def test_parallel_and_serial_paths_agree() -> None:
    """Batches above PARALLEL_MIN take the prange kernels; results must not depend on it."""
    slot_keys, slot_vals = _table(1 << 16)
    keys = torch.unique(torch.randint(-(2**62), 2**62, (20_000,), generator=torch.Generator().manual_seed(1)))
    cpu.insert(slot_keys, slot_vals, keys, torch.arange(keys.numel()))
    queries = torch.cat([keys, keys + 1])
    assert queries.numel() >= cpu.PARALLEL_MIN
    big = cpu.find(slot_keys, slot_vals, queries)
    small = torch.cat([cpu.find(slot_keys, slot_vals, chunk) for chunk in queries.split(1000)])
    assert torch.equal(big, small)
    assert torch.equal(big[: keys.numel()], torch.arange(keys.numel()))
    erased = cpu.erase(slot_keys, slot_vals, keys)
    assert torch.equal(erased, torch.arange(keys.numel()))
    assert bool((cpu.find(slot_keys, slot_vals, keys) == -1).all())


def test_kernels_refuse_wrong_dtypes_and_non_contiguous_slots() -> None:
    slot_keys, slot_vals = _table(16)
    with pytest.raises(TypeError, match="torch.int32"):
        cpu.find(slot_keys, slot_vals, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.find(torch.full((32,), EMPTY_KEY)[::2], slot_vals, _keys([1]))
