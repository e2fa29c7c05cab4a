"""Per-user event history in RocksDB: each user's last N events, read and written a batch at a time.

The trainer needs every touched user's recent events to build the model's input windows; the
state codecs later rebuild a user's K/V from it. One record per user keeps reads to one multi-get
per micro-batch. Records are fixed-width little-endian arrays, so decoding is a numpy view.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rocksdict import Checkpoint, Options, Rdict, WriteBatch

# item id, event time (ms), action; packed as one structured record per event.
EVENT_DTYPE = np.dtype([("item", "<i8"), ("time_ms", "<i8"), ("action", "<i1")])


def user_key(user_id: int) -> bytes:
    return int(user_id).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class History:
    """One user's events, oldest first."""

    item: np.ndarray
    time_ms: np.ndarray
    action: np.ndarray

    def __len__(self) -> int:
        return len(self.item)


EMPTY = History(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8))


def _decode(raw: bytes | None) -> History:
    if not raw:
        return EMPTY
    rec = np.frombuffer(raw, dtype=EVENT_DTYPE)
    return History(rec["item"].astype(np.int64), rec["time_ms"].astype(np.int64), rec["action"].astype(np.int8))


def _encode(item: np.ndarray, time_ms: np.ndarray, action: np.ndarray) -> bytes:
    rec = np.empty(len(item), dtype=EVENT_DTYPE)
    rec["item"], rec["time_ms"], rec["action"] = item, time_ms, action
    return rec.tobytes()


class HistoryStore:
    """user id -> last `max_events` events, in a RocksDB database at `path`."""

    def __init__(self, path: str | Path, max_events: int) -> None:
        if max_events <= 0:
            raise ValueError(f"max_events: must be > 0, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._options = options
        self._db = Rdict(str(self.path), options)

    def get_many(self, user_ids: np.ndarray) -> list[History]:
        if len(user_ids) == 0:
            return []
        raws = self._db.get([user_key(u) for u in user_ids.tolist()])
        return [_decode(raw) for raw in raws]

    def append(self, user_ids: np.ndarray, item: np.ndarray, time_ms: np.ndarray, action: np.ndarray) -> None:
        """Append events (arrival order) to their users' histories, in one atomic write batch."""
        if len(user_ids) == 0:
            return
        order = np.argsort(user_ids, kind="stable")
        users, starts = np.unique(user_ids[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        current = self.get_many(users)
        batch = WriteBatch(raw_mode=True)
        for user, start, end, old in zip(users.tolist(), starts.tolist(), ends.tolist(), current):
            idx = order[start:end]
            new_item = np.concatenate((old.item, item[idx]))[-self.max_events:]
            new_time = np.concatenate((old.time_ms, time_ms[idx]))[-self.max_events:]
            new_action = np.concatenate((old.action, action[idx]))[-self.max_events:]
            batch.put(user_key(user), _encode(new_item, new_time, new_action))
        self._db.write(batch)

    def num_users(self) -> int:
        return sum(1 for _ in self._db.keys())

    def items(self):
        """(user id, History) for every user, in key order (for tests and full re-encodes)."""
        for key, raw in self._db.items():
            yield int.from_bytes(key, "big", signed=True), _decode(raw)

    def checkpoint(self, dest: str | Path) -> None:
        """A consistent copy at `dest` (RocksDB checkpoint: hard links where possible)."""
        self._db.flush()
        Checkpoint(self._db).create_checkpoint(str(dest))

    def restore_from(self, source: str | Path) -> None:
        """Replace the live database with a copy of checkpoint `source`."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.copytree(source, self.path)
        self._db = Rdict(str(self.path), self._options)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]
