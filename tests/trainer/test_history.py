"""The per-user history store (real RocksDB): staged events are visible to the state refresh at
once and leave the stage exactly when the learner appends them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liverec.trainer.history import HistoryStore


def arrays(*events: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    users, items, times = (np.array(col, dtype=np.int64) for col in zip(*events))
    return users, items, times, np.ones(len(users), dtype=np.int8)


def test_staged_events_are_read_after_the_stored_ones_until_appended(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history", max_events=4)
    try:
        store.append(*arrays((1, 10, 100), (1, 11, 101), (2, 20, 100)))
        store.stage(*arrays((1, 12, 102), (1, 13, 103), (1, 14, 104), (2, 21, 105), (3, 30, 106)))
        users = np.array([1, 2, 3], dtype=np.int64)
        stored = store.get_many(users)
        assert [h.item.tolist() for h in stored] == [[10, 11], [20], []]
        staged = store.get_many(users, staged=True)
        assert [h.item.tolist() for h in staged] == [[11, 12, 13, 14], [20, 21], [30]]  # the newest max_events
        assert staged[0].time_ms.tolist() == [101, 102, 103, 104]
        assert store.staged_count() == 5

        # The learner appends the first two of user 1's staged events and user 3's: they leave the stage.
        store.append(*arrays((1, 12, 102), (3, 30, 106), (1, 13, 103)))
        assert store.staged_count() == 2
        after = store.get_many(users, staged=True)
        assert [h.item.tolist() for h in after] == [[11, 12, 13, 14], [20, 21], [30]]  # nothing twice, nothing lost
        assert [h.item.tolist() for h in store.get_many(users)] == [[10, 11, 12, 13], [20], [30]]
    finally:
        store.close()


def test_restoring_a_checkpoint_empties_the_stage(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history", max_events=4)
    try:
        store.append(*arrays((1, 10, 100)))
        store.checkpoint(tmp_path / "checkpoint")
        store.stage(*arrays((1, 11, 101)))
        store.restore_from(tmp_path / "checkpoint")
        assert store.staged_count() == 0  # received again from the checkpoint's offsets
        assert store.get_many(np.array([1]), staged=True)[0].item.tolist() == [10]
    finally:
        store.close()
