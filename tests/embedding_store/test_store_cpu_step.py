"""The compiled CPU train-step kernels against the torch ops they replace, and columns that grow
in reserved address space against columns that grow by copy."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from liverec.embedding_store import EmbeddingStore, TableConfig, storage
from liverec.embedding_store.admission import CountMinSketch
from liverec.embedding_store.initializer import initial_rows, write_initial_rows
from liverec.embedding_store.kernels import cpu, cpu_step

from store_reference import assert_snapshots_equal, snapshot

GENERATOR = torch.Generator().manual_seed(3)
EXTREMES = [-(2**63) + 2, -(2**63) + 3, -1, 0, 1, 255, 256, 2**63 - 1, 2**63 - 2]


@pytest.mark.parametrize("initializer", ["normal", "uniform", "zeros"])
@pytest.mark.parametrize("dim", [1, 7, 64])
@pytest.mark.parametrize("scale", [0.01, 0.5, 1.0])
def test_new_rows_written_in_place_are_initial_rows_bit_for_bit(initializer: str, dim: int, scale: float) -> None:
    config = TableConfig("t", dim, initializer=initializer, init_scale=scale)
    keys = torch.cat([torch.randint(-(2**62), 2**62, (5000,), generator=GENERATOR), torch.tensor(EXTREMES)])
    weights = torch.full((keys.numel() + 10, dim), 7.0)
    rows = torch.randperm(keys.numel() + 10, generator=GENERATOR)[: keys.numel()]
    write_initial_rows(config, 1234, keys, weights, rows)
    assert torch.equal(weights[rows].view(torch.int32), initial_rows(config, 1234, keys).view(torch.int32))
    untouched = torch.ones(weights.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert bool((weights[untouched] == 7.0).all())


@pytest.mark.parametrize("with_sketch", [True, False])
def test_admission_candidates_are_the_sketch_estimates_of_the_missed_keys_sorted(with_sketch: bool) -> None:
    """Same counters and totals as `add_and_estimate` on the missed keys, and the candidates are
    the missed keys reaching min_count, in ascending (signed) order."""
    compiled = CountMinSketch(0.01, 0.05, seed=1, max_count=3)
    reference = CountMinSketch(0.01, 0.05, seed=1, max_count=3)
    for _ in range(5):
        distinct = torch.unique(torch.cat([torch.randint(-400, 400, (300,), generator=GENERATOR) * (2**54 + 7),
                                           torch.tensor(EXTREMES)]))
        distinct = distinct[torch.randperm(distinct.numel(), generator=GENERATOR)]
        occurrences = torch.randint(1, 4, (distinct.numel(),), generator=GENERATOR)
        rows = torch.where(torch.rand(distinct.numel(), generator=GENERATOR) < 0.3, 5, -1)
        missing = rows < 0
        sketch = compiled.kernel_arguments() if with_sketch else None
        keys, index, added = cpu_step.admission_candidates(distinct, occurrences, rows, sketch, 3)
        if with_sketch:
            compiled.total += added
            estimates = reference.add_and_estimate(distinct[missing], occurrences[missing])
            expected = torch.sort(distinct[missing][estimates >= 3]).values
            assert torch.equal(compiled.counters, reference.counters) and compiled.total == reference.total
        else:
            expected = torch.sort(distinct[missing]).values
        assert torch.equal(keys, expected)
        assert torch.equal(distinct[index], keys)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_gradient_step_with_the_lookups_occurrence_lists_equals_the_step_from_inverse(optimizer: str) -> None:
    """The table hands the step the occurrence lists of its lookup; the baselines pass the
    inverse map. Same bits either way, non-finite rows rejected and left as they were."""
    keys = torch.randint(0, 300, (4000,), generator=GENERATOR)
    slots, row_keys = torch.full((1024,), -1, dtype=torch.int32), torch.full((512,), -(2**63), dtype=torch.int64)
    counts, last = torch.zeros(512, dtype=torch.int32), torch.zeros(512, dtype=torch.int32)
    dedup, _ = cpu_step.dedup_find(slots, row_keys, keys, counts, last, 0, 2**30)
    assert torch.equal(dedup.distinct[dedup.inverse], keys)
    rows = torch.randperm(500, generator=GENERATOR)[: dedup.distinct.numel()]
    rows[::7] = -1
    grads = torch.randn(keys.numel(), 16, generator=GENERATOR)
    grads[dedup.inverse == 3, 2] = float("nan")
    columns = {"sgd": {}, "adagrad": {"accumulator": 16}, "adam": {"exp_avg": 16, "exp_avg_sq": 16, "step": 1}}
    results = []
    for lists in (None, (dedup.head, dedup.nxt)):
        weights = torch.arange(500 * 16, dtype=torch.float32).view(500, 16) / 1000
        state = {name: torch.full((500, width), 0.1) for name, width in columns[optimizer].items()}
        rejected = cpu_step.apply_gradients(optimizer, weights, state, rows, dedup.inverse, grads, lr=0.1, eps=1e-8,
                                            beta1=0.9, beta2=0.999, lists=lists)
        results.append((weights, state, rejected))
    (w0, s0, r0), (w1, s1, r1) = results
    assert torch.equal(w0, w1) and all(torch.equal(s0[name], s1[name]) for name in s0) and torch.equal(r0, r1)
    assert r0.tolist() == [bool(rows[3] >= 0) and d == 3 for d in range(rows.numel())]
    untouched = torch.arange(500 * 16, dtype=torch.float32).view(500, 16) / 1000
    if rows[3] >= 0:
        assert torch.equal(w0[rows[3]], untouched[rows[3]])


def test_gather_reads_zeros_for_rows_of_minus_one() -> None:
    weights = torch.randn(100, 8, generator=GENERATOR)
    rows = torch.randint(-1, 100, (1000,), generator=GENERATOR)
    expected = torch.where((rows >= 0).unsqueeze(1), weights[rows.clamp(min=0)], 0.0)
    assert torch.equal(cpu_step.gather(weights, rows), expected)


def test_rows_found_are_touched_and_new_rows_stamped_with_their_keys_occurrences() -> None:
    """Counts saturate at the cap and last updates never move backwards; a key without a row
    touches nothing until it gets one, and then its row counts all of its occurrences."""
    slots, row_keys = torch.full((16,), -1, dtype=torch.int32), torch.full((4,), -(2**63), dtype=torch.int64)
    cpu.insert(slots, row_keys, torch.tensor([20, 30]), torch.tensor([1, 2]))
    counts, last = torch.tensor([0, 2**30 - 1, 5, 0], dtype=torch.int32), torch.tensor([9, 3, 11, 0], dtype=torch.int32)
    keys = torch.tensor([30] * 3 + [99] * 4 + [20] * 5 + [77] * 6)
    keys = keys[torch.randperm(keys.numel(), generator=GENERATOR)]
    dedup, rows = cpu_step.dedup_find(slots, row_keys, keys, counts, last, 10, 2**30)
    assert dict(zip(dedup.distinct.tolist(), rows.tolist())) == {30: 2, 99: -1, 20: 1, 77: -1}
    assert counts.tolist() == [0, 2**30, 8, 0] and last.tolist() == [9, 10, 11, 0]
    new = dedup.distinct.tolist().index(77)
    accumulator = torch.zeros(4, 2)
    stamped = cpu_step.new_row_metadata(torch.tensor([3]), torch.tensor([new]), rows, dedup.occurrences,
                                        [(accumulator, 0.5)], last, 12, counts, 2**30)
    assert stamped == 6 and rows[new] == 3
    assert counts.tolist() == [0, 2**30, 8, 6] and last.tolist() == [9, 10, 11, 12]
    assert accumulator[3].tolist() == [0.5, 0.5] and not accumulator[:3].any()


def test_a_reserved_column_grows_in_place_and_moves_when_its_reservation_is_full(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "RESERVE_MIN_BYTES", 4096)
    monkeypatch.setattr(storage, "RESERVE_FACTOR", 4)
    small = storage.grown(torch.arange(10, dtype=torch.int64), 20)
    assert small.untyped_storage().nbytes() == 20 * 8  # below the threshold: an ordinary copy
    first = storage.grown(torch.arange(600, dtype=torch.float32).view(100, 6), 200)
    assert torch.equal(first[:100].flatten(), torch.arange(600, dtype=torch.float32))
    second = storage.grown(first, 700)
    assert second.data_ptr() == first.data_ptr() and second.shape == (700, 6)
    second[150] = 1.5
    assert bool((first[150] == 1.5).all()), "a view taken before the growth sees the same memory"
    moved = storage.grown(second, 5000)
    assert moved.data_ptr() != second.data_ptr()
    assert torch.equal(moved[:700], second)


def _trained_store(batch: int = 400) -> EmbeddingStore:
    """Two tables (admission, expiry, Adam / Adagrad, both initializers) after 30 train steps."""
    configs = [TableConfig("t", 8, initial_capacity=4, min_count=2, ttl_s=5, optimizer="adam"),
               TableConfig("u", 3, initial_capacity=2, optimizer="adagrad", initializer="uniform")]
    store = EmbeddingStore(configs, seed=4)
    store.mark()
    generator = torch.Generator().manual_seed(0)
    for now in range(30):
        for config in configs:
            keys = torch.randint(0, 3000, (batch,), generator=generator)
            rows = store.lookup(config.name, keys, train=True, now_s=now)
            store.apply_gradients(config.name, rows, torch.randn(batch, config.dim, generator=generator))
        if now % 4 == 0:
            store.expire(now)
    return store


def _assert_stores_equal(mine: EmbeddingStore, theirs: EmbeddingStore) -> None:
    assert_snapshots_equal(snapshot(mine), snapshot(theirs))
    assert mine.stats() == theirs.stats()
    for name in ("t", "u"):
        left, right = mine.export_delta(mark=False)[name], theirs.export_delta(mark=False)[name]
        assert torch.equal(left.keys, right.keys) and torch.equal(left.weights, right.weights)


def test_a_store_whose_columns_live_in_reservations_equals_one_grown_by_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    copied = _trained_store()
    monkeypatch.setattr(storage, "RESERVE_MIN_BYTES", 256)
    reserved = _trained_store()
    assert reserved.table("t").weights.untyped_storage().nbytes() > reserved.table("t").weights.numel() * 4
    _assert_stores_equal(reserved, copied)


def test_kernels_run_on_one_thread_below_their_parallel_minimum_and_restore_the_thread_count() -> None:
    threads = numba.get_num_threads()
    assert threads >= 2, "needs a machine with two cores or more"
    with cpu_step._threads_for(10, 100) as chunks:
        assert chunks == 1 and numba.get_num_threads() == 1
    assert numba.get_num_threads() == threads
    with pytest.raises(RuntimeError), cpu_step._threads_for(10, 100):
        raise RuntimeError("a kernel failed")
    assert numba.get_num_threads() == threads
    with cpu_step._threads_for(100, 100) as chunks:
        assert chunks == threads and numba.get_num_threads() == threads


def test_a_store_trained_on_one_thread_equals_one_trained_on_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every train-step kernel forced parallel, then forced serial: the same store, bit for bit
    (rows are dealt to threads whole, and each row's gradients are summed in occurrence order)."""
    monkeypatch.setattr(cpu_step, "PARALLEL_MIN", 0)
    monkeypatch.setattr(cpu_step, "PARALLEL_MIN_ROWS", 0)
    parallel = _trained_store(batch=3000)
    monkeypatch.setattr(cpu_step, "PARALLEL_MIN", 2**62)
    monkeypatch.setattr(cpu_step, "PARALLEL_MIN_ROWS", 2**62)
    _assert_stores_equal(_trained_store(batch=3000), parallel)


