"""Decode and validate raw event records into a columnar batch; refuse bad ones with a reason.

A bad event must never stop training nor be silently dropped: each rejected record keeps its
original bytes and gets one reason from REASONS, and the worker forwards it to the dead-letter
topic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from liverec.platform.events import MAX_FUTURE_MS, MAX_ID, MIN_EVENT_TIME_MS
from liverec.v1 import events_pb2

REASONS = (
    "undecodable",        # bytes are not a protobuf message
    "wrong_schema",       # a protobuf message, but with fields UserEvent does not have
    "missing_field",      # user_id, item_id, action or event_time_ms unset
    "id_out_of_range",    # user_id or item_id not in [1, MAX_ID)
    "time_out_of_range",  # before 2000 or more than a day ahead of the wall clock
    "nan_value",          # value present but NaN or infinite
)
_VALID_ACTIONS = frozenset(v for v in events_pb2.Action.values() if v != events_pb2.ACTION_UNSPECIFIED)


class RawRecord(Protocol):
    """What the decoder needs of a Kafka record (kafka-python's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Rejected:
    record: RawRecord
    reason: str
    detail: str


@dataclass(frozen=True)
class EventBatch:
    """Valid events in arrival order, columnar, with where each came from (for exact offsets)."""

    user_id: np.ndarray
    item_id: np.ndarray
    action: np.ndarray
    value: np.ndarray
    event_time_ms: np.ndarray
    partition: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.user_id)


@dataclass(frozen=True)
class ValidationRules:
    min_event_time_ms: int = MIN_EVENT_TIME_MS
    max_future_ms: int = MAX_FUTURE_MS
    max_id: int = MAX_ID


def _check(msg: events_pb2.UserEvent, rules: ValidationRules, latest_ms: int) -> tuple[str, str] | None:
    """The (reason, detail) that disqualifies a parsed event, or None when it is valid."""
    if len(unknown_fields.UnknownFieldSet(msg)):
        return "wrong_schema", "message has fields that UserEvent does not define"
    missing = [name for name in ("user_id", "item_id", "event_time_ms") if getattr(msg, name) == 0]
    if msg.action == events_pb2.ACTION_UNSPECIFIED:
        missing.append("action")
    if missing:
        return "missing_field", "unset: " + ",".join(missing)
    if msg.action not in _VALID_ACTIONS:
        return "wrong_schema", f"unknown action {msg.action}"
    for name in ("user_id", "item_id"):
        value = getattr(msg, name)
        if not 0 < value < rules.max_id:
            return "id_out_of_range", f"{name}={value}"
    if not rules.min_event_time_ms <= msg.event_time_ms <= latest_ms:
        return "time_out_of_range", f"event_time_ms={msg.event_time_ms}"
    if msg.HasField("value") and not math.isfinite(msg.value):
        return "nan_value", f"value={msg.value}"
    return None


def decode_records(
    records: Sequence[RawRecord], rules: ValidationRules = ValidationRules(), now_ms: int | None = None
) -> tuple[EventBatch, list[Rejected]]:
    """Split `records` into a valid EventBatch (arrival order kept) and rejections with reasons."""
    latest_ms = (int(time.time() * 1000) if now_ms is None else now_ms) + rules.max_future_ms
    n = len(records)
    user = np.empty(n, np.int64)
    item = np.empty(n, np.int64)
    action = np.empty(n, np.int8)
    value = np.empty(n, np.float64)
    ts = np.empty(n, np.int64)
    part = np.empty(n, np.int32)
    off = np.empty(n, np.int64)
    rejected: list[Rejected] = []
    msg = events_pb2.UserEvent()
    k = 0
    for rec in records:
        try:
            if rec.value is None:
                raise DecodeError("record has no value")
            msg.ParseFromString(rec.value)
        except DecodeError as exc:
            rejected.append(Rejected(rec, "undecodable", str(exc) or "not a protobuf message"))
            continue
        problem = _check(msg, rules, latest_ms)
        if problem is not None:
            rejected.append(Rejected(rec, *problem))
            continue
        user[k] = msg.user_id
        item[k] = msg.item_id
        action[k] = msg.action
        value[k] = msg.value if msg.HasField("value") else math.nan
        ts[k] = msg.event_time_ms
        part[k] = rec.partition
        off[k] = rec.offset
        k += 1
    batch = EventBatch(user[:k], item[:k], action[:k], value[:k], ts[:k], part[:k], off[:k])
    return batch, rejected
