"""Checkpoints: equal restores, incrementals proportional to dirty rows, atomicity, and refusal
of corrupt or partial checkpoints with the previous one still restorable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from store_reference import assert_snapshots_equal, snapshot

from liverec.embedding_store import CheckpointError, EmbeddingStore, TableConfig, checkpoint

CONFIGS = [
    TableConfig("item", 8, min_count=2, sketch_epsilon=1e-3, ttl_s=50, optimizer="adam", initial_capacity=8),
    TableConfig("user", 4, max_rows=40, eviction="lfu", optimizer="adagrad", dtype="bfloat16"),
    TableConfig("action", 3, optimizer="sgd", initializer="uniform"),
]


def _step(store: EmbeddingStore, generator: torch.Generator, now: int, universe: int = 100) -> None:
    for config in CONFIGS:
        keys = torch.randint(0, universe, (24,), generator=generator)
        rows = store.lookup(config.name, keys, train=True, now_s=now)
        grads = torch.randn(24, config.dim, generator=generator).to(config.torch_dtype)
        store.apply_gradients(config.name, rows, grads)


def _trained(steps: int = 20, seed: int = 0) -> tuple[EmbeddingStore, torch.Generator]:
    store, generator = EmbeddingStore(CONFIGS, seed=3), torch.Generator().manual_seed(seed)
    for now in range(steps):
        _step(store, generator, now)
    return store, generator


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_full_checkpoint_restores_an_equal_store_that_continues_identically(tmp_path: Path) -> None:
    store, generator = _trained()
    path = checkpoint.save(store, tmp_path)
    restored = checkpoint.restore(path)
    assert_snapshots_equal(snapshot(restored), snapshot(store))
    state = generator.get_state()
    for now in range(20, 30):
        _step(store, generator, now)
    generator.set_state(state)
    for now in range(20, 30):
        _step(restored, generator, now)
    assert_snapshots_equal(snapshot(restored), snapshot(store))


def test_incremental_chain_restores_an_equal_store(tmp_path: Path) -> None:
    store, generator = _trained()
    checkpoint.save(store, tmp_path)
    for round_ in range(3):
        for now in range(20 + 10 * round_, 30 + 10 * round_):
            _step(store, generator, now, universe=150)
        store.expire(30 + 10 * round_)
        path = checkpoint.save(store, tmp_path, incremental=True)
    assert path.name == "00000004-incremental"
    assert_snapshots_equal(snapshot(checkpoint.restore(path)), snapshot(store))


def test_incremental_writes_only_the_dirty_rows(tmp_path: Path) -> None:
    store = EmbeddingStore([TableConfig("t", 16, optimizer="sgd")], seed=0)
    keys = torch.arange(2000, dtype=torch.int64)
    store.lookup("t", keys, train=True, now_s=0)
    store.unpin()
    full = checkpoint.save(store, tmp_path)
    touched = keys[::100]
    rows = store.lookup("t", touched, train=True, now_s=1)
    store.apply_gradients("t", rows, torch.ones(touched.numel(), 16))
    incremental = checkpoint.save(store, tmp_path, incremental=True)
    manifest = json.loads((incremental / checkpoint.MANIFEST).read_text())["body"]
    assert manifest["tensors"]["t0.rows"]["shape"] == [touched.numel()]
    assert manifest["tensors"]["t0.weights"]["shape"] == [touched.numel(), 16]
    full_bytes = (full / checkpoint.DATA).stat().st_size
    assert (incremental / checkpoint.DATA).stat().st_size <= 0.02 * full_bytes
    unchanged = checkpoint.save(store, tmp_path, incremental=True)
    assert json.loads((unchanged / checkpoint.MANIFEST).read_text())["body"]["tensors"]["t0.rows"]["shape"] == [0]


def test_corrupt_data_is_refused_and_the_previous_checkpoint_stays_restorable(tmp_path: Path) -> None:
    store, generator = _trained()
    first = checkpoint.save(store, tmp_path)
    expected = snapshot(store)
    _step(store, generator, 20)
    second = checkpoint.save(store, tmp_path, incremental=True)
    _flip_byte(second / checkpoint.DATA, 100)
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.restore(second)
    assert checkpoint.latest(tmp_path) == first
    assert_snapshots_equal(snapshot(checkpoint.restore(first)), expected)


def test_a_corrupt_full_checkpoint_poisons_its_incrementals(tmp_path: Path) -> None:
    store, generator = _trained()
    first = checkpoint.save(store, tmp_path)
    _step(store, generator, 20)
    second = checkpoint.save(store, tmp_path, incremental=True)
    _flip_byte(first / checkpoint.DATA, 7)
    with pytest.raises(CheckpointError, match="00000001-full"):
        checkpoint.restore(second)
    assert checkpoint.latest(tmp_path) is None


def test_truncated_data_and_tampered_or_missing_manifests_are_refused(tmp_path: Path) -> None:
    store, _ = _trained(steps=3)
    truncated = checkpoint.save(store, tmp_path / "a")
    data = truncated / checkpoint.DATA
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="bytes"):
        checkpoint.restore(truncated)
    tampered = checkpoint.save(store, tmp_path / "b")
    manifest = tampered / checkpoint.MANIFEST
    document = json.loads(manifest.read_text())
    document["body"]["store"]["version"] += 1
    manifest.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="manifest does not match"):
        checkpoint.restore(tampered)
    partial = checkpoint.save(store, tmp_path / "c")
    (partial / checkpoint.MANIFEST).write_text('{"body": {"format": 1, "ki')
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        checkpoint.restore(partial)
    (partial / checkpoint.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        checkpoint.restore(partial)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.restore(tmp_path)


def test_a_failed_save_leaves_nothing_behind_and_loses_no_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, generator = _trained()
    first = checkpoint.save(store, tmp_path)
    _step(store, generator, 20)

    def crash(path: Path, body: dict[str, object]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(store, tmp_path, incremental=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    second = checkpoint.save(store, tmp_path, incremental=True)
    assert second.name == "00000002-incremental"
    assert_snapshots_equal(snapshot(checkpoint.restore(second)), snapshot(store))


def test_leftover_temporary_directories_are_ignored(tmp_path: Path) -> None:
    store, _ = _trained(steps=2)
    first = checkpoint.save(store, tmp_path)
    (tmp_path / ".tmp-00000002-full-deadbeef").mkdir()
    assert checkpoint.latest(tmp_path) == first
    assert checkpoint.latest(tmp_path / "missing") is None


def test_incremental_needs_a_previous_checkpoint_in_the_same_root(tmp_path: Path) -> None:
    store, _ = _trained(steps=2)
    with pytest.raises(ValueError, match="save a full one first"):
        checkpoint.save(store, tmp_path, incremental=True)
    checkpoint.save(store, tmp_path / "a")
    with pytest.raises(ValueError, match="same root|chain within one root"):
        checkpoint.save(store, tmp_path / "b", incremental=True)


def test_restored_store_chains_its_next_incremental_onto_the_restored_checkpoint(tmp_path: Path) -> None:
    store, generator = _trained()
    first = checkpoint.save(store, tmp_path)
    _step(store, generator, 20)
    checkpoint.save(store, tmp_path, incremental=True)
    restored = checkpoint.restore(first)
    _step(restored, generator, 21)
    third = checkpoint.save(restored, tmp_path, incremental=True)
    body = json.loads((third / checkpoint.MANIFEST).read_text())["body"]
    assert body["parent"] == first.name
    assert_snapshots_equal(snapshot(checkpoint.restore(third)), snapshot(restored))
