"""A plain-dict reference model of one embedding-store table, and a canonical store snapshot.

The reference keeps, per admitted key, its weights, optimizer state, last update and count, and
an exact count per unadmitted key instead of a sketch: it is what the store must be equivalent
to (with a sketch wide enough that the test's few keys never all collide). It uses the store's
own `initial_rows` for new rows — initialisation has its own tests — so that weights can be
compared exactly through training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from liverec.embedding_store import EmbeddingStore, TableConfig
from liverec.embedding_store.hashing import derive_seed
from liverec.embedding_store.initializer import initial_rows
from liverec.embedding_store.kernels import EMPTY_KEY

COUNT_CAP = 2**30


@dataclass
class RefRow:
    weights: np.ndarray
    state: dict[str, np.ndarray]
    last_update: int
    count: int = 0


@dataclass
class RefTable:
    config: TableConfig
    seed: int
    rows: dict[int, RefRow] = field(default_factory=dict)
    unadmitted: dict[int, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("admitted", "filtered", "expired", "evicted", "rejected_gradients"), 0))
    pinned: set[int] = field(default_factory=set)

    def lookup_train(self, keys: list[int], now: int) -> list[bool]:
        """Mirror of Table.lookup(train=True); returns, per key, whether it has a row."""
        hits = {k for k in keys if k in self.rows}
        misses = [k for k in keys if k not in self.rows]
        for k in misses:
            self.unadmitted[k] = self.unadmitted.get(k, 0) + 1
        candidates = sorted({k for k in misses if self.config.min_count == 1 or self.unadmitted[k] >= self.config.min_count})
        if candidates:
            candidates = candidates[: self._make_room(len(candidates), hits)]
        for key in candidates:
            self.rows[key] = self._new_row(key, now)
        self.counters["admitted"] += len(candidates)
        present = [k in self.rows for k in keys]
        if misses:
            self.counters["filtered"] += present.count(False)
        for key in keys:
            if key in self.rows:
                row = self.rows[key]
                row.count = min(row.count + 1, COUNT_CAP)
                row.last_update = max(row.last_update, now)
                self.pinned.add(key)
        return present

    def _new_row(self, key: int, now: int) -> RefRow:
        keys = torch.tensor([key], dtype=torch.int64)
        weights = initial_rows(self.config, derive_seed(self.seed, self.config.name), keys)[0].float().numpy()
        state = {}
        if self.config.optimizer == "adagrad":
            state["accumulator"] = np.full(self.config.dim, self.config.adagrad_init, dtype=np.float32)
        elif self.config.optimizer == "adam":
            state = {"exp_avg": np.zeros(self.config.dim, np.float32),
                     "exp_avg_sq": np.zeros(self.config.dim, np.float32), "step": np.zeros(1, np.float32)}
        return RefRow(weights.astype(np.float32), state, now)

    def _make_room(self, incoming: int, in_use: set[int]) -> int:
        if self.config.max_rows is None:
            return incoming
        room = self.config.max_rows - len(self.rows)
        if incoming <= room:
            return incoming
        evictable = [k for k in self.rows if k not in in_use and k not in self.pinned]
        if self.config.eviction == "lru":
            evictable.sort(key=lambda k: (self.rows[k].last_update, k))
        else:
            evictable.sort(key=lambda k: (self.rows[k].count, k))
        victims = evictable[: incoming - room]
        for key in victims:
            del self.rows[key]
        self.counters["evicted"] += len(victims)
        return room + len(victims)

    def apply_gradients(self, keys: list[int], present: list[bool], grads: np.ndarray) -> None:
        """Mirror of Table.apply_gradients: occurrences that had a row at lookup time, summed per
        key; a non-finite sum is rejected; one step per key."""
        self.pinned.clear()
        summed: dict[int, np.ndarray] = {}
        for key, had_row, grad in zip(keys, present, grads):
            if had_row:
                summed[key] = summed.get(key, np.zeros(self.config.dim, np.float32)) + grad.astype(np.float32)
        for key, grad in summed.items():
            if not np.isfinite(grad).all():
                self.counters["rejected_gradients"] += 1
                continue
            self._step(self.rows[key], grad)

    def _step(self, row: RefRow, grad: np.ndarray) -> None:
        c = self.config
        if c.optimizer == "sgd":
            row.weights = row.weights - np.float32(c.lr) * grad
        elif c.optimizer == "adagrad":
            row.state["accumulator"] = row.state["accumulator"] + grad * grad
            row.weights = row.weights - np.float32(c.lr) * grad / (np.sqrt(row.state["accumulator"]) + np.float32(c.eps))
        else:
            s = row.state
            s["step"] = s["step"] + 1
            s["exp_avg"] = np.float32(c.beta1) * s["exp_avg"] + np.float32(1 - c.beta1) * grad
            s["exp_avg_sq"] = np.float32(c.beta2) * s["exp_avg_sq"] + np.float32(1 - c.beta2) * grad * grad
            bias1 = 1 - np.float32(c.beta1) ** s["step"]
            bias2 = 1 - np.float32(c.beta2) ** s["step"]
            denom = np.sqrt(s["exp_avg_sq"] / bias2) + np.float32(c.eps)
            row.weights = row.weights - np.float32(c.lr) * (s["exp_avg"] / bias1) / denom

    def expire(self, now: int) -> None:
        if self.config.ttl_s is None:
            return
        stale = [k for k, row in self.rows.items() if k not in self.pinned and row.last_update < now - self.config.ttl_s]
        for key in stale:
            del self.rows[key]
        self.counters["expired"] += len(stale)

    def clone(self) -> RefTable:
        return copy.deepcopy(self)


def snapshot(store: EmbeddingStore) -> dict[str, object]:
    """Everything that defines a store's behaviour, in canonical (key-sorted) CPU form."""
    tables = {}
    for name, table in store.tables.items():
        keys, rows = table.index.items()
        order = torch.argsort(keys)
        keys, rows = keys[order], rows[order]
        tables[name] = {
            "keys": keys.cpu(),
            "rows": rows.cpu(),
            **{column: tensor[rows].cpu() for column, tensor in table.columns().items()},
            "high_water": table.index.high_water,
            "counters": dict(table.counters),
            "sketch": None if table.sketch is None else (table.sketch.counters.cpu().clone(), table.sketch.total),
        }
    return {"version": store.version, "tables": tables}


