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


def assert_warm_up_leaves_a_store_untouched(device: torch.device | str) -> None:
    """A store already trained on `device` is left as it was by a warm-up of its own settings there
    (the warm-up works on a scratch store), and trains on after it."""
    config = TableConfig("item", 16, min_count=2, ttl_s=10, max_rows=20_000, optimizer="adam")
    store = EmbeddingStore([config], seed=1, device=device)
    keys = torch.tensor([5, 5, 6, 6, 7], dtype=torch.int64, device=device)
    store.lookup("item", keys, train=True, now_s=1_700_000_100)
    store.unpin()
    before = store.stats(), store.version, store.table_items("item")
    warm_up_kernels([config], device=device)
    after = store.table_items("item")
    assert (store.stats(), store.version) == before[:2]
    assert torch.equal(after[0], before[2][0]) and torch.equal(after[1], before[2][1])
    rows = store.lookup("item", keys, train=True, now_s=1_700_000_101)
    assert int((rows >= 0).sum()) == 5  # 7 reached min_count on its second sighting


def test_warm_up_leaves_other_stores_untouched() -> None:
    assert_warm_up_leaves_a_store_untouched("cpu")
