"""The trainer's store of compressed serving states: encode, append, write, and find stale ones.

After the model learned from a micro-batch, each touched user's state is rewritten: a state
record (codec and model versions, the codec parameter version, the offset and time of the
newest event it includes, a checksum) per user, written to the `state` column family in one
atomic write batch and mirrored to the compacted topic `liverec.user-state` keyed by the decimal
user id. The record's Kafka header `seen` carries the item ids the state covers, so serving can
exclude seen items without a second lookup.

Two ways to refresh a touched user (the worker picks per user, `can_append`):
- re-encode: the user's history (the last max_len events) through the current model, then the
  codec (`encode_histories`, `codec.encode`);
- append, for codecs that can (`full`, `int8`, `window`): decode the stored payload, run only
  the new events over it (`SequenceEncoder.extend`) and append their K/V (`codec.append`).
  Only onto a state that holds the user's whole history before this batch (nothing evicted,
  nothing it already includes) and whose model version is at most `append_max_versions_behind`
  behind: an append onto a state of an older model mixes two models' K/V. The appended state
  keeps the older version, so the re-encode below replaces it in time.

Staleness. The model version moves with every micro-batch, so every state not rewritten falls
behind. A second column family indexes users by the model version of their state (key:
big-endian version then user), updated in the same write batch as the state, so the oldest
states are the first keys: `stalest(n)` is one short scan, whatever the number of users, and
the worker re-encodes a bounded number of them per micro-batch (and while idle).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaProducer
from rocksdict import Options, Rdict, WriteBatch

from liverec.model.codecs.base import StateCodec, last_events, read_head
from liverec.model.codecs.record import RecordError, StateRecord, decode_record
from liverec.model.encoder import KVCache
from liverec.model.recommender import SequentialRecommender
from liverec.trainer.history import History, user_key
from liverec.trainer.learner import ItemTable

STATE_CF = "state"
VERSION_CF = "by_version"
_VERSION = struct.Struct(">Q")


def seen_header(items: np.ndarray) -> bytes:
    return np.ascontiguousarray(items, dtype="<i8").tobytes()


def version_key(model_version: int, user: int) -> bytes:
    return _VERSION.pack(model_version) + user_key(user)


def _padded(histories: Sequence[History], counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item ids, actions and valid mask `[B, W]` of each history's last `counts[b]` events, left-padded."""
    width = max(counts)
    ids = np.zeros((len(histories), width), np.int64)
    acts = np.zeros((len(histories), width), np.int64)
    valid = np.zeros((len(histories), width), bool)
    for row, (h, n) in enumerate(zip(histories, counts)):
        if n:
            ids[row, width - n:], acts[row, width - n:] = h.item[-n:], h.action[-n:]
            valid[row, width - n:] = True
    return ids, acts, valid


