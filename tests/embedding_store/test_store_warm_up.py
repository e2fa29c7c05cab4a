"""`warm_up_kernels` leaves nothing for a store's work to compile, and leaves no trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liverec.embedding_store import EmbeddingStore, TableConfig
from liverec.embedding_store.warm_up import warm_up_kernels
from tests.kernel_warm_up import STORE_CONFIGS

ROOT = Path(__file__).resolve().parents[2]


# What the workload compiles of each table's settings when nothing was warmed up (so that
# "nothing more after a warm-up" says something): one-thread and parallel variants, growth,
# admission, the initialisers that write, expiry, eviction and the reuse of freed rows.
COMMON = {"_find_serial", "_find_parallel", "_reinsert", "_insert", "_dedup", "_find_touch", "_candidates",
          "_new_row_metadata"}
FLOAT32 = COMMON | {"_gather", "_apply", "_occurrence_lists"}  # (float16 weights take torch's gather and step)
NEEDED = {
    "plain": FLOAT32 | {"_write_normal"},
    "expiring": FLOAT32 | {"_write_normal", "_erase_serial", "_erase_parallel", "_lowest_free_rows"},
    "admitted": FLOAT32 | {"_write_uniform", "_erase_serial", "_erase_parallel", "_lowest_free_rows"},
    "bounded": COMMON | {"_erase_serial", "_lowest_free_rows"},
}


def probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.kernel_warm_up", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [config.name for config in STORE_CONFIGS])
def test_after_a_warm_up_a_stores_work_compiles_nothing_more(name: str) -> None:
    needed = probe("store", name, "cold")["ran"]
    assert {kernel.rsplit(".", 1)[1] for kernel in needed} == NEEDED[name]
    warm = probe("store", name)
    assert warm["ran"] == warm["warmed"]


def test_warm_up_leaves_other_stores_untouched() -> None:
    config = TableConfig("item", 8, min_count=2, ttl_s=10)
    store = EmbeddingStore([config], seed=1)
    store.lookup("item", torch.tensor([5, 5, 6, 6, 7], dtype=torch.int64), train=True, now_s=1_700_000_100)
    store.unpin()
    before = store.stats(), store.version, store.table_items("item")
    warm_up_kernels([config])
    keys, weights = store.table_items("item")
    assert (store.stats(), store.version) == before[:2]
    assert torch.equal(keys, before[2][0]) and torch.equal(weights, before[2][1])
