"""`liverec bench store`: the embedding store against torchrec's MCH module and a Python dict.

One zipf-distributed stream of 64-bit keys (batch 65,536, dim 64) drives three systems:

- liverec: EmbeddingStore (numba kernels on CPU), Adagrad, min_count 2, TTL with periodic expiry;
- torchrec: MCHManagedCollisionModule with its LFU eviction policy, profile + remap every step
  (eviction_interval 1), and zch_size large enough for every distinct key of the stream;
- dict: a Python dict key -> row with an exact admission counter, the same expiry.

All three share the embedding side: the same dense weight rows and the same sparse Adagrad step
(duplicate gradients summed per row, then one compiled update per distinct row:
`liverec.embedding_store.kernels.cpu_step.apply_gradients`, the kernel the store itself uses),
so the comparison is of what differs — finding, admitting and retiring keys — and no system's
figure gains from a faster optimizer than the others get. (The baselines deduplicate their rows
with torch.unique first; the store reuses its lookup's deduplication, which is part of its
design.) Measured:

- eval: lookup of existing keys only, as key -> row ("index") and key -> embedding ("embed");
- train, full: admit + insert + lookup + gather + sparse update (a fixed gradient stands in for
  the backward pass) + expiry every 10 batches, over the whole stream from an empty table; the
  faster of two passes, each by a fresh system (all three alike): the first writes to memory
  of a pass cost 0 to 900 page faults per batch from one process to the next here (which pages
  a dropped store's memory hands on, and whether the kernel has huge pages free), and one slow
  pass in a noisy neighbourhood says little about the system;
- train, index side: the same without gather and update (MCH: profile + remap + evict), which is
  where the systems differ and what MCH's own train figure measures;
- the embedding side alone: gather + torch.unique + the shared Adagrad step on each batch's rows,
  what the baselines' full train step contains besides their index side (the store
  deduplicates in its lookup, by hash, and hands the step its occurrence lists instead). MCH's
  full train time over this bounds the ratio against MCH of any system with that embedding
  side, even with an index side that cost nothing;
- liverec's own split: the time of its gather and gradient step, measured inside its fastest
  full pass, against the rest of that pass (its index side), and so what MCH's time over 20
  leaves the index side once that embedding side is paid; and one more pass with each stage of
  the store's train path timed (deduplication and probes, sketch, inserts and rehash, initial
  rows, gather, gradient step, expiry...), where the time goes;
- CPU time and page faults per batch of each full train pass (all threads of the process): on
  a shared 2-core box the wall-clock ratio moves with how many cores the other processes leave
  free, and the ratio of CPU times says what the work itself costs. A first write to a page
  costs 1-18 µs on this VM; the baselines' rows are allocated and written when they are built,
  before their timed passes, and the store, which grows as it admits, keeps the reservations of
  a dropped store for the next (storage.py), so its timed pass writes into the pages of the
  untimed passes before it, as theirs write into pages they touched untimed;
- bytes per row beyond weights and optimizer state (liverec), split into per-row metadata (key,
  last update, count), the hash index (slots; no free list is held) and the admission sketch
  (counters packed to 2 bits at min_count 2), per live row and per allocated row (the rows the
  weights are allocated for); with the rows admitted and filtered, since a leakier sketch would
  lower the per-row figure by admitting more rows;
- checkpoint: incremental (1% of rows dirty) against full, on a 10M-row table (1M with --quick).

The machine's load average is recorded: on a shared 2-core box, other processes move the
numbers. OpenMP's default wait policy makes idle worker threads spin; when other processes hold
the cores, every parallel torch op then waits on a descheduled spinner, and a 30 ms training step
took over a second here (load 8). So unless OMP_WAIT_POLICY is already set, the benchmark re-runs
itself in a child process with OMP_WAIT_POLICY=PASSIVE (all three systems alike; recorded in the
results). On a dedicated machine, set OMP_WAIT_POLICY=ACTIVE to measure the spinning default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import cpu_model
from liverec.embedding_store import EmbeddingStore, TableConfig, checkpoint
from liverec.embedding_store import table as table_module
from liverec.embedding_store.hash_index import HashIndex
from liverec.embedding_store.hashing import splitmix64
from liverec.embedding_store.kernels import cpu_step

BATCH = 65_536
DIM = 64
MIN_COUNT = 2
TTL_S = 30
EXPIRE_EVERY = 10
TRAIN_REPEATS = 2
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"eval_vs_mch": 5.0, "train_vs_mch": 20.0, "overhead_bytes_per_row": 24.0, "incremental_vs_full": 0.05}


@dataclass(frozen=True)
class Plan:
    batches: int
    universe: int
    exponent: float
    checkpoint_rows: int
    eval_repeats: int


FULL = Plan(batches=64, universe=3_000_000, exponent=0.9, checkpoint_rows=10_000_000, eval_repeats=5)
QUICK = Plan(batches=20, universe=3_000_000, exponent=0.9, checkpoint_rows=1_000_000, eval_repeats=3)


# --------------------------------------------------------------------------- the stream


def make_stream(plan: Plan, seed: int = 0) -> list[torch.Tensor]:
    """Batches of zipf(exponent) ranks over `universe`, scattered to 64-bit keys by splitmix64."""
    ranks = np.arange(1, plan.universe + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-plan.exponent)
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    samples = np.searchsorted(cdf, rng.random(plan.batches * BATCH)).astype(np.int64)
    keys = splitmix64(torch.from_numpy(samples) ^ 0x5EED)
    return list(keys.split(BATCH))


# --------------------------------------------------------------------------- shared embedding side


class DenseRows:
    """Weights and Adagrad state by row, updated exactly as the store updates its rows."""

    def __init__(self, rows: int) -> None:
        self.config = TableConfig("dense", DIM, optimizer="adagrad", initial_capacity=rows)
        self.weights = torch.randn(rows, DIM) * 0.01
        self.state = {"accumulator": torch.zeros(rows, DIM)}

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weights.index_select(0, rows.clamp(min=0))

    def update(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Sum duplicate rows' gradients and step each distinct row once (rows of -1 skipped)."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        c = self.config
        cpu_step.apply_gradients("adagrad", self.weights, self.state, unique, inverse, grads, lr=c.lr, eps=c.eps,
                                 beta1=c.beta1, beta2=c.beta2)

    def reset(self, rows: torch.Tensor) -> None:
        self.weights[rows] = 0.0
        self.state["accumulator"][rows] = 0.0


# --------------------------------------------------------------------------- systems


class LiverecSystem:
    name = "liverec"

    def __init__(self) -> None:
        config = TableConfig("item", DIM, min_count=MIN_COUNT, ttl_s=TTL_S, optimizer="adagrad")
        self.store = EmbeddingStore([config], seed=0)
        self.embedding_side_s = 0.0  # gather + gradient step, within the train steps

    def train_step(self, keys: torch.Tensor, grads: torch.Tensor | None, now: int) -> None:
        rows = self.store.lookup("item", keys, train=True, now_s=now)
        if grads is None:
            self.store.unpin()
        else:
            start = time.perf_counter()
            self.store.gather("item", rows)
            self.store.apply_gradients("item", rows, grads)
            self.embedding_side_s += time.perf_counter() - start
        if now % EXPIRE_EVERY == 0:
            self.store.expire(now)

    def index(self, keys: torch.Tensor) -> torch.Tensor:
        return self.store.lookup("item", keys)

    def embed(self, keys: torch.Tensor) -> torch.Tensor:
        return self.store.embed("item", keys)


class MchSystem:
    name = "torchrec_mch"

    def __init__(self, zch_size: int) -> None:
        from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule

        self.module = MCHManagedCollisionModule(
            zch_size=zch_size, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(),
            eviction_interval=1, input_hash_size=2**63 - 1,
        )
        self.rows = DenseRows(zch_size)

    def _remap(self, keys: torch.Tensor) -> torch.Tensor:
        from torchrec.sparse.jagged_tensor import JaggedTensor

        features = {"item": JaggedTensor(values=keys, lengths=torch.ones(keys.numel(), dtype=torch.int64))}
        return self.module(features)["item"].values()

    def train_step(self, keys: torch.Tensor, grads: torch.Tensor | None, now: int) -> None:
        self.module.train()
        rows = self._remap(keys)
        evicted = self.module.evict()
        if evicted is not None and evicted.numel():
            self.rows.reset(evicted)
        if grads is not None:
            self.rows.gather(rows)
            self.rows.update(rows, grads)

    def index(self, keys: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self._remap(keys)

    def embed(self, keys: torch.Tensor) -> torch.Tensor:
        return self.rows.gather(self.index(keys))


class DictSystem:
    name = "python_dict"

    def __init__(self, capacity: int) -> None:
        self.rows: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self.keys_by_row: list[int] = []
        self.free: list[int] = []
        self.last_update = torch.zeros(capacity, dtype=torch.int64)
        self.dense = DenseRows(capacity)

    def _admit(self, keys: list[int], found: list[int], now: int) -> None:
        missed = [k for k, row in zip(keys, found) if row < 0]
        for key in missed:
            self.seen[key] = self.seen.get(key, 0) + 1
        for key in sorted({k for k in missed if self.seen[k] >= MIN_COUNT}):
            row = self.free.pop() if self.free else len(self.keys_by_row)
            if row == len(self.keys_by_row):
                self.keys_by_row.append(key)
            else:
                self.keys_by_row[row] = key
            self.rows[key] = row
            self.last_update[row] = now

    def train_step(self, keys: torch.Tensor, grads: torch.Tensor | None, now: int) -> None:
        key_list = keys.tolist()
        get = self.rows.get
        found = [get(k, -1) for k in key_list]
        if min(found) < 0:
            self._admit(key_list, found, now)
            found = [get(k, -1) for k in key_list]
        rows = torch.tensor(found, dtype=torch.int64)
        self.last_update[rows[rows >= 0]] = now
        if grads is not None:
            self.dense.gather(rows)
            self.dense.update(rows, grads)
        if now % EXPIRE_EVERY == 0:
            self._expire(now)

    def _expire(self, now: int) -> None:
        live = torch.tensor([row for row in self.rows.values()], dtype=torch.int64)
        stale = live[self.last_update[live] < now - TTL_S].tolist()
        for row in stale:
            del self.rows[self.keys_by_row[row]]
        self.free.extend(stale)

    def index(self, keys: torch.Tensor) -> torch.Tensor:
        get = self.rows.get
        return torch.tensor([get(k, -1) for k in keys.tolist()], dtype=torch.int64)

    def embed(self, keys: torch.Tensor) -> torch.Tensor:
        return self.dense.gather(self.index(keys))


# --------------------------------------------------------------------------- measurements

# The store's CPU train-path stages, as (label, owner, attribute): each is timed by wrapping that
# function for one extra pass. Nested: rehash runs inside inserts, and every index-side stage
# inside lookup, whose remainder is the lookup's own glue (checks, counters, change log).
STAGES = (
    ("dedup_and_probes", cpu_step, "dedup_find"),
    ("sketch_and_candidates", cpu_step, "admission_candidates"),
    ("inserts_with_rehash", HashIndex, "insert_missed"),
    ("rehash", HashIndex, "rehash"),
    ("row_capacity_growth", table_module.Table, "_ensure_row_capacity"),
    ("initial_rows", table_module, "write_initial_rows"),
    ("new_rows_metadata", cpu_step, "new_row_metadata"),
    ("lookup", table_module.Table, "lookup"),
    ("gather", table_module.Table, "gather"),
    ("gradient_step", table_module.Table, "apply_gradients"),
    ("expiry", table_module.Table, "expire"),
)


@contextmanager
def stage_timers() -> Iterator[dict[str, float]]:
    """While open, the functions of STAGES add their wall seconds to the yielded dict."""
    seconds = dict.fromkeys((label for label, _, _ in STAGES), 0.0)
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in STAGES]

    def timed(label: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
        return wrapper

    for (label, _, _), (owner, name, function) in zip(STAGES, originals):
        setattr(owner, name, timed(label, function))
    try:
        yield seconds
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def stage_profile(stream: list[torch.Tensor], grads: torch.Tensor) -> dict[str, float]:
    """ms per batch of each stage of one full liverec train pass (a fresh store, after the timed
    ones), with the pass's wall time and the lookup's remainder outside the named stages."""
    gc.collect()
    system = LiverecSystem()
    with stage_timers() as seconds:
        start = time.perf_counter()
        for now, keys in enumerate(stream, start=1):
            system.train_step(keys, grads, now)
        wall = time.perf_counter() - start
    ms = {label: s / len(stream) * 1e3 for label, s in seconds.items()}
    inside = ("dedup_and_probes", "sketch_and_candidates", "inserts_with_rehash", "row_capacity_growth",
              "initial_rows", "new_rows_metadata")
    ms["lookup_other"] = ms["lookup"] - sum(ms[k] for k in inside)
    ms["pass_wall"] = wall / len(stream) * 1e3
    return ms


def time_train(system: Any, stream: list[torch.Tensor], grads: torch.Tensor | None) -> tuple[float, float, float]:
    """(M keys/s, CPU ms per batch, page faults per batch) of the train path over the whole
    stream, from an empty table; grads None times the index side only (admit, insert, lookup,
    touch, expiry: no gather, no update). CPU time and faults are the process's, all threads."""
    faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu_start, start = time.process_time(), time.perf_counter()
    for now, keys in enumerate(stream, start=1):
        system.train_step(keys, grads, now)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start
    return sum(k.numel() for k in stream) / wall / 1e6, cpu / len(stream) * 1e3, faults / len(stream)


