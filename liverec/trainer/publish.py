"""Publish parameters to serving: changed item rows, versioned dense weights, then a commit.

Sparse rows go out as deltas (only rows changed or removed since the last publish, from the
store's change log), so parameter sync costs what training touched, not the table's size. The
first publish after start is a full snapshot: a restarted trainer cannot know which of its
rows a replica already has. Dense weights are small and go out whole, chunked under Kafka's
message-size limit. A learned state codec's parameters (see codec_training.py) ride in the same
dense blob under `PARAMS_PREFIX`, so they belong to the version atomically. The commit record is
written last; replicas swap a version in only when its commit arrives (see
proto/liverec/v1/params.proto).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator

import numpy as np
import torch
from kafka import KafkaProducer
from torch import nn

from liverec.embedding_store.store import EmbeddingStore
from liverec.model.codecs.base import PARAMS_PREFIX
from liverec.model.config import ModelConfig
from liverec.v1 import params_pb2

DENSE_CHUNK_BYTES = 512 * 1024
COMMIT_KEY = b"commit"


def item_key(table: str, key: int) -> bytes:
    return f"item/{table}/{key}".encode()


def dense_key(part: int) -> bytes:
    return f"dense/{part}".encode()


def dense_bytes(model: nn.Module, codec_state: dict[str, torch.Tensor] | None = None) -> bytes:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({PARAMS_PREFIX + k: v.detach().cpu() for k, v in (codec_state or {}).items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class TableRows:
    name: str
    keys: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    removed: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One publish's content, copied out of the live store and model."""

    version: int
    store_version: int
    event_time_ms: int
    tables: list[TableRows]
    dense: bytes


class ParamPublisher:
    def __init__(self, producer: KafkaProducer, topic: str, model_config: ModelConfig) -> None:
        self.producer = producer
        self.topic = topic
        self.model_config_json = json.dumps(dataclasses.asdict(model_config), sort_keys=True)
        self._published_once = False

    def publish(self, store: EmbeddingStore, model: nn.Module, version: int, event_time_ms: int,
                codec_state: dict[str, torch.Tensor] | None = None) -> int:
        """Send the rows changed since the last publish, the dense weights (with `codec_state`, a
        learned codec's parameters) and a commit; returns rows sent."""
        return sum(self.send(self.snapshot(store, model, version, event_time_ms, codec_state)))

    def snapshot(self, store: EmbeddingStore, model: nn.Module, version: int, event_time_ms: int,
                 codec_state: dict[str, torch.Tensor] | None = None) -> Snapshot:
        """Copy what the next publish sends and move the store's publish mark: the part that must
        see the store and the weights hold still. `send` then produces it a slice at a time."""
        full = not self._published_once
        tables = []
        for name in store.tables:
            if full:
                keys, weights = store.table_items(name)
                removed = torch.zeros(0, dtype=torch.int64)
            else:
                delta = store.export_delta(mark=False)[name]
                keys, weights, removed = delta.keys, delta.weights, delta.removed
            counts = store.frequency(name, keys) if len(keys) else torch.zeros(0, dtype=torch.int64)
            tables.append(TableRows(name, keys.cpu().clone(), weights.detach().to("cpu", torch.float32).clone(),
                                    counts.cpu().clone(), removed.cpu().clone()))
        store.mark()
        self._published_once = True
        return Snapshot(version, store.version, event_time_ms, tables, dense_bytes(model, codec_state))

    def send(self, snap: Snapshot, slice_rows: int = 1 << 30) -> Iterator[int]:
        """Produce a snapshot's records, the commit last, yielding the rows sent after every
        `slice_rows` rows: producing a record costs tens of microseconds of Python, so a caller
        with latency-bound work (the trainer's receive path) interleaves it between slices."""
        for t in snap.tables:
            for start in range(0, len(t.keys), slice_rows):
                yield self._send_rows(t.name, t.keys[start:start + slice_rows], t.weights[start:start + slice_rows],
                                      t.counts[start:start + slice_rows], snap.store_version)
            removed = t.removed.tolist()
            for start in range(0, len(removed), slice_rows):
                for key in removed[start:start + slice_rows]:
                    self.producer.send(self.topic, key=item_key(t.name, key), value=None)
                yield len(removed[start:start + slice_rows])
        blob = snap.dense
        parts = max(1, -(-len(blob) // DENSE_CHUNK_BYTES))
        rows = sum(len(t.keys) + len(t.removed) for t in snap.tables)
        for part in range(parts):
            chunk = params_pb2.DenseChunk(version=snap.version, part=part, parts=parts,
                                          data=blob[part * DENSE_CHUNK_BYTES:(part + 1) * DENSE_CHUNK_BYTES])
            self.producer.send(self.topic, key=dense_key(part), value=chunk.SerializeToString())
        commit = params_pb2.ParamsCommit(version=snap.version, dense_version=snap.version, dense_parts=parts,
                                         dense_sha256=hashlib.sha256(blob).digest(),
                                         model_config_json=self.model_config_json,
                                         event_time_ms=snap.event_time_ms, rows=rows)
        self.producer.send(self.topic, key=COMMIT_KEY, value=commit.SerializeToString())
        yield 0

    def _send_rows(self, table: str, keys: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                   version: int) -> int:
        w = weights.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
        dim = w.shape[1] if w.ndim == 2 else 0
        row = params_pb2.ItemRow(table=table, version=version, dim=dim)
        for key, vec, count in zip(keys.tolist(), w, counts.tolist()):
            row.key, row.weights, row.count = key, np.ascontiguousarray(vec).tobytes(), count
            self.producer.send(self.topic, key=item_key(table, key), value=row.SerializeToString())
        return len(keys)
