"""Decode users' stored state records into the caches the scorer reads; count hits, misses, corruption.

A replica stores, per user, the record the trainer published plus the `seen` item ids from its
Kafka header (`pack`). A record that fails its checksum or that this replica's codec cannot
decode is a miss (the user is answered as cold start) and a metric, never an error to the caller.

Learned codecs. The trainer encodes states with the codec parameters of a published version and
names it in the record (`params_version`). A codec whose decode reads its parameters
(`collective`: the pool) must decode with exactly those, so this keeps the parameters of the
last `generations_kept` versions (`install`, called for every committed version) and decodes
each record with its own; a record of a version no longer (or not yet) held is a miss counted
as `unknown_params` until the trainer's background re-encode replaces it. `summary` payloads
are plain K/V rows and decode with no parameters, whatever version wrote them.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.record import (
    CorruptRecord,
    RecordError,
    StateRecord,
    decode_record,
)
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
    """The replica's StateDecoder for one codec (and, for a learned one, its recent parameters)."""

    def __init__(self, codec: StateCodec, metrics: StateMetrics, *,
                 make_codec: Callable[[], StateCodec] | None = None, generations_kept: int = 16,
                 device: torch.device | str = "cpu") -> None:
        self.codec = codec
        self.metrics = metrics
        self.make_codec = make_codec
        self.generations_kept = generations_kept
        self.device = torch.device(device)
        self._generations: OrderedDict[int, StateCodec] = OrderedDict()

    def install(self, version: int, codec_state: dict[str, torch.Tensor]) -> None:
        """Hold the codec parameters published with model `version` (oldest dropped beyond
        `generations_kept`); only codecs whose decode reads them keep any."""
        if not self.codec.decode_needs_params or not codec_state or version in self._generations:
            return
        if self.make_codec is None:
            raise ValueError(f"codec {self.codec.codec_id!r} decodes with its parameters: give CodecStates make_codec")
        codec = self.make_codec()
        module = codec.module
        assert module is not None
        module.load_state_dict(codec_state)
        module.to(self.device).eval()
        self._generations[version] = codec
        while len(self._generations) > self.generations_kept:
            self._generations.popitem(last=False)

    def generations(self) -> list[int]:
        return list(self._generations)

    def _codec_for(self, record: StateRecord) -> StateCodec | None:
        if not self.codec.decode_needs_params:
            return self.codec
        return self._generations.get(record.params_version)

    def __call__(self, values: list[bytes | None], snapshot: ModelSnapshot) -> list[UserState | None]:
        out: list[UserState | None] = [None] * len(values)
        groups: dict[int, tuple[StateCodec, list[tuple[int, np.ndarray, StateRecord]]]] = {}
        misses = sum(value is None for value in values)
        if misses:
            self.metrics.lookups.labels(result="miss").inc(misses)
        for i, value in enumerate(values):
            if value is None:
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
            codec = self._codec_for(record)
            if codec is None:
                self.metrics.lookups.labels(result="unknown_params").inc()
                continue
            groups.setdefault(id(codec), (codec, []))[1].append((i, seen, record))
        now = time.time()
        for codec, members in groups.values():
            cache = codec.decode([record.payload for _, _, record in members], snapshot.device)
            for row, (i, seen, record) in enumerate(members):
                out[i] = UserState(cache, row, seen, record.last_offset, record.last_event_time_ms)
                self.metrics.staleness.observe(max(0.0, now - record.last_event_time_ms / 1000))
            self.metrics.lookups.labels(result="hit").inc(len(members))
        return out