def best_train_pass(factory: Any, stream: list[torch.Tensor], grads: torch.Tensor, log: Any
                    ) -> tuple[Any, tuple[float, float, float]]:
    """The fastest of TRAIN_REPEATS full train passes, each by a fresh system from an empty table
    (after a garbage collection, so a dropped system's memory is free before the next is
    built); returns that system (trained, for the eval lookups) and its `time_train` figures."""
    best: tuple[Any, tuple[float, float, float]] | None = None
    for _ in range(TRAIN_REPEATS):
        gc.collect()
        system = factory()
        print(f"train: {system.name} ...", file=log)
        figures = time_train(system, stream, grads)
        if best is None or figures[0] > best[1][0]:
            best = (system, figures)
        del system
    assert best is not None
    return best


def train_split(system: LiverecSystem, train_mkeys_s: float, mch_train_mkeys_s: float, batches: int
                ) -> dict[str, float]:
    """ms per batch of liverec's fastest full train pass, split into its embedding side (gather +
    its Adagrad step, timed inside the pass) and the rest (its index side: lookup, admission,
    inserts, expiry), with MCH's full train step and what the train target leaves the index side
    once this embedding side is paid."""
    total, mch = BATCH / train_mkeys_s / 1e3, BATCH / mch_train_mkeys_s / 1e3
    embedding = system.embedding_side_s / batches * 1e3
    return {"total": total, "embedding_side": embedding, "index_side": total - embedding, "mch_train_full": mch,
            "index_side_budget_for_target": mch / TARGETS["train_vs_mch"] - embedding}


