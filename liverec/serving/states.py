"""Decode users' stored state records into the caches the scorer reads; count hits, misses, corruption.

A replica stores, per user, the record the trainer published plus the `seen` item ids from its
Kafka header (`pack`). A record that fails its checksum or that this replica's codec cannot
decode is a miss (the user is answered as cold start) and a metric, never an error to the caller.
"""

from __future__ import annotations

import logging
import struct
import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.record import CorruptRecord, RecordError, decode_record
from liverec.model.encoder import KVCache
from liverec.serving.backend import ModelSnapshot, UserState

log = logging.getLogger(__name__)
_SEEN = struct.Struct("<I")
STALENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


def pack(record: bytes, seen: bytes) -> bytes:
    return _SEEN.pack(len(seen)) + seen + record


def unpack(value: bytes) -> tuple[np.ndarray, bytes]:
    (n,) = _SEEN.unpack_from(value)
    start = _SEEN.size
    return np.frombuffer(value[start:start + n], dtype="<i8").astype(np.int64), value[start + n:]


class StateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter("liverec_serving_state_lookups", "User-state lookups by result.", ["result"],
                               registry=registry)
        self.staleness = Histogram("liverec_serving_state_staleness_seconds",
                                   "Now minus the event time of the newest event in a served state.",
                                   buckets=STALENESS_BUCKETS, registry=registry)


class CodecStates:
    """The replica's StateDecoder for one codec."""

    def __init__(self, codec: StateCodec, metrics: StateMetrics) -> None:
        self.codec = codec
        self.metrics = metrics

    def __call__(self, values: list[bytes | None], snapshot: ModelSnapshot) -> list[UserState | None]:
        out: list[UserState | None] = [None] * len(values)
        good: list[tuple[int, np.ndarray, int, int]] = []
        payloads: list[bytes] = []
        for i, value in enumerate(values):
            if value is None:
                self.metrics.lookups.labels(result="miss").inc()
                continue
            try:
                seen, raw = unpack(value)
                record = decode_record(raw, self.codec)
            except CorruptRecord as exc:
                self.metrics.lookups.labels(result="corrupt").inc()
                log.warning("corrupt state record", extra={"error": str(exc)})
                continue
            except (RecordError, struct.error) as exc:
                self.metrics.lookups.labels(result="unsupported").inc()
                log.warning("undecodable state record", extra={"error": str(exc)})
                continue
            good.append((i, seen, record.last_offset, record.last_event_time_ms))
            payloads.append(record.payload)
        if not payloads:
            return out
        cache = self.codec.decode(payloads, snapshot.device)
        now = time.time()
        for row, (i, seen, offset, time_ms) in enumerate(good):
            one = KVCache([(k[row:row + 1], v[row:row + 1]) for k, v in cache.layers], cache.valid[row:row + 1],
                          cache.next_pos[row:row + 1])
            out[i] = UserState(one, seen, offset, time_ms, batch=cache, row=row)
            self.metrics.lookups.labels(result="hit").inc()
            self.metrics.staleness.observe(max(0.0, now - time_ms / 1000))
        return out
