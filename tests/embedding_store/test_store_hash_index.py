"""HashIndex: sorted row allocation, free-row reuse, growth by rehash, input validation."""

from __future__ import annotations

import pytest
import torch

from liverec.embedding_store import HashIndex
from liverec.embedding_store.kernels import EMPTY_KEY, TOMBSTONE_KEY


def _keys(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_find_or_insert_gives_new_keys_rows_in_order_of_first_occurrence() -> None:
    index = HashIndex(8)
    rows, new_keys, new_rows = index.find_or_insert(_keys([50, 10, 50, 30]))
    assert new_keys.tolist() == [50, 10, 30]
    assert new_rows.tolist() == [0, 1, 2]
    assert rows.tolist() == [0, 1, 0, 2]
    rows, new_keys, _ = index.find_or_insert(_keys([30, 20]))
    assert rows.tolist() == [2, 3] and new_keys.tolist() == [20]


def test_find_or_insert_gives_the_same_rows_on_the_growth_path() -> None:
    """A batch too large for the table goes through find + insert after a rehash: same order."""
    small, large = HashIndex(4), HashIndex(64)
    batch = _keys([9, 4, 9, 7, 1, 4, 8, 2, 7, 5])
    got_small, got_large = small.find_or_insert(batch), large.find_or_insert(batch)
    assert small.capacity > 4
    for a, b in zip(got_small, got_large):
        assert a.tolist() == b.tolist()
    assert got_small[1].tolist() == [9, 4, 7, 1, 8, 2, 5]
    assert got_small[0].tolist() == [0, 1, 0, 2, 3, 1, 4, 5, 2, 6]


def test_erased_rows_are_reused_lowest_first() -> None:
    index = HashIndex(8)
    index.find_or_insert(_keys([1, 2, 3, 4]))
    assert index.erase(_keys([3, 1, 3, 99])).tolist() == [2, 0, 2, -1]
    assert len(index) == 2
    assert index.insert(_keys([5, 6, 7])).tolist() == [0, 2, 4]
    assert index.high_water == 5
    keys, rows = index.items()
    assert rows.tolist() == [0, 1, 2, 3, 4]
    assert keys.tolist() == [5, 2, 6, 4, 7]


def test_growth_keeps_every_key_on_its_row() -> None:
    index = HashIndex(4, max_load=0.5)
    generator = torch.Generator().manual_seed(3)
    expected: dict[int, int] = {}
    for _ in range(20):
        batch = torch.randint(-(2**62), 2**62, (200,), generator=generator)
        rows, new_keys, new_rows = index.find_or_insert(batch)
        expected.update(zip(new_keys.tolist(), new_rows.tolist()))
        assert index.load <= 0.5
    assert index.capacity >= 2 * len(expected)
    everything = _keys(sorted(expected))
    assert index.find(everything).tolist() == [expected[k] for k in everything.tolist()]


def test_tombstones_trigger_a_rehash_in_place_not_unbounded_growth() -> None:
    """Churn at a constant live count: tombstones pile up, a rehash clears them, capacity stays."""
    index = HashIndex(64, max_load=0.5)
    live = list(range(10))
    index.insert(_keys(live))
    capacity = index.capacity
    for step in range(200):
        index.erase(_keys([live.pop(0)]))
        live.append(100 + step)
        index.insert(_keys([live[-1]]))
        assert index.load <= 0.5
    assert index.capacity == capacity
    assert index.find(_keys(live)).ge(0).all()
    assert index.high_water == 10


def test_rehash_to_explicit_capacity_preserves_rows() -> None:
    index = HashIndex(16)
    rows, _, _ = index.find_or_insert(_keys(list(range(5))))
    index.rehash(1024)
    assert index.capacity == 1024
    assert torch.equal(index.find(_keys(list(range(5)))), rows)
    with pytest.raises(ValueError, match="do not fit"):
        index.rehash(4)


def test_from_items_allocates_exactly_like_the_original() -> None:
    original = HashIndex(16)
    original.find_or_insert(_keys([10, 20, 30, 40, 50]))
    original.erase(_keys([20, 40]))
    keys, rows = original.items()
    rebuilt = HashIndex.from_items(keys, rows, high_water=original.high_water, capacity=original.capacity,
                                   max_load=original.max_load, device="cpu")
    assert torch.equal(rebuilt.find(keys), rows)
    assert torch.equal(rebuilt.insert(_keys([1, 2, 3])), original.insert(_keys([1, 2, 3])))


def test_from_items_refuses_shared_rows() -> None:
    with pytest.raises(ValueError, match="unique"):
        HashIndex.from_items(_keys([1, 2]), _keys([0, 0]), high_water=1, capacity=8, max_load=0.5, device="cpu")


@pytest.mark.parametrize("bad", [EMPTY_KEY, TOMBSTONE_KEY])
def test_sentinel_keys_are_refused(bad: int) -> None:
    index = HashIndex(8)
    with pytest.raises(ValueError, match="reserved sentinels"):
        index.find(_keys([1, bad]))
    with pytest.raises(ValueError, match="reserved sentinels"):
        index.find_or_insert(_keys([bad]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.uint8])
def test_non_int64_keys_are_refused_naming_the_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=str(dtype)):
        HashIndex(8).find(torch.tensor([1, 2], dtype=dtype))


def test_keys_on_another_device_or_of_another_shape_are_refused() -> None:
    index = HashIndex(8)
    with pytest.raises(ValueError, match="meta"):
        index.find(torch.empty(3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="1-D"):
        index.find(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="list"):
        index.find([1, 2])  # type: ignore[arg-type]


def test_insert_refuses_unsorted_duplicate_or_present_keys() -> None:
    index = HashIndex(8)
    index.insert(_keys([5]))
    with pytest.raises(ValueError, match="sorted unique"):
        index.insert(_keys([3, 1]))
    with pytest.raises(ValueError, match="sorted unique"):
        index.insert(_keys([1, 1]))
    with pytest.raises(ValueError, match="absent"):
        index.insert(_keys([4, 5]))
    assert len(index) == 1


def test_cpu_index_grows_by_a_quarter_not_a_doubling() -> None:
    """Growth refills to 0.8 of max_load in any slot count the CPU kernels take, so the load
    stays in [0.6, 0.75] once grown (4 / load bytes of slots per key: at most 6.7)."""
    index = HashIndex(64)
    generator = torch.Generator().manual_seed(5)
    capacities = set()
    for _ in range(40):
        index.find_or_insert(torch.randint(-(2**62), 2**62, (500,), generator=generator))
        capacities.add(index.capacity)
        assert 0.6 - 1e-3 <= index.load <= 0.75
    assert any(c & (c - 1) for c in capacities)  # not only powers of two
    assert max(capacities) < 20_000 / 0.6 * 1.01


def test_an_emptied_index_gives_its_slots_back() -> None:
    index = HashIndex(8)
    keys = torch.arange(10_000, dtype=torch.int64)
    rows = index.insert(keys)
    grown = index.capacity
    index.erase(keys[100:])
    assert index.capacity < grown / 10 and len(index) == 100
    assert torch.equal(index.find(keys[:100]), rows[:100])
    assert index.find(keys[100:]).eq(-1).all()
    assert index.insert(_keys([-5, -4])).tolist() == [100, 101]  # lowest free rows first
    assert index.nbytes == index.capacity * 4  # no free list held
