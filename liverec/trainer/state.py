"""Refresh the compressed serving state of every user a micro-batch touched.

After the model learned from a batch, each touched user's history (the last max_len events) is
encoded by the updated model, compressed by the configured codec, wrapped in a state record
(codec and model versions, the offset and time of the newest event it includes, a checksum),
written to the `state` column family in one atomic write batch, and mirrored to the compacted
topic `liverec.user-state` keyed by the decimal user id. The record's Kafka header `seen` carries
the item ids the state covers, so serving can exclude seen items without a second lookup.

Every refresh here is a full re-encode with the current model: in online training the model
moves on every batch, so a state appended to with an older model would mix versions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from kafka import KafkaProducer
from rocksdict import Options, Rdict, WriteBatch

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.record import record_for
from liverec.model.recommender import SequentialRecommender
from liverec.trainer.history import History, user_key
from liverec.trainer.learner import ItemTable

STATE_CF = "state"


def seen_header(items: np.ndarray) -> bytes:
    return np.ascontiguousarray(items, dtype="<i8").tobytes()


class StateWriter:
    def __init__(self, codec: StateCodec, path: str | Path, producer: KafkaProducer, topic: str) -> None:
        self.codec = codec
        self.producer = producer
        self.topic = topic
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), options, column_families={STATE_CF: options})
        self._state = self._db.get_column_family(STATE_CF)
        self.bytes_written = 0

    @torch.no_grad()
    def refresh(self, users: np.ndarray, histories: list[History], last_offset: np.ndarray,
                last_time_ms: np.ndarray, model: SequentialRecommender, items: ItemTable, version: int) -> int:
        """Re-encode and store the state of `users` (histories already include this batch)."""
        keep = [i for i, h in enumerate(histories) if len(h)]
        if not keep:
            return 0
        width = max(len(histories[i]) for i in keep)
        ids = np.zeros((len(keep), width), np.int64)
        acts = np.zeros((len(keep), width), np.int64)
        valid = np.zeros((len(keep), width), bool)
        for row, i in enumerate(keep):
            h = histories[i]
            ids[row, width - len(h):], acts[row, width - len(h):], valid[row, width - len(h):] = h.item, h.action, True
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            emb = items.embed(torch.from_numpy(ids.reshape(-1)).to(device)).reshape(len(keep), width, -1)
            cache = model.encode(emb, torch.from_numpy(acts).to(device), torch.from_numpy(valid).to(device))
            payloads = self.codec.encode(cache, model)
        finally:
            model.train(was_training)
        batch = WriteBatch(raw_mode=True)
        handle = self._db.get_column_family_handle(STATE_CF)
        for row, i in enumerate(keep):
            record = record_for(self.codec, payloads[row], version, int(last_offset[i]), int(last_time_ms[i]))
            batch.put(user_key(int(users[i])), record, handle)
            self.producer.send(self.topic, key=str(int(users[i])).encode(), value=record,
                               headers=[("seen", seen_header(histories[i].item))])
            self.bytes_written += len(record)
        self._db.write(batch)
        return len(keep)

    def get(self, user_id: int) -> bytes | None:
        return self._state.get(user_key(user_id))

    def close(self) -> None:
        self._state.close()
        self._db.close()