def test_radix_sort_orders_any_int64_keys() -> None:
    rng = np.random.default_rng(0)
    for keys in (rng.integers(-(2**63) + 2, 2**63 - 1, 3000, dtype=np.int64), np.arange(500, dtype=np.int64)[::-1].copy(),
                 np.array(EXTREMES, dtype=np.int64), np.empty(0, dtype=np.int64)):
        keys = np.unique(keys)
        rng.shuffle(keys)
        values = np.arange(keys.shape[0], dtype=np.int64)
        ordered, carried = cpu_step._sorted_pairs(keys.copy(), values.copy())
        order = np.argsort(keys)
        assert np.array_equal(ordered, keys[order]) and np.array_equal(carried, values[order])


def test_a_released_reservation_is_reused_and_the_pool_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    monkeypatch.setattr(storage, "RESERVE_MIN_BYTES", 4096)
    monkeypatch.setattr(storage, "_POOL", [])
    column = storage.grown(torch.arange(1000, dtype=torch.int64), 2000)
    address = column.data_ptr()
    view = column[10:20]
    del column
    gc.collect()
    assert storage._POOL == [], "a view still holds the reservation"
    del view
    gc.collect()
    reused = storage.grown(torch.zeros(600, dtype=torch.float32), 1200)
    assert reused.data_ptr() == address and torch.equal(reused[:600], torch.zeros(600))
    columns = [storage.grown(torch.zeros(1000, dtype=torch.int64), 2000) for _ in range(storage.POOL_SIZE + 3)]
    del columns
    gc.collect()
    assert len(storage._POOL) == storage.POOL_SIZE
