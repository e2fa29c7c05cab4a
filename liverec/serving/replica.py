"""A serving replica's local copy of `liverec.params` and `liverec.user-state`.

A background thread consumes both changelog topics and materialises them into the replica's own
RocksDB (column families `state`, `rows`, `meta`) and into an in-memory `ModelSnapshot` on the
device. Offsets are stored with the data they cover, in the same atomic write batch, so a
restarted replica resumes exactly where it stopped and answers as before for unchanged users.

Parameters: a commit record completes a version (see params.proto); the committed rows, dense
weights and the params offset are persisted together, then the snapshot is rebuilt and swapped
in with one assignment. User state: the latest record per user is kept; decoding happens per
request, so a corrupt record costs one miss, never the replica.

A learned codec's parameters of each committed version go to `on_codec_params` (the state
decoder keeps the recent ones, see states.py) and are persisted under `meta` keys `codec/<version>`,
the newest `state.codec_generations_kept` of them, so a restarted replica decodes the same
records as before.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from kafka import TopicPartition
from rocksdict import Options, Rdict, WriteBatch

from liverec.platform.config import LiverecConfig
from liverec.platform.kafka import make_consumer
from liverec.platform.state_dir import StateDirLock
from liverec.serving.backend import ModelSnapshot, UserState
from liverec.serving.params import ParamsMaterializer, ParamsVersion
from liverec.serving.states import pack
from liverec.v1 import params_pb2

log = logging.getLogger(__name__)

StateDecoder = Callable[[list[bytes | None], ModelSnapshot], list[UserState | None]]

_CF_STATE, _CF_ROWS, _CF_META = "state", "rows", "meta"
_CODEC_PREFIX = b"codec/"
CodecParamsSink = Callable[[int, dict[str, torch.Tensor]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def user_key(user_id: int) -> bytes:
    return int(user_id).to_bytes(8, "big", signed=True)


def _offset_key(topic: str, partition: int) -> bytes:
    return f"offset/{topic}/{partition}".encode()


def _codec_key(version: int) -> bytes:
    return _CODEC_PREFIX + f"{version:020d}".encode()


class Replica:
    def __init__(self, config: LiverecConfig, decode_states: StateDecoder,
                 on_codec_params: CodecParamsSink | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.serving.device)
        self.decode_states = decode_states
        self.on_codec_params = on_codec_params
        path = Path(config.serving.state_dir) / "replica"
        self.state_dir_lock = StateDirLock(path.parent, owner="serving", field="serving.state_dir")
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        self._db = Rdict(str(path), options, column_families={_CF_STATE: options, _CF_ROWS: options,
                                                              _CF_META: options})
        self._state = self._db.get_column_family(_CF_STATE)
        self._meta = self._db.get_column_family(_CF_META)
        self._rows = self._db.get_column_family(_CF_ROWS)
        self.materializer = ParamsMaterializer()
        self._snapshot: ModelSnapshot | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lag: dict[tuple[str, int], int] = {}
        self._lag_reported: set[str] = set()  # topics whose consumer has measured its lag
        self.on_snapshot: Callable[[ModelSnapshot], None] | None = None
        self._load_committed()

    # -- what the service reads -------------------------------------------------------------------

    def snapshot(self) -> ModelSnapshot | None:
        return self._snapshot

    def get(self, user_ids: list[int], snapshot: ModelSnapshot) -> list[UserState | None]:
        """The StateSource the scorer reads: decoded states, None for unknown or unusable ones."""
        return self.decode_states(self._state.get([user_key(u) for u in user_ids]), snapshot)

    def ready(self) -> bool:
        """A snapshot exists and every partition is within `ready_max_lag` records of its end."""
        topics = self.config.topics
        if self._snapshot is None or self._lag_reported != {topics.params, topics.user_state}:
            return False
        return max(self._lag.values()) <= self.config.serving.ready_max_lag

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self._lag)

    # -- persistence -----------------------------------------------------------------------------------

    def _stored_offset(self, topic: str, partition: int) -> int | None:
        raw = self._meta.get(_offset_key(topic, partition))
        return None if raw is None else int(raw)

    def _stored_codec_versions(self) -> list[int]:
        it = self._meta.iter()
        it.seek(_CODEC_PREFIX)
        versions = []
        while it.valid() and it.key().startswith(_CODEC_PREFIX):
            versions.append(int(it.key()[len(_CODEC_PREFIX):]))
            it.next()
        return versions

    def _load_committed(self) -> None:
        """Rebuild the last committed parameter version (and the kept codec parameters of earlier
        ones) from RocksDB (after a restart)."""
        if self.on_codec_params is not None:
            for version in self._stored_codec_versions():
                state = torch.load(io.BytesIO(self._meta[_codec_key(version)]), map_location="cpu", weights_only=True)
                self.on_codec_params(version, state)
        commit_raw = self._meta.get(b"commit")
        dense = self._meta.get(b"dense")
        if commit_raw is None or dense is None:
            return
        commit = params_pb2.ParamsCommit.FromString(commit_raw)
        self.materializer.apply(b"dense/0", params_pb2.DenseChunk(version=commit.dense_version, part=0, parts=1,
                                                                   data=dense).SerializeToString())
        for key, value in self._rows.items():
            self.materializer.apply(key, value)
        restored = params_pb2.ParamsCommit()
        restored.CopyFrom(commit)
        restored.dense_parts = 1
        self._install(self.materializer.apply(b"commit", restored.SerializeToString()))

    def _install(self, version: ParamsVersion | None) -> None:
        if version is None:
            return
        if version.codec_state and self.on_codec_params is not None:
            self.on_codec_params(version.version, version.codec_state)
        snapshot = ModelSnapshot.build(version, self.device)
        self._snapshot = snapshot
        if self.on_snapshot is not None:
            self.on_snapshot(snapshot)
        log.info("parameters swapped in", extra={"version": version.version, "items": len(snapshot.item_keys)})

    # -- consuming -------------------------------------------------------------------------------------

    def start(self) -> None:
        """One consumer thread per topic: a state record never waits behind a parameter version
        being materialised (item-side tensors are rebuilt then), which is what freshness needs."""
        topics = self.config.topics
        self._threads = [threading.Thread(target=self._run, args=(topic,), name=f"replica-{topic}", daemon=True)
                         for topic in (topics.params, topics.user_state)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for family in (self._state, self._meta, self._rows):  # each handle holds the DB open
            family.close()
        self._db.close()
        self.state_dir_lock.release()

    def _run(self, topic: str) -> None:
        consumer = make_consumer(self.config.kafka, group_id=None)
        try:
            tps = self._assign(consumer, [topic])
            pending_rows: dict[bytes, bytes | None] = {}
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=100)
                for tp, records in sorted(polled.items(), key=lambda kv: kv[0].partition):
                    if topic == self.config.topics.params:
                        self._apply_params(records, pending_rows)
                    else:
                        self._apply_states(tp, records)
                self._update_lag(consumer, tps)
        except Exception:
            log.exception("replica consumer failed")
            raise
        finally:
            consumer.close()

    def _assign(self, consumer, topics: list[str]) -> list[TopicPartition]:
        tps = []
        deadline = time.monotonic() + 30
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            while not parts and time.monotonic() < deadline:
                time.sleep(0.2)
                parts = consumer.partitions_for_topic(topic)
            tps += [TopicPartition(topic, p) for p in sorted(parts or ())]
        consumer.assign(tps)
        for tp in tps:
            stored = self._stored_offset(tp.topic, tp.partition)
            if stored is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, stored)
        return tps

    def _apply_params(self, records: list, pending_rows: dict[bytes, bytes | None]) -> None:
        for rec in records:
            version = self.materializer.apply(rec.key, rec.value)
            if rec.key.startswith(b"item/"):
                pending_rows[rec.key] = rec.value
            if version is None:
                continue
            # A complete version: persist its rows, dense weights, commit and offset atomically.
            batch = WriteBatch(raw_mode=True)
            for key, value in pending_rows.items():
                if value is None:
                    batch.delete(key, self._db.get_column_family_handle(_CF_ROWS))
                else:
                    batch.put(key, value, self._db.get_column_family_handle(_CF_ROWS))
            meta = self._db.get_column_family_handle(_CF_META)
            batch.put(b"dense", self.materializer.dense_blob, meta)
            batch.put(b"commit", rec.value, meta)
            if version.codec_state:
                self._put_codec_params(batch, version.version, version.codec_state)
            batch.put(_offset_key(rec.topic, rec.partition), str(rec.offset + 1).encode(), meta)
            self._db.write(batch)
            pending_rows.clear()
            self._install(version)

    def _put_codec_params(self, batch: WriteBatch, version: int, state: dict[str, torch.Tensor]) -> None:
        """Persist one version's codec parameters and drop those beyond the kept generations."""
        meta = self._db.get_column_family_handle(_CF_META)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        batch.put(_codec_key(version), buffer.getvalue(), meta)
        kept = self.config.state.codec_generations_kept
        stored = sorted({*self._stored_codec_versions(), version})
        for old in stored[:-kept]:
            batch.delete(_codec_key(old), meta)

    def _apply_states(self, tp: TopicPartition, records: list) -> None:
        batch = WriteBatch(raw_mode=True)
        state = self._db.get_column_family_handle(_CF_STATE)
        for rec in records:
            key = user_key(int(rec.key))  # the topic is keyed by decimal user id, like the events
            if rec.value is None:
                batch.delete(key, state)
            else:
                batch.put(key, pack(rec.value, dict(rec.headers or ()).get("seen", b"")), state)
        batch.put(_offset_key(tp.topic, tp.partition), str(records[-1].offset + 1).encode(),
                  self._db.get_column_family_handle(_CF_META))
        self._db.write(batch)

    def _update_lag(self, consumer, tps: list[TopicPartition]) -> None:
        for tp in tps:
            end = consumer.highwater(tp)
            if end is None:
                continue
            self._lag[(tp.topic, tp.partition)] = max(0, end - consumer.position(tp))
        if all(consumer.highwater(tp) is not None for tp in tps):
            self._lag_reported.update(tp.topic for tp in tps)

