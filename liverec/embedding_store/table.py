"""One embedding table: a hash index from keys to rows, and dense per-row tensors.

Everything per row lives in a dense tensor indexed by row: the weights, the optimizer state, the
row's key (held by the index, which probes against it), the event time of its last update, its
count and its dirty flags. A batch operation is therefore a handful of gathers and scatters over
row indices, on whatever device the table is on.

Bytes per row beyond weights and optimizer state (what `stats()` reports, by component):
- metadata, 16 per metadata row: key (int64, 8), last update (int32 seconds from TIME_BASE_S,
  4), count (int32, saturating at 2**30, 4); plus 1 per active change log (dirty flags). These
  columns grow by a 32nd (`grown_metadata_rows`), so they hold at most ~1/32 more rows
  than the high-water mark; the weights and optimizer state grow by half (`grown_rows`: fewer
  copies of the big rows on CUDA), and `row_capacity` counts those. On the CPU the columns
  from 1 MB on grow in place, in reserved address space, without copies (storage.py);
- index, 4 per slot: int32 row ids at load <= max_load (default 0.75), so 4 / load per key
  (5.3 to 6.7 on the CPU, where the index grows by a quarter; up to 10.7 on CUDA's powers of
  two); the free rows are derived from the keys, not stored;
- admission sketch, fixed: depth x width counters (see admission.py), shared by all rows.
Rows freed by expiry or eviction keep their metadata and weights for reuse (lowest first); the
high-water mark does not come down.

Train lookups follow the Monolith lifecycle:

1. deduplicate the batch's keys and find each distinct key; the misses are keys without a row;
2. admission: misses are counted in the count-min sketch; those whose estimate reached
   `min_count` are admitted (deduplicated, sorted), the rest read zeros and get no update;
3. if `max_rows` would be exceeded, evict (LRU by last update, LFU by count, ties by smaller key)
   among rows not in use by this step; if too few can go, only the smallest new keys are admitted;
4. new keys get rows from the index (lowest free rows first) and deterministic initial weights;
5. every row hit is touched: its count grows by its occurrences and its last update becomes the
   event time (never moving backwards).

Rows returned by a train lookup are pinned until `apply_gradients` on this table (or `unpin`):
neither eviction nor expiry may hand a row to another key while its gradient is still coming.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from liverec.embedding_store import optimizers
from liverec.embedding_store.admission import CountMinSketch
from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.dirty import ChangeLog
from liverec.embedding_store.hash_index import HashIndex, check_key_tensor, check_keys, grown_rows
from liverec.embedding_store.hashing import derive_seed
from liverec.embedding_store.initializer import write_initial_rows
from liverec.embedding_store.kernels import EMPTY_KEY, cpu_step
from liverec.embedding_store.storage import grown

COUNT_CAP = 2**30
# Last-update times are stored as int32 seconds from this base (2023-11-14T22:13:20Z): event
# times from 1955 to 2091 fit, at half the bytes of an int64.
TIME_BASE_S = 1_700_000_000
_TIME_MIN_S = TIME_BASE_S - 2**31
_TIME_MAX_S = TIME_BASE_S + 2**31 - 1
COUNTERS = ("admitted", "filtered", "expired", "evicted", "rejected_gradients")


@dataclass(frozen=True)
class TableStats:
    """What a table holds and what it has done; the trainer exports these as metrics.

    bytes_overhead is everything beyond weights and optimizer state: the hash index slots and
    free list, the per-row metadata (key, last update, count, dirty flags) and the sketch.
    `*_per_row` divide by live rows (`rows`); `*_per_allocated_row` by `row_capacity`, the
    denominator the weights themselves are allocated by.
    """

    rows: int
    capacity: int
    row_capacity: int
    load: float
    admitted: int
    filtered: int
    expired: int
    evicted: int
    rejected_gradients: int
    bytes_weights: int
    bytes_optimizer: int
    bytes_index: int
    bytes_metadata: int
    bytes_sketch: int

    @property
    def bytes_used(self) -> int:
        return self.bytes_weights + self.bytes_optimizer + self.bytes_overhead

    @property
    def bytes_overhead(self) -> int:
        return self.bytes_index + self.bytes_metadata + self.bytes_sketch

    @property
    def overhead_bytes_per_row(self) -> float:
        return self.bytes_overhead / max(self.rows, 1)

    @property
    def metadata_bytes_per_row(self) -> float:
        return self.bytes_metadata / max(self.rows, 1)

    @property
    def overhead_bytes_per_allocated_row(self) -> float:
        return self.bytes_overhead / max(self.row_capacity, 1)


@dataclass(frozen=True)
class TableDelta:
    """Changes since a mark: rows to upsert (keys, their weights) and keys to drop."""

    keys: torch.Tensor
    weights: torch.Tensor
    removed: torch.Tensor
    version: int


@dataclass(frozen=True)
class _Dedup:
    """The last train lookup's rows and how they came from its distinct keys:
    rows == distinct_rows[inverse], distinct_rows unique except for -1 (unadmitted keys);
    on the CPU also each distinct key's occurrence lists (`cpu_step.Dedup`)."""

    rows: torch.Tensor
    distinct_rows: torch.Tensor
    inverse: torch.Tensor
    lists: tuple[torch.Tensor, torch.Tensor] | None = None


