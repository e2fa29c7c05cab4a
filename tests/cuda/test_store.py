"""The same EmbeddingStore operations on CPU and CUDA give the same tables.

Keys, rows, metadata, counters and admission are integer state and must match exactly; weights
and optimizer state may differ by float rounding (CUDA sums duplicate gradients with atomics,
in no fixed order), so they are compared to a tight tolerance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from liverec.embedding_store import EmbeddingStore, TableConfig, checkpoint
from tests.embedding_store.test_store_warm_up import assert_warm_up_leaves_a_store_untouched

TABLES = [
    TableConfig(name="item", dim=16, initial_capacity=64, min_count=1, ttl_s=120, max_rows=1500,
                eviction="lru", optimizer="adagrad", max_load=0.5),
    TableConfig(name="user", dim=8, initial_capacity=32, min_count=3, ttl_s=None, max_rows=400,
                eviction="lfu", optimizer="adam", max_load=0.75),
    TableConfig(name="action", dim=4, initial_capacity=8, optimizer="sgd", initializer="uniform"),
]


def _keys(rng: np.random.Generator, table: str, n: int) -> np.ndarray:
    """A zipf stream of keys spread over the int64 range (negatives and extremes included)."""
    if table == "action":
        return rng.integers(0, 6, size=n, dtype=np.int64)
    z = rng.zipf(1.2, size=n) % 5000
    keys = z.astype(np.int64) * 1_000_000_007 - 2_500_000_000_000
    keys[rng.random(n) < 0.01] = np.iinfo(np.int64).max - rng.integers(0, 3)
    return keys


def _same_table(cpu_store: EmbeddingStore, gpu_store: EmbeddingStore, name: str, *, stats: bool = True) -> None:
    ck, cr = cpu_store.table(name).index.items()
    gk, gr = gpu_store.table(name).index.items()
    assert torch.equal(ck, gk.cpu()) and torch.equal(cr, gr.cpu()), f"{name}: key -> row differs"
    ct, gt = cpu_store.table(name), gpu_store.table(name)
    live = cr
    for column in ("keys_by_row", "last_update", "counts"):
        assert torch.equal(getattr(ct, column)[live], getattr(gt, column).cpu()[live]), f"{name}: {column} differs"
    torch.testing.assert_close(gt.weights.cpu()[live], ct.weights[live], rtol=1e-4, atol=1e-6)
    for column, state in ct.state.items():
        torch.testing.assert_close(gt.state[column].cpu()[live], state[live], rtol=1e-4, atol=1e-6)
    if stats:  # the slot array may differ: any size on the CPU, a power of two on CUDA
        index_free = {"capacity": 0, "load": 0.0, "bytes_index": 0}
        assert (dataclasses.replace(cpu_store.stats()[name], **index_free)
                == dataclasses.replace(gpu_store.stats()[name], **index_free))


def test_store_cpu_and_cuda_agree(device: torch.device, tmp_path: Path) -> None:
    rng = np.random.default_rng(2024)
    cpu_store = EmbeddingStore(TABLES, seed=7, device="cpu")
    gpu_store = EmbeddingStore(TABLES, seed=7, device=device)
    for store in (cpu_store, gpu_store):
        store.mark()
    for step in range(40):
        now = 10 * step
        for config in TABLES:
            keys = _keys(rng, config.name, 384)
            grads = rng.standard_normal((keys.size, config.dim)).astype(np.float32)
            rows = []
            for store in (cpu_store, gpu_store):
                k = torch.from_numpy(keys).to(store.device)
                r = store.lookup(config.name, k, train=True, now_s=now)
                emb = store.gather(config.name, r)
                assert emb.shape == (keys.size, config.dim)
                store.apply_gradients(config.name, r, torch.from_numpy(grads).to(store.device))
                rows.append(r.cpu())
            assert torch.equal(rows[0], rows[1]), f"step {step} {config.name}: rows differ"
        if step % 7 == 6:
            assert cpu_store.expire(now) == gpu_store.expire(now)
        if step == 20:
            cpu_delta, gpu_delta = cpu_store.export_delta(), gpu_store.export_delta()
            for name in cpu_delta:
                assert torch.equal(cpu_delta[name].keys, gpu_delta[name].keys.cpu())
                assert torch.equal(cpu_delta[name].removed, gpu_delta[name].removed.cpu())
                torch.testing.assert_close(gpu_delta[name].weights.cpu(), cpu_delta[name].weights,
                                           rtol=1e-4, atol=1e-6)
    for config in TABLES:
        _same_table(cpu_store, gpu_store, config.name)
        probe = torch.from_numpy(_keys(rng, config.name, 1000))
        assert torch.equal(cpu_store.frequency(config.name, probe),
                           gpu_store.frequency(config.name, probe.to(device)).cpu())
        assert torch.equal(cpu_store.lookup(config.name, probe),
                           gpu_store.lookup(config.name, probe.to(device)).cpu())

    # A checkpoint written from the GPU store restores on the CPU into the CPU store's tables.
    path = checkpoint.save(gpu_store, tmp_path / "ckpt")
    restored = checkpoint.restore(path, device="cpu")
    for config in TABLES:
        _same_table(cpu_store, restored, config.name, stats=False)


def test_new_rows_are_the_same_bits_on_cuda_and_cpu(device: torch.device) -> None:
    """Initial rows (normal through `box_muller`, uniform) of the same keys are identical, not
    merely close: every 24-bit radius and angle uniform once through the torch ops on the device
    against the CPU's compiled rows, and whole rows of odd and even widths."""
    from liverec.embedding_store import box_muller
    from liverec.embedding_store.initializer import initial_rows, write_initial_rows

    bits = torch.arange(2**24, dtype=torch.float32) * float(box_muller.UNIT)
    on_device = box_muller.normal_pairs(bits.to(device), bits.flip(0).to(device), 0.1)
    on_cpu = box_muller.normal_pairs(bits, bits.flip(0), 0.1)
    for a, b in zip(on_device, on_cpu):
        assert torch.equal(a.cpu().view(torch.int32), b.view(torch.int32))
    keys = torch.cat([torch.randint(-(2**62), 2**62, (20_000,), generator=torch.Generator().manual_seed(9)),
                      torch.tensor([-(2**63) + 2, -1, 0, 2**63 - 1])])
    for config in (TableConfig("t", 64), TableConfig("t", 7, init_scale=0.5), TableConfig("t", 5, initializer="uniform")):
        compiled = torch.zeros(keys.numel(), config.dim)
        write_initial_rows(config, 77, keys, compiled, torch.arange(keys.numel()))
        assert torch.equal(initial_rows(config, 77, keys.to(device)).cpu().view(torch.int32), compiled.view(torch.int32))