def assert_snapshots_equal(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["version"] == b["version"]
    assert a["tables"].keys() == b["tables"].keys()
    for name in a["tables"]:
        left, right = a["tables"][name], b["tables"][name]
        assert left.keys() == right.keys()
        for field_name, value in left.items():
            other = right[field_name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"{name}.{field_name} differs"
            elif isinstance(value, tuple):
                assert torch.equal(value[0], other[0]) and value[1] == other[1], f"{name}.{field_name} differs"
            else:
                assert value == other, f"{name}.{field_name} differs"


def assert_matches_reference(store: EmbeddingStore, references: dict[str, RefTable]) -> None:
    """The store holds exactly the reference's keys, each in its own row, with its values."""
    for name, ref in references.items():
        table = store.table(name)
        keys, rows = table.index.items()
        assert torch.unique(rows).numel() == rows.numel(), "two keys share a row"
        assert torch.unique(keys).numel() == keys.numel(), "a key holds two slots"
        assert sorted(keys.tolist()) == sorted(ref.rows), f"{name}: live keys differ"
        assert torch.equal(table.keys_by_row[rows], keys)
        assert int((table.keys_by_row != EMPTY_KEY).sum()) == len(ref.rows)
        assert table.counters == ref.counters, f"{name}: counters {table.counters} != {ref.counters}"
        by_key = dict(zip(keys.tolist(), rows.tolist()))
        for key, expected in ref.rows.items():
            row = by_key[key]
            np.testing.assert_allclose(table.weights[row].float().numpy(), expected.weights, rtol=1e-4, atol=1e-6)
            for state_name, value in expected.state.items():
                np.testing.assert_allclose(table.state[state_name][row].numpy(), value, rtol=1e-4, atol=1e-7)
            assert int(table.last_update_s(torch.tensor([row]))) == expected.last_update
            assert int(table.counts[row]) == expected.count