class Table:
    """A collisionless embedding table on one device."""

    def __init__(self, config: TableConfig, *, seed: int, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.init_seed = derive_seed(seed, config.name)
        slots = int(config.initial_capacity / config.max_load) + 1
        self.index = HashIndex(slots, max_load=config.max_load, rows=config.initial_capacity, device=device)
        self.sketch = (
            CountMinSketch(config.sketch_epsilon, config.sketch_delta, seed=derive_seed(seed, config.name, "sketch"),
                           device=device, max_count=config.min_count)
            if config.min_count > 1 else None
        )
        rows = config.initial_capacity
        self.weights = torch.zeros(rows + 1, config.dim, dtype=config.torch_dtype, device=device)
        self.state = {name: optimizers.initial_state(config, name, rows, device) for name in optimizers.state_columns(config)}
        self.last_update = torch.zeros(rows, dtype=torch.int32, device=device)
        self.counts = torch.zeros(rows, dtype=torch.int32, device=device)
        self.logs: dict[str, ChangeLog] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._pins: list[torch.Tensor] = []
        self._dedup: _Dedup | None = None

    @property
    def row_capacity(self) -> int:
        """Rows the weights and optimizer state are allocated for (the weights hold one more: the
        shared zero row)."""
        return self.weights.shape[0] - 1

    @property
    def metadata_rows(self) -> int:
        """Rows the per-row metadata (keys, last update, count, change flags) is allocated for."""
        return self.counts.numel()

    @property
    def keys_by_row(self) -> torch.Tensor:
        """The key of each row (EMPTY_KEY: free); the index's row_keys, metadata_rows long."""
        return self.index.row_keys

    def last_update_s(self, rows: torch.Tensor) -> torch.Tensor:
        """Event time (int64 seconds) of the last update of each row."""
        return self.last_update.index_select(0, rows).long() + TIME_BASE_S

    def __len__(self) -> int:
        return len(self.index)

    # ----------------------------------------------------------------- lookups

    def lookup(self, keys: torch.Tensor, *, train: bool, now_s: int | None) -> torch.Tensor:
        """Row per key (-1: no row). In train mode, admit, insert, evict and touch (see module doc).

        A train lookup deduplicates the batch once, up front: the index is probed, misses
        counted, rows touched and (later) gradients summed per distinct key, and the per-key rows
        are one gather from the distinct keys' rows."""
        if not train:
            return self.index.find(keys)
        if now_s is None:
            raise ValueError("a train lookup needs now_s, the batch's event time in seconds")
        _check_time(now_s)
        lists = None
        if self.device.type == "cpu":
            check_key_tensor(keys, self.device)  # the reserved keys: dedup_find's own pass
            dedup, distinct_rows = cpu_step.dedup_find(self.index.slots, self.index.row_keys, keys, self.counts,
                                                       self.last_update, int(now_s) - TIME_BASE_S, COUNT_CAP)
            inverse, lists = dedup.inverse, (dedup.head, dedup.nxt)
            self.counters["filtered"] += self._admit_compiled(dedup.distinct, dedup.occurrences, distinct_rows,
                                                              int(now_s))
            if self.logs:
                self._changed(distinct_rows[distinct_rows >= 0])
        else:
            check_keys(keys, self.device)
            distinct, inverse, occurrences = torch.unique(keys, return_inverse=True, return_counts=True)
            distinct_rows = self.index.find(distinct)
            missing = distinct_rows < 0
            if bool(missing.any()):
                self._admit(distinct, occurrences, distinct_rows, missing, int(now_s))
                self.counters["filtered"] += int(occurrences[distinct_rows < 0].sum())
            self._touch(distinct_rows, occurrences, int(now_s))
        self._pins.append(distinct_rows)
        rows = _take(distinct_rows, inverse)
        self._dedup = _Dedup(rows, distinct_rows, inverse, lists)
        return rows

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Weights of `rows`; zeros where the row is -1 (an unadmitted key).

        The weight tensor keeps one always-zero row past the last real row, so this is a single
        gather with -1 redirected there, not a gather followed by a masking pass. On the CPU
        (float32) a compiled gather writes the zeros itself and prefetches the rows ahead."""
        if self.device.type == "cpu" and self.weights.dtype == torch.float32:
            return cpu_step.gather(self.weights, rows)
        zero_row = self.row_capacity
        return self.weights.index_select(0, torch.where(rows < 0, zero_row, rows))

    def frequency(self, keys: torch.Tensor) -> torch.Tensor:
        """Train-lookup count per key: the row's count if admitted, else the sketch estimate (at
        most the sketch's counter cap, e.g. 3 at min_count <= 3: see admission.py)."""
        rows = self.index.find(keys)
        counts = self.counts.index_select(0, rows.clamp(min=0)).long()
        if self.sketch is None:
            return torch.where(rows >= 0, counts, 0)
        return torch.where(rows >= 0, counts, self.sketch.estimate(keys))

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, weights) of every row, ordered by row: the catalog for full scoring."""
        keys, rows = self.index.items()
        return keys, self.weights.index_select(0, rows)

    def _admit(self, distinct: torch.Tensor, occurrences: torch.Tensor, rows: torch.Tensor, missing: torch.Tensor,
               now_s: int) -> None:
        """Count the missed distinct keys, admit those that reached min_count (smallest keys first
        if max_rows leaves too little room), and write their new rows into `rows`."""
        missed = distinct[missing]
        if self.sketch is None:
            eligible = torch.arange(missed.numel(), device=self.device)
        else:
            estimates = self.sketch.add_and_estimate(missed, occurrences[missing])
            eligible = torch.nonzero(estimates >= self.config.min_count).flatten()
        if eligible.numel() == 0:
            return
        eligible = eligible[torch.argsort(missed[eligible])]  # new keys take rows in key order
        eligible = eligible[: self._make_room(eligible.numel(), in_use=rows)]
        if eligible.numel() == 0:
            return
        new_keys = missed[eligible]
        new_rows = self.index.insert_missed(new_keys)  # missed by this step's find, sorted, unique
        self._ensure_row_capacity(self.index.high_water)
        self._init_rows(new_keys, new_rows, now_s)
        self.counters["admitted"] += new_keys.numel()
        row_of_missed = torch.full_like(missed, -1)
        row_of_missed[eligible] = new_rows
        rows[missing] = row_of_missed

    def _admit_compiled(self, distinct: torch.Tensor, occurrences: torch.Tensor, rows: torch.Tensor, now_s: int) -> int:
        """`_admit` and `_touch` of the new rows on the CPU (`dedup_find` touched the rows it
        found): counting, choosing and sorting the candidates in one compiled pass over the
        distinct keys, and the new rows' weights, state and metadata written in place by
        compiled kernels (the same values, without mask, sort and fill passes). Returns the
        occurrences of the keys left without a row."""
        sketch = None if self.sketch is None else self.sketch.kernel_arguments()
        keys, index, missed = cpu_step.admission_candidates(distinct, occurrences, rows, sketch, self.config.min_count)
        if self.sketch is not None:
            self.sketch.total += missed
        admitted = self._make_room(keys.numel(), in_use=rows) if keys.numel() else 0
        if admitted == 0:
            return missed
        keys, index = keys[:admitted], index[:admitted]
        new_rows = self.index.insert_missed(keys)  # missed by this step's find, sorted, unique
        self._ensure_row_capacity(self.index.high_water)
        write_initial_rows(self.config, self.init_seed, keys, self.weights, new_rows)
        state = [(tensor, optimizers.initial_value(self.config, name)) for name, tensor in self.state.items()]
        missed -= cpu_step.new_row_metadata(new_rows, index, rows, occurrences, state, self.last_update,
                                            now_s - TIME_BASE_S, self.counts, COUNT_CAP)
        self._changed(new_rows)
        self.counters["admitted"] += admitted
        return missed

    def _init_rows(self, keys: torch.Tensor, rows: torch.Tensor, now_s: int) -> None:
        write_initial_rows(self.config, self.init_seed, keys, self.weights, rows)
        for name, state in self.state.items():
            state.index_fill_(0, rows, optimizers.initial_value(self.config, name))
        self.last_update.index_fill_(0, rows, now_s - TIME_BASE_S)
        self.counts.index_fill_(0, rows, 0)
        self._changed(rows)

    def _touch(self, rows: torch.Tensor, occurrences: torch.Tensor, now_s: int) -> None:
        """Count (saturating) and time-stamp unique `rows` (-1: none, skipped), seen `occurrences`
        times each (the CPU does this in its compiled passes: `cpu_step.dedup_find` for the rows
        found, `cpu_step.new_row_metadata` for the new ones)."""
        present = rows >= 0
        rows, occurrences = rows[present], occurrences[present]
        if rows.numel() == 0:
            return
        counts = (self.counts.index_select(0, rows) + occurrences).clamp_max_(COUNT_CAP)
        self.counts.index_copy_(0, rows, counts.to(torch.int32))
        self.last_update.index_copy_(0, rows, self.last_update.index_select(0, rows).clamp_min_(now_s - TIME_BASE_S))
        self._changed(rows)

    # ----------------------------------------------------------------- updates

    def apply_gradients(self, rows: torch.Tensor, grads: torch.Tensor) -> int:
        """One optimizer step on the rows of a train lookup; duplicate rows' gradients summed first.

        Rows of -1 (unadmitted keys) are skipped. A row whose summed gradient is not finite is
        rejected: left untouched and counted. (The test is on the row's sum of components: NaN
        and inf propagate into it, and one reduction is much cheaper than an element-wise check;
        a finite gradient whose components sum beyond float32 range is rejected too.) Returns the
        number of rejected rows. Unpins the table. When `rows` is the very tensor the last train
        lookup returned, its deduplication is reused.
        """
        self._check_grads(rows, grads)
        self._pins.clear()
        dedup = self._dedup if self._dedup is not None and self._dedup.rows is rows else None
        self._dedup = None
        lists = None
        if dedup is None:
            distinct_rows, inverse = torch.unique(rows, return_inverse=True)
        elif self.device.type == "cpu":
            distinct_rows, inverse, lists = dedup.distinct_rows, dedup.inverse, dedup.lists
        else:
            distinct_rows, inverse = _sorted(dedup.distinct_rows, dedup.inverse)
        if self.device.type == "cpu" and self.weights.dtype == torch.float32:
            return self._apply_compiled(distinct_rows, inverse, grads, lists)
        summed = torch.zeros(distinct_rows.numel(), self.config.dim, dtype=torch.float32, device=self.device)
        summed.scatter_add_(0, inverse.unsqueeze(1).expand(-1, self.config.dim), grads.float())
        present = distinct_rows >= 0
        finite = torch.isfinite(summed.sum(dim=1))
        rejected = int((present & ~finite).sum())
        self.counters["rejected_gradients"] += rejected
        keep = present & finite
        if not bool(keep.all()):
            distinct_rows, summed = distinct_rows[keep], summed[keep]
        optimizers.update(self.config, self.weights, self.state, distinct_rows, summed)
        self._changed(distinct_rows)
        return rejected

    def _apply_compiled(self, distinct_rows: torch.Tensor, inverse: torch.Tensor, grads: torch.Tensor,
                        lists: tuple[torch.Tensor, torch.Tensor] | None) -> int:
        c = self.config
        rejected_rows = cpu_step.apply_gradients(c.optimizer, self.weights, self.state, distinct_rows, inverse, grads,
                                                 lr=c.lr, eps=c.eps, beta1=c.beta1, beta2=c.beta2, lists=lists)
        rejected = int(rejected_rows.numpy().sum())  # numpy's sum: no wake-up of torch's threads
        self.counters["rejected_gradients"] += rejected
        if self.logs:
            self._changed(distinct_rows[(distinct_rows >= 0) & ~rejected_rows])
        return rejected

    def _check_grads(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        if not isinstance(grads, torch.Tensor) or not grads.is_floating_point():
            raise TypeError(f"gradients must be a floating-point tensor, got {getattr(grads, 'dtype', type(grads))}")
        if grads.device != self.device or rows.device != self.device:
            raise ValueError(f"gradients on {grads.device} and rows on {rows.device}; table {self.config.name!r} is on {self.device}")
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise TypeError(f"rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
        if grads.shape != (rows.numel(), self.config.dim):
            raise ValueError(f"gradients have shape {tuple(grads.shape)}, expected {(rows.numel(), self.config.dim)}")

    def unpin(self) -> None:
        """Release the rows of train lookups whose gradients will not come (an abandoned step)."""
        self._pins.clear()

    # ----------------------------------------------------------------- removal

    def expire(self, now_s: int) -> int:
        """Remove every unpinned row last updated before now_s - ttl_s; returns how many."""
        if self.config.ttl_s is None:
            return 0
        _check_time(now_s)
        live = self._unpinned_live_mask()
        cutoff = max(int(now_s) - self.config.ttl_s - TIME_BASE_S, -(2**31))
        stale = live & (self.last_update[: live.numel()] < cutoff)
        rows = torch.nonzero(stale).flatten()
        self._remove(rows, "expired")
        return rows.numel()

    def _make_room(self, incoming: int, in_use: torch.Tensor) -> int:
        """Evict so `incoming` new rows fit max_rows; returns how many of them now fit."""
        if self.config.max_rows is None:
            return incoming
        room = self.config.max_rows - len(self.index)
        if incoming <= room:
            return incoming
        victims = self._victims(incoming - room, in_use)
        self._remove(victims, "evicted")
        return room + victims.numel()

    def _victims(self, count: int, in_use: torch.Tensor) -> torch.Tensor:
        """The `count` least recently updated (LRU) or least counted (LFU) evictable rows."""
        live = self._unpinned_live_mask()
        live[in_use[in_use >= 0]] = False
        candidates = torch.nonzero(live).flatten()
        if candidates.numel() <= count:
            return candidates
        source = self.last_update if self.config.eviction == "lru" else self.counts
        score = source.index_select(0, candidates).long()
        threshold = torch.kthvalue(score, count).values
        below = candidates[score < threshold]
        tied = candidates[score == threshold]
        tied = tied[torch.argsort(self.keys_by_row[tied])][: count - below.numel()]
        return torch.cat([below, tied])

    def _unpinned_live_mask(self) -> torch.Tensor:
        live = self.keys_by_row[: self.index.high_water] != EMPTY_KEY
        for rows in self._pins:
            live[rows[rows >= 0]] = False
        return live

    def _remove(self, rows: torch.Tensor, reason: str) -> None:
        if rows.numel() == 0:
            return
        keys = self.keys_by_row[rows]
        self.index.erase(keys)
        for log in self.logs.values():
            log.keys_removed(keys)
        self.counters[reason] += rows.numel()

    # ----------------------------------------------------------------- dirty tracking

    def start_log(self, cursor: str) -> None:
        """(Re)start tracking changes for `cursor` ("delta" or "checkpoint") from now."""
        self.logs[cursor] = ChangeLog(self.metadata_rows, self.device)

    def changes(self, cursor: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows changed and still live, keys removed and not live again) since `cursor` started."""
        log = self.logs.get(cursor)
        if log is None:
            raise RuntimeError(f"no change log {cursor!r} on table {self.config.name!r}: start it first")
        high = self.index.high_water
        changed = log.changed[:high] & (self.keys_by_row[:high] != EMPTY_KEY)
        removed = log.removed_keys()
        return torch.nonzero(changed).flatten(), removed[self.index.find(removed) < 0]

    def delta(self, version: int) -> TableDelta:
        rows, removed = self.changes("delta")
        return TableDelta(self.keys_by_row[rows], self.weights[rows], removed, version)

    def _changed(self, rows: torch.Tensor) -> None:
        for log in self.logs.values():
            log.rows_changed(rows)

    # ----------------------------------------------------------------- checkpoint support

    def columns(self) -> dict[str, torch.Tensor]:
        """Every per-row tensor a checkpoint carries besides the key, by name."""
        state = {f"state.{name}": tensor for name, tensor in self.state.items()}
        weights = self.weights[: self.row_capacity]
        return {"weights": weights, **state, "last_update": self.last_update, "counts": self.counts}

    def live_rows(self) -> torch.Tensor:
        """Rows holding a key, ascending."""
        return self.index.live_rows()

    def drop_keys(self, keys: torch.Tensor) -> None:
        """Restore step: forget these keys (their rows become free). The index is rebuilt later."""
        self.keys_by_row[torch.isin(self.keys_by_row, keys)] = EMPTY_KEY

    def load_rows(self, keys: torch.Tensor, rows: torch.Tensor, columns: dict[str, torch.Tensor]) -> None:
        """Restore step: put `keys` and their column values at `rows` (a key moved rows if it had
        another one). The index is rebuilt later, by `rebuild_index`."""
        if rows.numel():
            self._ensure_row_capacity(int(rows.max()) + 1)
        self.drop_keys(keys)
        self.keys_by_row[rows] = keys
        for name, tensor in self.columns().items():
            tensor[rows] = columns[name].to(tensor.device)

    def rebuild_index(self, *, high_water: int, slots: int) -> None:
        """Restore step: rebuild the index from the restored keys (free rows: the rest below
        `high_water`, so later allocations match the saved table's)."""
        self._ensure_row_capacity(high_water)
        rows = torch.nonzero(self.keys_by_row != EMPTY_KEY).flatten()
        self.index = HashIndex.from_items(
            self.keys_by_row[rows], rows, high_water=high_water, capacity=slots,
            max_load=self.config.max_load, device=self.device, row_capacity=self.metadata_rows,
        )

    # ----------------------------------------------------------------- storage

    def _ensure_row_capacity(self, rows: int) -> None:
        """Grow the per-row tensors so rows [0, rows) exist; contents kept. Weights and optimizer
        state grow by `grown_rows`, the metadata (the index's keys and the columns here) to the
        length of the index's `row_keys` (`grown_metadata_rows`).

        New rows are left uninitialised (`_init_rows` writes all of a row before it is used)
        except what free rows must hold: the weights' trailing zero row. (Their keys, EMPTY, are
        the index's.)"""
        if rows > self.row_capacity:
            old, capacity = self.row_capacity, grown_rows(self.row_capacity, rows)
            self.weights = grown(self.weights[:old], capacity + 1)
            self.weights[capacity].zero_()
            self.state = {name: grown(state, capacity) for name, state in self.state.items()}
        self.index.reserve_rows(rows)
        metadata_rows = self.index.row_keys.numel()
        if metadata_rows > self.metadata_rows:
            self.last_update = grown(self.last_update, metadata_rows)
            self.counts = grown(self.counts, metadata_rows)
            for log in self.logs.values():
                log.grow(metadata_rows)

    def stats(self) -> TableStats:
        per_row = (self.last_update, self.counts)
        metadata = (self.index.row_keys_nbytes + sum(t.numel() * t.element_size() for t in per_row)
                    + sum(log.nbytes for log in self.logs.values()))
        return TableStats(
            rows=len(self.index),
            capacity=self.index.capacity,
            row_capacity=self.row_capacity,
            load=self.index.load,
            **self.counters,
            bytes_weights=self.weights.numel() * self.weights.element_size(),
            bytes_optimizer=sum(s.numel() * s.element_size() for s in self.state.values()),
            bytes_index=self.index.nbytes,
            bytes_metadata=metadata,
            bytes_sketch=0 if self.sketch is None else self.sketch.nbytes,
        )


def _check_time(now_s: int) -> None:
    if not _TIME_MIN_S <= int(now_s) <= _TIME_MAX_S:
        raise ValueError(f"event time {now_s} s is outside the stored range [{_TIME_MIN_S}, {_TIME_MAX_S}]")


def _sorted(distinct_rows: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same deduplication with distinct_rows ascending: the optimizer's gathers and scatters
    over the weights then walk memory in order, which on a CPU is worth far more than the sort."""
    order = torch.argsort(distinct_rows)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return distinct_rows.index_select(0, order), rank.index_select(0, inverse)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index]. On the CPU by numpy, in the calling thread: a batch-sized index_select
    runs on torch's thread pool, and waking it costs more than the gather (~80 us on this VM
    with passive OpenMP waits, against ~40 us for 65,536 indices)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.take(values.numpy(), index.numpy()))
    return values.index_select(0, index)
