"""Property test: random interleavings of store operations against the plain-dict reference.

Rules: train steps (one or two lookups of a table, then gradients — sometimes non-finite — or an
abandoned step), eval lookups, expiry, bursts of new keys (growth of index and rows), explicit
rehash, full and incremental checkpoints, and restores of any saved checkpoint. After every
rule the store must hold exactly the reference's keys, one row each, with the reference's
weights, optimizer state, last update, count and counters; a restore must give a store equal to
the one that was saved. Hypothesis is derandomized, so the run is the same every time.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from store_reference import RefTable, assert_matches_reference, assert_snapshots_equal, snapshot

from liverec.embedding_store import EmbeddingStore, TableConfig, checkpoint

CONFIGS = [
    TableConfig("lru_adagrad", dim=4, initial_capacity=2, min_count=2, sketch_epsilon=1e-4, ttl_s=6,
                max_rows=6, eviction="lru", optimizer="adagrad", lr=0.1),
    TableConfig("lfu_adam", dim=3, initial_capacity=4, min_count=1, max_rows=5, eviction="lfu",
                optimizer="adam", lr=0.05),
    TableConfig("ttl_sgd", dim=2, initial_capacity=1, min_count=3, sketch_epsilon=1e-4, ttl_s=3,
                optimizer="sgd", lr=0.5, initializer="uniform", init_scale=0.1),
]
SEED = 7
KEYS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -3, -(2**63) + 2, 2**63 - 1, 123456789012345])
TABLES = st.sampled_from([config.name for config in CONFIGS])


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="store-sm-"))
        self.store = EmbeddingStore(CONFIGS, seed=SEED)
        self.refs = {config.name: RefTable(config, SEED) for config in CONFIGS}
        self.now = 1000
        self.saved: list[tuple[Path, dict[str, object], dict[str, RefTable]]] = []

    @initialize()
    def start(self) -> None:
        assert_matches_reference(self.store, self.refs)

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _lookup(self, table: str, keys: list[int]) -> tuple[torch.Tensor, list[bool]]:
        rows = self.store.lookup(table, torch.tensor(keys, dtype=torch.int64), train=True, now_s=self.now)
        present = self.refs[table].lookup_train(keys, self.now)
        assert (rows >= 0).tolist() == present
        return rows, present

    @rule(table=TABLES, first=st.lists(KEYS, min_size=1, max_size=8), second=st.lists(KEYS, max_size=6),
          grad_seed=st.integers(0, 2**16), poison=st.booleans(), dt=st.integers(0, 3))
    def train_step(self, table: str, first: list[int], second: list[int], grad_seed: int, poison: bool,
                   dt: int) -> None:
        """One trainer step: up to two lookups of a table (pins protect the first from the
        second's evictions), then one gradient per occurrence, summed per key."""
        self.now += dt
        lookups = [self._lookup(table, first)]
        if second:
            lookups.append(self._lookup(table, second))
        rows = [found for found, _ in lookups]
        present = [had_row for _, flags in lookups for had_row in flags]
        keys = first + second
        dim = self.store.table(table).config.dim
        grads = np.random.default_rng(grad_seed).integers(-8, 9, size=(len(keys), dim)).astype(np.float32) / 4
        if poison:
            grads[0, 0] = np.nan
        self.store.apply_gradients(table, torch.cat(rows), torch.from_numpy(grads))
        self.refs[table].apply_gradients(keys, present, grads)

    @rule(table=TABLES, keys=st.lists(KEYS, min_size=1, max_size=6), dt=st.integers(0, 3))
    def abandoned_step(self, table: str, keys: list[int], dt: int) -> None:
        """Lookups whose step is dropped: counts and times move, weights do not; pins released."""
        self.now += dt
        self._lookup(table, keys)
        self.store.unpin()
        for ref in self.refs.values():
            ref.pinned.clear()

    @rule(table=TABLES, keys=st.lists(KEYS, min_size=1, max_size=8))
    def eval_lookup(self, table: str, keys: list[int]) -> None:
        embeddings = self.store.embed(table, torch.tensor(keys, dtype=torch.int64))
        ref = self.refs[table]
        for key, vector in zip(keys, embeddings):
            if key in ref.rows:
                np.testing.assert_allclose(vector.numpy(), ref.rows[key].weights, rtol=1e-4, atol=1e-6)
            else:
                assert not vector.any(), "an unadmitted key must read zeros"

    @rule(dt=st.integers(0, 8))
    def expire(self, dt: int) -> None:
        self.now += dt
        removed = self.store.expire(self.now)
        for name, ref in self.refs.items():
            before = len(ref.rows)
            ref.expire(self.now)
            assert removed[name] == before - len(ref.rows)

    @rule(table=TABLES, start=st.integers(10**6, 10**6 + 1000), count=st.integers(20, 60))
    def burst(self, table: str, start: int, count: int) -> None:
        """Many new keys at once, each seen min_count times: grows the index and the row tensors."""
        keys = list(range(start, start + count)) * self.store.table(table).config.min_count
        self._lookup(table, keys)
        self.store.unpin()
        self.refs[table].pinned.clear()

    @rule(table=TABLES, factor=st.sampled_from([1, 2, 4]))
    def rehash(self, table: str, factor: int) -> None:
        index = self.store.table(table).index
        index.rehash(max(index.capacity * factor, int(len(index) / index.max_load) + 1))

    @rule(incremental=st.booleans())
    def save(self, incremental: bool) -> None:
        incremental = incremental and self.store.last_checkpoint is not None
        path = checkpoint.save(self.store, self.root, incremental=incremental)
        self.saved.append((path, snapshot(self.store), {n: r.clone() for n, r in self.refs.items()}))

    @precondition(lambda self: bool(self.saved))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        path, saved_snapshot, saved_refs = data.draw(st.sampled_from(self.saved))
        restored = checkpoint.restore(path)
        assert_snapshots_equal(snapshot(restored), saved_snapshot)
        self.store = restored
        self.refs = {name: ref.clone() for name, ref in saved_refs.items()}

    @invariant()
    def matches_reference(self) -> None:
        assert_matches_reference(self.store, self.refs)


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
