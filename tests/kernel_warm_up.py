"""What is left to compile after a warm-up, in a fresh process (numba's compiled kernels belong to the
process, so a test process that ran other tests would have them all already).

`python -m tests.kernel_warm_up store NAME [cold]` warms up a store of the table settings named NAME
(of STORE_CONFIGS), unless `cold`, then runs a workload on a real store of those settings; `python -m tests.kernel_warm_up trainer` builds a trainer
from the LIVEREC_* environment and runs it until idle, looking when it connects to Kafka (after its
warm-up, before any record). Either prints one JSON object: the compiled kernels (name ->
signatures) after the warm-up and after the workload, and (trainer) whether the warm-up left the
trainer's state as it was.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import torch
from numba.core.registry import CPUDispatcher

from liverec.embedding_store import EmbeddingStore, TableConfig, checkpoint
from liverec.embedding_store.table import TIME_BASE_S
from liverec.embedding_store.warm_up import warm_up_kernels

STORE_CONFIGS = [
    TableConfig("plain", 16),
    TableConfig("expiring", 16, ttl_s=30),
    TableConfig("admitted", 8, min_count=3, ttl_s=50, max_rows=30_000, eviction="lfu", optimizer="sgd",
                initializer="uniform"),
    TableConfig("bounded", 8, min_count=2, ttl_s=20, max_rows=500, eviction="lru", optimizer="adam",
                initializer="zeros", dtype="float16"),
]


def compiled_kernels() -> dict[str, list[str]]:
    """Every numba kernel of liverec's loaded modules that has compiled (or loaded) a signature."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("liverec."):
            for name, obj in vars(module).items():
                if isinstance(obj, CPUDispatcher) and obj.signatures:
                    found[f"{module_name}.{name}"] = sorted(str(sig) for sig in obj.signatures)
    return found


def store_workload(config: TableConfig, root: str) -> None:
    """Batches from a few keys to beyond the parallel thresholds, zipf-like keys (repeats, misses,
    admissions), gradients through the train lookup and through a read lookup, expiry and eviction
    of a few rows and of many at once, freed rows reused, and full and incremental checkpoints."""
    rng = np.random.default_rng(0)
    store, name = EmbeddingStore([config], seed=3), config.name
    sizes = [3, 40, 700, 20_000, 70_000, 5, 30_000, 9]
    batches = [torch.from_numpy(rng.zipf(1.3, size).astype(np.int64) + 1000 * step) for step, size in enumerate(sizes)]
    batches.append(torch.arange(1, 20_001).repeat(config.min_count))  # 20,000 admitted at once
    for step, keys in enumerate(batches):
        now_s = TIME_BASE_S + 10 * step
        rows = store.lookup(name, keys, train=True, now_s=now_s)
        store.apply_gradients(name, rows, torch.randn(keys.numel(), config.dim).to(config.torch_dtype))
        rows = store.lookup(name, keys)
        store.apply_gradients(name, rows, torch.randn(keys.numel(), config.dim).to(config.torch_dtype))
        store.embed(name, keys)
        store.frequency(name, keys)
        store.table_items(name)
        store.expire(now_s)
        checkpoint.save(store, root, incremental=step > 0)
    later_s = TIME_BASE_S + 10 * len(batches) + 1000
    store.expire(later_s)  # with a TTL, every row at once
    store.lookup(name, batches[4], train=True, now_s=later_s)
    store.unpin()
    checkpoint.restore(checkpoint.save(store, root))


def main() -> None:
    if sys.argv[1] == "store":
        config = next(config for config in STORE_CONFIGS if config.name == sys.argv[2])
        if sys.argv[3:] != ["cold"]:
            warm_up_kernels([config])
        warmed = compiled_kernels()
        with tempfile.TemporaryDirectory() as root:
            store_workload(config, root)
        print(json.dumps({"warmed": warmed, "ran": compiled_kernels()}))
        return
    from liverec.platform.config import load_config
    from liverec.trainer.worker import TrainerWorker, state_digest

    worker = TrainerWorker(load_config())
    before = state_digest(worker), worker.store.version
    seen: dict = {}
    connect = worker._connect

    def connect_after_looking() -> None:  # run() warms up, then connects: no record read yet
        seen["warmed"] = compiled_kernels()
        seen["store_unchanged"] = (state_digest(worker), worker.store.version) == before
        connect()

    worker._connect = connect_after_looking  # type: ignore[method-assign]
    counters = worker.run(idle_exit_s=2)
    print(json.dumps({**seen, "ran": compiled_kernels(), "applied": counters.applied,
                      "expired": worker.store.stats()["item"].expired}))


if __name__ == "__main__":
    main()
