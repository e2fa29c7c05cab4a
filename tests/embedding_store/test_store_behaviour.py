"""EmbeddingStore behaviours one at a time: admission, TTL, eviction, pins, optimizers, NaN
gradients, deltas, stats, growth, replay determinism and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from store_reference import assert_snapshots_equal, snapshot

from liverec.embedding_store import EmbeddingStore, TableConfig


def _keys(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _store(**overrides: object) -> EmbeddingStore:
    return EmbeddingStore([TableConfig(**{"name": "t", "dim": 4, **overrides})], seed=5)


def _train(store: EmbeddingStore, keys: list[int], now: int, grad: float | torch.Tensor = 0.0) -> torch.Tensor:
    rows = store.lookup("t", _keys(keys), train=True, now_s=now)
    grads = grad if isinstance(grad, torch.Tensor) else torch.full((len(keys), 4), grad)
    store.apply_gradients("t", rows, grads)
    return rows


def _live(store: EmbeddingStore) -> list[int]:
    return sorted(store.table("t").index.items()[0].tolist())


# ----------------------------------------------------------------------------- admission


def test_key_is_admitted_on_the_lookup_where_its_count_reaches_min_count() -> None:
    store = _store(min_count=3)
    assert _train(store, [7], 1).tolist() == [-1]
    assert _train(store, [7, 8], 2).tolist() == [-1, -1]
    rows = _train(store, [7, 8], 3)
    assert rows[0] >= 0 and rows[1] == -1
    assert _live(store) == [7]
    assert bool((_train(store, [9, 8, 9, 9], 4) >= 0).all())
    assert _live(store) == [7, 8, 9]
    stats = store.stats()["t"]
    assert stats.admitted == 3 and stats.filtered == 1 + 2 + 1


def test_unadmitted_keys_read_zeros_and_their_gradients_change_nothing() -> None:
    store = _store(min_count=2, optimizer="sgd", lr=1.0)
    _train(store, [1, 1], 1)
    before = store.embed("t", _keys([1])).clone()
    rows = _train(store, [1, 2], 2, grad=5.0)
    assert rows[1] == -1
    assert not store.embed("t", _keys([2])).any()
    assert torch.allclose(store.embed("t", _keys([1])), before - 5.0)
    assert _live(store) == [1]


def test_eval_lookups_never_insert_or_touch() -> None:
    store = _store()
    _train(store, [1], 10)
    table = store.table("t")
    count, last = table.counts.clone(), table.last_update.clone()
    assert store.lookup("t", _keys([1, 2])).tolist()[1] == -1
    assert _live(store) == [1]
    assert torch.equal(table.counts, count) and torch.equal(table.last_update, last)


# ----------------------------------------------------------------------------- TTL


def test_expire_removes_rows_older_than_ttl_and_reuses_their_rows() -> None:
    store = _store(ttl_s=10)
    _train(store, [1, 2], 100)
    _train(store, [2], 105)
    assert store.expire(110) == {"t": 0}
    assert store.expire(111) == {"t": 1}
    assert _live(store) == [2]
    high_water = store.table("t").index.high_water
    _train(store, [3], 111)
    assert store.table("t").index.high_water == high_water
    assert store.expire(1000) == {"t": 2}
    assert store.stats()["t"].expired == 3 and store.stats()["t"].rows == 0


def test_event_time_never_moves_a_row_backwards() -> None:
    store = _store(ttl_s=10)
    _train(store, [1], 100)
    _train(store, [1], 50)
    assert store.expire(110) == {"t": 0}
    assert store.expire(111) == {"t": 1}


def test_table_without_ttl_never_expires() -> None:
    store = _store()
    _train(store, [1], 0)
    assert store.expire(10**12) == {"t": 0}


# ----------------------------------------------------------------------------- eviction


def test_lru_evicts_the_least_recently_updated_with_ties_broken_by_key() -> None:
    store = _store(max_rows=3, eviction="lru")
    _train(store, [30, 10], 1)
    _train(store, [20], 2)
    _train(store, [40, 50], 3)
    assert _live(store) == [20, 40, 50]
    assert store.stats()["t"].evicted == 2


def test_lfu_evicts_the_least_counted_with_ties_broken_by_key() -> None:
    store = _store(max_rows=3, eviction="lfu")
    _train(store, [1, 1, 1, 2, 3, 3], 1)
    _train(store, [4], 2)
    assert _live(store) == [1, 3, 4]
    _train(store, [5], 3)
    assert _live(store) == [1, 3, 5]


def test_rows_of_the_current_batch_are_never_evicted_and_surplus_keys_wait() -> None:
    store = _store(max_rows=2, eviction="lru")
    _train(store, [1], 1)
    rows = _train(store, [1, 9, 5, 7], 2)
    assert _live(store) == [1, 5]
    assert rows.tolist()[2] >= 0 and rows.tolist()[1] == -1 and rows.tolist()[3] == -1


def test_rows_pinned_by_an_earlier_lookup_of_the_step_survive_later_evictions() -> None:
    """LFU would pick the fresh key 1 (count 1) over 2 (count 5): the pin forbids it."""
    store = _store(max_rows=2, eviction="lfu", optimizer="sgd", lr=1.0)
    _train(store, [2, 2, 2, 2, 2], 1)
    first = store.lookup("t", _keys([1]), train=True, now_s=2)
    second = store.lookup("t", _keys([3]), train=True, now_s=2)
    assert _live(store) == [1, 3]
    assert first.item() != second.item()
    store.apply_gradients("t", torch.cat([first, second]), torch.ones(2, 4))
    store.lookup("t", _keys([4]), train=True, now_s=3)
    assert _live(store) == [3, 4]
    store.unpin()
    store.lookup("t", _keys([0]), train=True, now_s=3)
    assert _live(store) == [0, 4]


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_duplicate_keys_get_one_step_on_their_summed_gradient(optimizer: str) -> None:
    grads = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 1.0, 1.0, -3.0]])
    twice = _store(optimizer=optimizer, lr=0.1)
    _train(twice, [7, 7], 1, grad=grads)
    once = _store(optimizer=optimizer, lr=0.1)
    _train(once, [7], 1, grad=grads.sum(0, keepdim=True))
    assert torch.equal(twice.embed("t", _keys([7])), once.embed("t", _keys([7])))


def _initial(store: EmbeddingStore, key: int) -> torch.Tensor:
    return store.embed("t", _keys([key]))[0].clone()


def test_sgd_adagrad_and_adam_follow_their_formulas_over_two_steps() -> None:
    g1, g2 = torch.tensor([1.0, -2.0, 0.5, 4.0]), torch.tensor([-1.0, 0.5, 0.5, 2.0])
    lr, eps, b1, b2 = 0.1, 1e-8, 0.9, 0.999
    results = {}
    for optimizer in ("sgd", "adagrad", "adam"):
        store = _store(optimizer=optimizer, lr=lr)
        store.lookup("t", _keys([3]), train=True, now_s=0)
        store.unpin()
        w0 = _initial(store, 3)
        _train(store, [3], 1, grad=g1[None])
        _train(store, [3], 2, grad=g2[None])
        results[optimizer] = (w0, store.embed("t", _keys([3]))[0])
    w0, w = results["sgd"]
    assert torch.allclose(w, w0 - lr * (g1 + g2))
    w0, w = results["adagrad"]
    a1, a2 = g1**2, g1**2 + g2**2
    assert torch.allclose(w, w0 - lr * g1 / (a1.sqrt() + eps) - lr * g2 / (a2.sqrt() + eps), atol=1e-6)
    w0, w = results["adam"]
    m, v, expected = torch.zeros(4), torch.zeros(4), w0.clone()
    for t, g in ((1, g1), (2, g2)):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    assert torch.allclose(w, expected, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_are_rejected_counted_and_leave_the_row_untouched(bad: float) -> None:
    store = _store(optimizer="adam")
    store.lookup("t", _keys([1, 2]), train=True, now_s=0)
    store.unpin()
    table = store.table("t")
    rows = store.lookup("t", _keys([1, 2, 1]), train=True, now_s=1)
    row_of_1 = int(rows[0])
    before = (table.weights[row_of_1].clone(), {n: s[row_of_1].clone() for n, s in table.state.items()})
    grads = torch.ones(3, 4)
    grads[2, 1] = bad
    w2 = _initial(store, 2)
    assert store.apply_gradients("t", rows, grads) == 1
    assert torch.equal(table.weights[row_of_1], before[0])
    assert all(torch.equal(table.state[n][row_of_1], s) for n, s in before[1].items())
    assert not torch.equal(store.embed("t", _keys([2]))[0], w2)
    assert store.stats()["t"].rejected_gradients == 1


# ----------------------------------------------------------------------------- readers


def test_frequency_counts_admitted_keys_and_estimates_the_rest() -> None:
    store = _store(min_count=3)
    _train(store, [1, 1, 1, 1, 2], 0)
    _train(store, [1], 1)
    assert store.frequency("t", _keys([1, 2, 99])).tolist() == [5, 1, 0]
    plain = _store()
    _train(plain, [4, 4], 0)
    assert plain.frequency("t", _keys([4, 5])).tolist() == [2, 0]


def test_table_items_is_every_row_with_its_weights() -> None:
    store = _store()
    _train(store, [5, 3, 9], 0)
    keys, weights = store.table_items("t")
    assert sorted(keys.tolist()) == [3, 5, 9]
    assert torch.equal(weights, store.embed("t", keys))


# ----------------------------------------------------------------------------- deltas


def test_export_delta_reports_changed_rows_removed_keys_and_version() -> None:
    store = _store(ttl_s=5)
    with pytest.raises(RuntimeError, match="start it first"):
        store.export_delta()
    _train(store, [1, 2, 3], 0)
    store.mark()
    assert store.export_delta(mark=False)["t"].keys.numel() == 0
    _train(store, [2], 4)
    store.expire(6)
    delta = store.export_delta()["t"]
    assert delta.keys.tolist() == [2]
    assert torch.equal(delta.weights, store.embed("t", _keys([2])))
    assert delta.removed.tolist() == [1, 3]
    assert delta.version == store.version
    _train(store, [1], 7)
    delta = store.export_delta()["t"]
    assert delta.keys.tolist() == [1] and delta.removed.numel() == 0


def test_a_key_removed_then_readmitted_is_a_change_not_a_removal() -> None:
    store = _store(ttl_s=1)
    _train(store, [1], 0)
    store.mark()
    store.expire(5)
    _train(store, [1], 5)
    delta = store.export_delta()["t"]
    assert delta.keys.tolist() == [1] and delta.removed.numel() == 0


# ----------------------------------------------------------------------------- stats, growth, replay


def test_stats_account_for_every_byte() -> None:
    store = _store(initial_capacity=16, optimizer="adagrad", dim=8)
    _train(store, list(range(100)), 0, grad=torch.zeros(100, 8))
    stats = store.stats()["t"]
    table = store.table("t")
    assert stats.rows == 100 and stats.row_capacity == table.row_capacity >= 100
    assert stats.bytes_weights == (stats.row_capacity + 1) * 8 * 4  # + the shared zero row
    assert stats.bytes_optimizer == stats.row_capacity * 8 * 4
    assert stats.bytes_index == stats.capacity * 4  # int32 row per slot, nothing else
    # key (int64, held by the index) + last update (int32) + count (int32) per metadata row
    assert table.keys_by_row.numel() == table.metadata_rows >= 100
    assert stats.bytes_metadata == table.metadata_rows * (8 + 4 + 4)
    assert stats.load == pytest.approx(100 / stats.capacity)
    assert store.bytes_used() == stats.bytes_used
    assert stats.overhead_bytes_per_row == pytest.approx((stats.bytes_index + stats.bytes_metadata) / 100)
    assert stats.overhead_bytes_per_allocated_row == pytest.approx(stats.bytes_overhead / stats.row_capacity)
    _train(store, list(range(50)), 1, grad=torch.zeros(50, 8))
    store.expire(10**6)  # no TTL: nothing expires; evicting 10 rows frees them onto the free list
    table._remove(torch.arange(10), "evicted")
    assert store.stats()["t"].bytes_index == stats.capacity * 4  # free rows are derived, not listed


def test_expiring_most_rows_gives_the_index_slots_back() -> None:
    """The slot array follows the live rows down (rows themselves keep their ids for reuse)."""
    store = _store(ttl_s=10)
    _train(store, list(range(5000)), 0)
    _train(store, list(range(100)), 20)
    grown = store.stats()["t"].capacity
    assert store.expire(25) == {"t": 4900}
    stats = store.stats()["t"]
    assert stats.rows == 100 and stats.capacity < grown / 10 and stats.bytes_index == stats.capacity * 4
    assert _live(store) == list(range(100))
    assert _train(store, [7000, 7001], 26).tolist() == [100, 101]  # lowest free rows first


def test_growth_keeps_values_of_existing_rows() -> None:
    store = _store(initial_capacity=2, optimizer="sgd", lr=1.0)
    _train(store, [1, 2], 0, grad=1.0)
    early = store.embed("t", _keys([1, 2])).clone()
    _train(store, list(range(10, 500)), 1)
    assert store.table("t").row_capacity >= 492 and store.table("t").index.capacity >= 492 / 0.75
    assert torch.equal(store.embed("t", _keys([1, 2])), early)


def test_replaying_a_stream_builds_an_identical_store() -> None:
    def run(seed: int) -> EmbeddingStore:
        store = EmbeddingStore([TableConfig("t", 4, min_count=2, ttl_s=3, max_rows=20, eviction="lfu")], seed=seed)
        generator = torch.Generator().manual_seed(0)
        for now in range(40):
            keys = torch.randint(0, 60, (16,), generator=generator)
            rows = store.lookup("t", keys, train=True, now_s=now)
            store.apply_gradients("t", rows, torch.randn(16, 4, generator=generator))
            if now % 5 == 0:
                store.expire(now)
        return store

    assert_snapshots_equal(snapshot(run(1)), snapshot(run(1)))
    first, other = snapshot(run(1)), snapshot(run(2))
    assert not torch.equal(first["tables"]["t"]["weights"], other["tables"]["t"]["weights"])


# ----------------------------------------------------------------------------- bad input


def test_bad_keys_are_refused_with_clear_errors() -> None:
    store = _store()
    with pytest.raises(TypeError, match="torch.int32"):
        store.lookup("t", torch.tensor([1], dtype=torch.int32), train=True, now_s=0)
    with pytest.raises(TypeError, match="torch.float32"):
        store.embed("t", torch.tensor([1.0]))
    with pytest.raises(ValueError, match="meta"):
        store.lookup("t", torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="now_s"):
        store.lookup("t", _keys([1]), train=True)
    with pytest.raises(KeyError, match="no table 'x'"):
        store.lookup("x", _keys([1]))
    assert _live(store) == []


@pytest.mark.parametrize("batch", [8, 40_000])  # below and above the compiled kernels' parallel cut-off
def test_a_train_batch_holding_a_reserved_key_is_refused_before_it_touches_anything(batch: int) -> None:
    store = _store(min_count=2)
    _train(store, [1, 1, 2], now=3)
    before = snapshot(store)
    for reserved in (-(2**63), -(2**63) + 1):
        keys = [1, 2, 3] * (batch // 3) + [reserved]
        with pytest.raises(ValueError, match="reserved sentinels"):
            store.lookup("t", _keys(keys), train=True, now_s=9)
    assert_snapshots_equal(snapshot(store), before)


def test_bad_gradients_are_refused_with_clear_errors() -> None:
    store = _store()
    rows = store.lookup("t", _keys([1, 2]), train=True, now_s=0)
    with pytest.raises(ValueError, match="shape"):
        store.apply_gradients("t", rows, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        store.apply_gradients("t", rows, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="meta"):
        store.apply_gradients("t", rows, torch.zeros(2, 4, device="meta"))


def test_store_config_errors() -> None:
    with pytest.raises(ValueError, match="unique"):
        EmbeddingStore([TableConfig("a", 2), TableConfig("a", 3)])
    with pytest.raises(ValueError, match="at least one"):
        EmbeddingStore([])
    assert dataclasses.replace(TableConfig("a", 2), dim=3).dim == 3