def test_warm_up_on_the_device_leaves_its_stores_untouched(device: torch.device) -> None:
    """The warm-up on the device (compiling the Triton kernels there) works on a scratch store."""
    assert_warm_up_leaves_a_store_untouched(device)


@pytest.mark.parametrize("initial_capacity", [1, 2, 3])
def test_tiny_tables_grow_on_cuda_as_on_cpu(device: torch.device, initial_capacity: int) -> None:
    """A table from one to three rows up: its first index has 2 or 4 slots, a slot mask of 1 or 3
    on CUDA (a mask of 1 once failed to compile: Triton passed it as a constant)."""
    config = TableConfig("item", 4, initial_capacity=initial_capacity, ttl_s=25, optimizer="adagrad")
    cpu_store, gpu_store = (EmbeddingStore([config], seed=3, device=d) for d in ("cpu", device))
    for step, n in enumerate([1, 1, 2, 3, 5, 40, 1]):
        keys = torch.arange(100 * step, 100 * step + n, dtype=torch.int64)
        rows = []
        for store in (cpu_store, gpu_store):
            k = keys.to(store.device)
            r = store.lookup("item", k, train=True, now_s=10 * step)
            store.apply_gradients("item", r, torch.ones(n, config.dim, device=store.device))
            rows.append(r.cpu())
            store.expire(10 * step)
        assert torch.equal(rows[0], rows[1]), f"step {step}: rows differ"
    _same_table(cpu_store, gpu_store, "item")
    assert len(gpu_store.table("item")) < 53  # of the 53 keys seen, those older than the TTL expired
