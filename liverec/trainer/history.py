"""Per-user event history in RocksDB: each user's last N events, read and written a batch at a time.

The trainer needs every touched user's recent events to build the model's input windows; the
state codecs later rebuild a user's K/V from it. One record per user keeps reads to one multi-get
per micro-batch. Records are fixed-width little-endian arrays, so decoding is a numpy view.

Events the worker has received but the learner has not yet learned are *staged*: held in memory
beside the database, read with `get_many(..., staged=True)`, and moved out of the stage when
`append` writes them. The state refresh reads through the stage, so a user's served state
includes an event as soon as it arrives, while the database (and so every checkpoint) holds
exactly the learned events and stays consistent with the checkpointed offsets.
"""

from __future__ import annotations

import shutil
import threading
from collections import deque
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
        # user -> staged events (item, time_ms, action), oldest first. The lock makes `append`
        # (database write + unstage) one step for readers on another thread.
        self._staged: dict[int, deque[tuple[int, int, int]]] = {}
        self._lock = threading.Lock()

    def get_many(self, user_ids: np.ndarray, *, staged: bool = False) -> list[History]:
        """Each user's stored history; with `staged`, followed by the user's staged events (the
        newest `max_events` of both)."""
        if len(user_ids) == 0:
            return []
        with self._lock:
            stored = self._stored(user_ids)
            if not staged or not self._staged:
                return stored
            return [self._with_staged(h, self._staged.get(u)) for h, u in zip(stored, user_ids.tolist())]

    def _stored(self, user_ids: np.ndarray) -> list[History]:
        return [_decode(raw) for raw in self._db.get([user_key(u) for u in user_ids.tolist()])]

    def _with_staged(self, history: History, staged: deque[tuple[int, int, int]] | None) -> History:
        if not staged:
            return history
        extra = np.array(staged, dtype=np.int64).reshape(-1, 3)
        return self._extended(history, extra[:, 0], extra[:, 1], extra[:, 2])

    def _extended(self, history: History, item: np.ndarray, time_ms: np.ndarray, action: np.ndarray) -> History:
        """`history` followed by these events, cut to the newest `max_events`."""
        return History(np.concatenate((history.item, item))[-self.max_events:],
                       np.concatenate((history.time_ms, time_ms))[-self.max_events:],
                       np.concatenate((history.action, action.astype(np.int8)))[-self.max_events:])

    def stage(self, user_ids: np.ndarray, item: np.ndarray, time_ms: np.ndarray, action: np.ndarray) -> None:
        """Hold events (arrival order) until `append` writes them; readers with `staged=True` see them now."""
        with self._lock:
            for user, i, t, a in zip(user_ids.tolist(), item.tolist(), time_ms.tolist(), action.tolist()):
                self._staged.setdefault(user, deque()).append((i, t, a))

    def staged_count(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._staged.values())

    def append(self, user_ids: np.ndarray, item: np.ndarray, time_ms: np.ndarray, action: np.ndarray) -> None:
        """Append events (arrival order) to their users' histories, in one atomic write batch, and
        take each user's as many oldest staged events out of the stage (they are these events:
        events are learned in the order they were staged)."""
        if len(user_ids) == 0:
            return
        order = np.argsort(user_ids, kind="stable")
        users, starts = np.unique(user_ids[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        with self._lock:
            current = self._stored(users)
            batch = WriteBatch(raw_mode=True)
            for user, start, end, old in zip(users.tolist(), starts.tolist(), ends.tolist(), current):
                idx = order[start:end]
                new = self._extended(old, item[idx], time_ms[idx], action[idx])
                batch.put(user_key(user), _encode(new.item, new.time_ms, new.action))
            self._db.write(batch)
            for user, start, end in zip(users.tolist(), starts.tolist(), ends.tolist()):
                queue = self._staged.get(user)
                if queue is None:
                    continue
                for _ in range(min(end - start, len(queue))):
                    queue.popleft()
                if not queue:
                    del self._staged[user]

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
        """Replace the live database with a copy of checkpoint `source` (the stage is emptied:
        its events come again from the checkpoint's offsets)."""
        self._staged.clear()
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.copytree(source, self.path)
        self._db = Rdict(str(self.path), self._options)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]
