"""Trainer checkpoints on disk: a write that fails partway leaves nothing behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from liverec.embedding_store import EmbeddingStore, TableConfig
from liverec.trainer.checkpoint import CheckpointManager
from liverec.trainer.history import HistoryStore


def test_a_write_that_fails_partway_leaves_no_temporary_directory_and_the_previous_checkpoint(tmp_path: Path) -> None:
    store = EmbeddingStore([TableConfig("item", 8)], seed=0)
    store.lookup("item", torch.arange(1, 50), train=True, now_s=1_700_000_000)
    store.unpin()
    history = HistoryStore(tmp_path / "history", 10)
    manager = CheckpointManager(tmp_path / "state", kept=3)
    try:
        first = manager.save({"step": 1}, store, history.checkpoint)

        def disk_full(dest: Path) -> None:
            """Stands in for a disk that fills while the history is copied (no ENOSPC on demand here)."""
            history.checkpoint(dest)
            (dest / "partial").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")

        with pytest.raises(OSError, match="No space left on device"):
            manager.save({"step": 2}, store, disk_full)
        assert not [p.name for p in manager.root.iterdir() if p.name.startswith(".tmp-")]
        assert manager.names() == [first.name]
        restored = manager.restore_latest()
        assert restored is not None and restored.path == first and restored.state["step"] == 1

        manager.save({"step": 3}, store, history.checkpoint)  # the store chains onto what it wrote meanwhile
        again = manager.restore_latest()
        assert again is not None and again.state["step"] == 3
        assert again.store.table_items("item")[0].tolist() == store.table_items("item")[0].tolist()
    finally:
        history.close()