class StateWriter:
    def __init__(self, codec: StateCodec, path: str | Path, producer: KafkaProducer, topic: str, *,
                 max_len: int, append_max_versions_behind: int = 0) -> None:
        self.codec = codec
        self.producer = producer
        self.topic = topic
        self.max_len = max_len
        self.append_max_versions_behind = append_max_versions_behind
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), options, column_families={STATE_CF: options, VERSION_CF: options})
        self._state = self._db.get_column_family(STATE_CF)
        self._by_version = self._db.get_column_family(VERSION_CF)
        self.bytes_written = 0

    # -- reading -------------------------------------------------------------------------------------

    def get(self, user_id: int) -> bytes | None:
        return self._state.get(user_key(user_id))

    def stored(self, users: Sequence[int]) -> list[StateRecord | None]:
        """Each user's stored record, parsed (None when absent or unreadable: it is re-encoded)."""
        out: list[StateRecord | None] = []
        for raw in self._state.get([user_key(int(u)) for u in users]):
            try:
                out.append(None if raw is None else decode_record(raw))
            except RecordError:
                out.append(None)
        return out

    def stalest(self, limit: int, version: int) -> list[tuple[int, int]]:
        """Up to `limit` (user, state model version) whose state is older than model `version`,
        oldest first."""
        found: list[tuple[int, int]] = []
        if limit <= 0:
            return found
        it = self._by_version.iter()
        it.seek_to_first()
        while it.valid() and len(found) < limit:
            key = it.key()
            (stored,) = _VERSION.unpack_from(key)
            if stored >= version:
                break
            found.append((int.from_bytes(key[_VERSION.size:], "big", signed=True), stored))
            it.next()
        return found

    def oldest_version(self) -> int | None:
        """Model version of the oldest stored state (None when there is none)."""
        it = self._by_version.iter()
        it.seek_to_first()
        return _VERSION.unpack_from(it.key())[0] if it.valid() else None

    # -- encoding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_histories(self, histories: Sequence[History], model: SequentialRecommender,
                         items: ItemTable) -> KVCache:
        """Full caches of non-empty `histories` through the current model (eval mode)."""
        ids, acts, valid = _padded(histories, [len(h) for h in histories])
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            emb = items.embed(torch.from_numpy(ids.reshape(-1)).to(device)).reshape(*ids.shape, -1)
            return model.encode(emb, torch.from_numpy(acts).to(device), torch.from_numpy(valid).to(device))
        finally:
            model.train(was_training)

    def can_append(self, record: StateRecord | None, history_len: int, new_events: int, first_new_offset: int,
                   version: int) -> bool:
        """Whether appending this batch's `new_events` to `record` gives what re-encoding would."""
        codec = self.codec
        if not codec.incremental or codec.module is not None or record is None:
            return False
        if (record.codec_id, record.codec_version) != (codec.codec_id, codec.version):
            return False
        if not 0 <= version - record.model_version <= self.append_max_versions_behind:
            return False
        if record.last_offset >= first_new_offset:  # it already includes some of them (a restart)
            return False
        try:
            next_pos, held = read_head(record.payload, codec.codec_id)
        except ValueError:
            return False
        return next_pos == held and held + new_events == history_len <= self.max_len

    @torch.no_grad()
    def append(self, records: Sequence[StateRecord], histories: Sequence[History], new_counts: Sequence[int],
               model: SequentialRecommender, items: ItemTable) -> list[bytes]:
        """New payloads: each stored payload with the K/V of its user's `new_counts` newest events."""
        device = next(model.parameters()).device
        payloads = [r.payload for r in records]
        cache = self.codec.decode(payloads, device)
        ids, acts, valid = _padded(histories, new_counts)
        was_training = model.training
        model.eval()
        try:
            emb = items.embed(torch.from_numpy(ids.reshape(-1)).to(device)).reshape(*ids.shape, -1)
            _, extended = model.encoder.extend(cache, emb, torch.from_numpy(acts).to(device),
                                               torch.from_numpy(valid).to(device), capacity=self.max_len)
        finally:
            model.train(was_training)
        counts = torch.tensor(list(new_counts), dtype=torch.long, device=device)
        return self.codec.append(payloads, last_events(extended, counts))

    # -- writing -------------------------------------------------------------------------------------

    def write(self, users: Sequence[int], histories: Sequence[History], records: Sequence[bytes],
              versions: Sequence[int], replaced: Sequence[int | None]) -> None:
        """Store and publish `records` (one per user, of model `versions`), in one write batch
        with the version index (`replaced`: the model version of each user's previous state,
        whose index entry goes; None when there was none)."""
        batch = WriteBatch(raw_mode=True)
        state = self._db.get_column_family_handle(STATE_CF)
        index = self._db.get_column_family_handle(VERSION_CF)
        for user, history, record, version, old in zip(users, histories, records, versions, replaced, strict=True):
            user = int(user)
            if old is not None:
                batch.delete(version_key(old, user), index)
            batch.put(user_key(user), record, state)
            batch.put(version_key(version, user), b"", index)
            self.producer.send(self.topic, key=str(user).encode(), value=record,
                               headers=[("seen", seen_header(history.item))])
            self.bytes_written += len(record)
        self._db.write(batch)

    def forget(self, entries: Sequence[tuple[int, int]]) -> None:
        """Drop index entries `(user, model version)` that have no usable state behind them (an
        unreadable record, or a user without history), so they are not picked again."""
        if not entries:
            return
        batch = WriteBatch(raw_mode=True)
        index = self._db.get_column_family_handle(VERSION_CF)
        for user, version in entries:
            batch.delete(version_key(version, user), index)
        self._db.write(batch)

    def close(self) -> None:
        self._by_version.close()
        self._state.close()
        self._db.close()