def time_embedding_side(stream: list[torch.Tensor], grads: torch.Tensor, rows: int) -> float:
    """M keys/s of the embedding side alone (gather, deduplication, compiled Adagrad step), on
    each batch's keys mapped to rows 0..distinct-1 (the mapping is made before timing)."""
    dense = DenseRows(rows)
    batches = [torch.unique(keys, return_inverse=True)[1] for keys in stream]
    start = time.perf_counter()
    for batch_rows in batches:
        dense.gather(batch_rows)
        dense.update(batch_rows, grads)
    return sum(k.numel() for k in stream) / (time.perf_counter() - start) / 1e6


def time_eval(system: Any, batches: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """M keys/s of key -> row and key -> embedding lookups (best of `repeats` passes)."""
    keys = sum(b.numel() for b in batches)
    result = {}
    for kind in ("index", "embed"):
        lookup = getattr(system, kind)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                lookup(batch)
            best = min(best, time.perf_counter() - start)
        result[kind] = keys / best / 1e6
    return result


def existing_key_batches(systems: list[Any], stream: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`count` full batches of stream keys that hold a row in every system, in stream order."""
    pool = torch.cat(stream[-count:])
    for system in systems:
        pool = pool[system.index(pool) >= 0]
    return list(pool.split(BATCH))[: max(pool.numel() // BATCH, 1)]


def checkpoint_cost(rows: int, directory: Path) -> dict[str, Any]:
    """Seconds and bytes of a full checkpoint, then of an incremental one with 1% of rows dirty."""
    config = TableConfig("item", DIM, optimizer="sgd", initial_capacity=rows)
    store = EmbeddingStore([config], seed=0)
    keys = splitmix64(torch.arange(rows, dtype=torch.int64))
    for chunk in keys.split(1 << 20):
        store.lookup("item", chunk, train=True, now_s=0)
        store.unpin()
    start = time.perf_counter()
    full = checkpoint.save(store, directory)
    full_s = time.perf_counter() - start
    dirty = keys[torch.randperm(rows, generator=torch.Generator().manual_seed(0))[: rows // 100]]
    found = store.lookup("item", dirty, train=True, now_s=1)
    store.apply_gradients("item", found, torch.full((dirty.numel(), DIM), 0.1))
    start = time.perf_counter()
    incremental = checkpoint.save(store, directory, incremental=True)
    incremental_s = time.perf_counter() - start
    full_bytes = sum(p.stat().st_size for p in full.iterdir())
    incremental_bytes = sum(p.stat().st_size for p in incremental.iterdir())
    return {
        "rows": rows, "dim": DIM, "optimizer": "sgd", "dirty_fraction": 0.01,
        "full_s": full_s, "incremental_s": incremental_s, "time_ratio": incremental_s / full_s,
        "full_bytes": full_bytes, "incremental_bytes": incremental_bytes,
        "bytes_ratio": incremental_bytes / full_bytes,
    }


# --------------------------------------------------------------------------- report


def run(plan: Plan, quick: bool, log: Any) -> dict[str, Any]:
    load_start = os.getloadavg()
    print(f"stream: {plan.batches} batches of {BATCH} zipf({plan.exponent}) keys over {plan.universe} ranks", file=log)
    stream = make_stream(plan)
    all_keys = torch.cat(stream)
    distinct = int(torch.unique(all_keys).numel())
    grads = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1)) * 0.01
    time_train(LiverecSystem(), stream, grads)  # untimed: load compiled kernels, warm the allocator
    factories = [LiverecSystem, lambda: MchSystem(distinct + 1), lambda: DictSystem(distinct + 1)]
    throughput: dict[str, dict[str, float]] = {}
    for factory in factories:
        index_only = factory()
        print(f"train (index side): {index_only.name} ...", file=log)
        throughput[index_only.name] = {"train_index": time_train(index_only, stream, None)[0]}
    systems = []
    train_cpu_ms: dict[str, float] = {}
    train_faults: dict[str, float] = {}
    for factory in factories:
        system, (throughput_best, cpu_ms, faults) = best_train_pass(factory, stream, grads, log)
        systems.append(system)
        throughput[system.name]["train"], train_cpu_ms[system.name], train_faults[system.name] = (
            throughput_best, cpu_ms, faults)
    print("embedding side alone ...", file=log)
    embedding_side = time_embedding_side(stream, grads, distinct + 1)
    split = train_split(systems[0], throughput["liverec"]["train"], throughput["torchrec_mch"]["train"], plan.batches)
    print("stage profile: liverec ...", file=log)
    stages = stage_profile(stream, grads)
    eval_batches = existing_key_batches(systems, stream, count=min(12, plan.batches))
    for system in systems:
        print(f"eval: {system.name} ...", file=log)
        throughput[system.name].update(time_eval(system, eval_batches, plan.eval_repeats))
    stats = systems[0].store.stats()["item"]
    with tempfile.TemporaryDirectory(prefix="liverec-bench-store-") as directory:
        print(f"checkpoint: {plan.checkpoint_rows} rows ...", file=log)
        ckpt = checkpoint_cost(plan.checkpoint_rows, Path(directory))
    ours, mch, baseline = throughput["liverec"], throughput["torchrec_mch"], throughput["python_dict"]
    table = systems[0].store.table("item")
    bytes_per_row = {
        denominator: {
            "rows": count,
            "key": table.index.row_keys_nbytes / count,
            "last_update": table.last_update.numel() * table.last_update.element_size() / count,
            "count": table.counts.numel() * table.counts.element_size() / count,
            "metadata": stats.bytes_metadata / count,
            "index": stats.bytes_index / count,
            "sketch_amortised": stats.bytes_sketch / count,
            "overhead_total": stats.bytes_overhead / count,
            "weights_and_optimizer": (stats.bytes_weights + stats.bytes_optimizer) / count,
        }
        for denominator, count in (("per_live_row", max(stats.rows, 1)), ("per_allocated_row", stats.row_capacity))
    }
    return {
        "benchmark": "store",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "processor": platform.machine(), "cpu_model": cpu_model(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(),
        "quick": quick, "train_repeats": TRAIN_REPEATS,
        "stream": {"batches": plan.batches, "batch": BATCH, "keys": all_keys.numel(), "distinct_keys": distinct,
                   "zipf_exponent": plan.exponent, "universe": plan.universe, "dim": DIM},
        "throughput_mkeys_s": throughput,
        "embedding_side_alone_mkeys_s": embedding_side,
        "train_cpu_ms_per_batch": train_cpu_ms,
        "train_page_faults_per_batch": train_faults,
        "liverec_train_split_ms_per_batch": split,
        "liverec_train_stages_ms_per_batch": stages,
        "ratios": {
            "eval_index_vs_mch": ours["index"] / mch["index"], "eval_embed_vs_mch": ours["embed"] / mch["embed"],
            "train_vs_mch": ours["train"] / mch["train"], "train_index_vs_mch": ours["train_index"] / mch["train_index"],
            "train_vs_mch_ceiling": embedding_side / mch["train"],
            "train_vs_mch_ceiling_own_embedding_side": split["mch_train_full"] / split["embedding_side"],
            "train_cpu_vs_mch": train_cpu_ms["torchrec_mch"] / train_cpu_ms["liverec"],
            "eval_index_vs_dict": ours["index"] / baseline["index"], "train_vs_dict": ours["train"] / baseline["train"],
        },
        "bytes_per_row": {
            "index_load": stats.load, "index_slots": stats.capacity, "row_capacity": stats.row_capacity,
            "metadata_rows": table.metadata_rows, "high_water": table.index.high_water,
            "sketch_bytes": stats.bytes_sketch, "sketch_counter_bits": table.sketch.bits,
            "admitted": stats.admitted, "filtered": stats.filtered, "expired": stats.expired,
            "bytes_total": stats.bytes_used, **bytes_per_row,
        },
        "checkpoint": {**ckpt, "note": "1M-row table (--quick); the full run uses 10M rows" if quick else "10M-row table"},
        "targets": TARGETS,
    }


def table(result: dict[str, Any]) -> str:
    t, r, b, c = result["throughput_mkeys_s"], result["ratios"], result["bytes_per_row"], result["checkpoint"]
    sp, st = result["liverec_train_split_ms_per_batch"], result["liverec_train_stages_ms_per_batch"]
    s = result["stream"]
    lines = [
        f"store benchmark  {result['date']}  {result['machine']['node']} ({result['machine']['cpus']} CPUs, {result['machine']['cpu_model']}, "
        f"load {result['machine']['loadavg_start'][0]:.1f}->{result['machine']['loadavg_end'][0]:.1f})  "
        f"torch {result['versions']['torch']}, OMP_WAIT_POLICY={result['omp_wait_policy']}"
        f"{'  [quick]' if result['quick'] else ''}",
        f"stream: {s['keys']:,} keys, {s['distinct_keys']:,} distinct, zipf {s['zipf_exponent']}, batch {s['batch']:,}, dim {s['dim']}",
        "",
        f"{'M keys/s':<14}{'eval index':>12}{'eval embed':>12}{'train index':>13}{'train full':>12}",
    ]
    for name, values in t.items():
        lines.append(f"{name:<14}{values['index']:>12.1f}{values['embed']:>12.1f}{values['train_index']:>13.2f}"
                     f"{values['train']:>12.2f}")
    lines += [
        f"{'liverec / MCH':<14}{r['eval_index_vs_mch']:>11.1f}x{r['eval_embed_vs_mch']:>11.1f}x"
        f"{r['train_index_vs_mch']:>12.1f}x{r['train_vs_mch']:>11.1f}x"
        f"   (targets: eval >= {TARGETS['eval_vs_mch']:.0f}x, train >= {TARGETS['train_vs_mch']:.0f}x)",
        f"{'liverec / dict':<14}{r['eval_index_vs_dict']:>11.1f}x{'':>12}{'':>13}{r['train_vs_dict']:>11.1f}x",
        "train index = admit + insert + lookup + touch + expiry (MCH: profile + remap + evict);",
        "train full = that + embedding gather + sparse Adagrad step (the same compiled update for all three)",
        "train full, CPU ms per batch (all threads): " + ", ".join(
            f"{name} {ms:.1f}" for name, ms in result["train_cpu_ms_per_batch"].items())
        + f"  -> liverec / MCH {r['train_cpu_vs_mch']:.1f}x in CPU time; page faults per batch: " + ", ".join(
            f"{name} {count:.0f}" for name, count in result["train_page_faults_per_batch"].items()),
        f"embedding side alone (gather + torch.unique + Adagrad, in the baselines' train full): "
        f"{result['embedding_side_alone_mkeys_s']:.2f} M keys/s -> at most {r['train_vs_mch_ceiling']:.1f}x MCH's "
        f"train full for a system with that embedding side, whatever its index side",
        f"liverec train full per batch: {sp['total']:.2f} ms = index side {sp['index_side']:.2f} + embedding side "
        f"{sp['embedding_side']:.2f} (gather + its Adagrad step, reusing the lookup's deduplication) -> at most "
        f"{r['train_vs_mch_ceiling_own_embedding_side']:.1f}x MCH's {sp['mch_train_full']:.1f} ms with this embedding "
        f"side; {TARGETS['train_vs_mch']:.0f}x leaves its index side {sp['index_side_budget_for_target']:.2f} ms",
        f"liverec stages, ms per batch (one more pass, {st['pass_wall']:.2f} ms, each stage timed): dedup + probes "
        f"{st['dedup_and_probes']:.2f}, sketch + candidates {st['sketch_and_candidates']:.2f}, inserts "
        f"{st['inserts_with_rehash']:.2f} (rehash {st['rehash']:.2f}), row growth {st['row_capacity_growth']:.2f}, "
        f"initial rows {st['initial_rows']:.2f}, new rows' metadata {st['new_rows_metadata']:.2f}, rest of lookup "
        f"{st['lookup_other']:.2f}; gather {st['gather']:.2f}, gradient step {st['gradient_step']:.2f}, expiry "
        f"{st['expiry']:.2f}",
        "",
        *(
            f"bytes/row beyond weights+optimizer, {label} ({b[key]['rows']:,}): key {b[key]['key']:.1f} + last update "
            f"{b[key]['last_update']:.1f} + count {b[key]['count']:.1f} + index {b[key]['index']:.1f} + sketch "
            f"{b[key]['sketch_amortised']:.1f} = {b[key]['overhead_total']:.1f}  (target <= {TARGETS['overhead_bytes_per_row']:.0f})"
            for key, label in (("per_live_row", "per live row"), ("per_allocated_row", "per allocated row"))
        ),
        f"  (index: {b['index_slots']:,} int32 slots at load {b['index_load']:.2f}, no free list; metadata for "
        f"{b['metadata_rows']:,} rows (high water {b['high_water']:,}); sketch {b['sketch_bytes'] / 1e6:.2f} MB fixed, "
        f"{b['sketch_counter_bits']}-bit counters; weights for {b['row_capacity']:,} rows; admitted {b['admitted']:,}, "
        f"filtered {b['filtered']:,} lookups, expired {b['expired']:,})",
        f"checkpoint ({c['note']}, 1% dirty): full {c['full_s']:.2f} s / {c['full_bytes'] / 1e6:,.0f} MB, "
        f"incremental {c['incremental_s']:.3f} s / {c['incremental_bytes'] / 1e6:,.1f} MB  -> "
        f"{100 * c['time_ratio']:.1f}% of full time, {100 * c['bytes_ratio']:.1f}% of bytes "
        f"(target <= {100 * TARGETS['incremental_vs_full']:.0f}%)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverec bench store", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (fewer batches, 1M-row checkpoint table)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the results (default benchmarks/results/store.json, store-quick.json with --quick)")
    args = parser.parse_args(argv)
    if "OMP_WAIT_POLICY" not in os.environ:
        child = [sys.executable, "-m", "benchmarks.store", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(child, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    log = sys.stderr if args.json else sys.stdout
    result = run(QUICK if args.quick else FULL, args.quick, log)
    output = args.output or RESULTS / ("store-quick.json" if args.quick else "store.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result), file=log)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
