"""Decode and validate raw event records into a columnar batch; refuse bad ones with a reason.

A bad event must never stop training nor be silently dropped: each rejected record keeps its
original bytes and gets one reason from REASONS, and the worker forwards it to the dead-letter
topic.
"""

from __future__ import annotations

import dataclasses
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
_VALID_ACTIONS = np.array(sorted(v for v in events_pb2.Action.values() if v != events_pb2.ACTION_UNSPECIFIED))


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


def concat_batches(batches: list[EventBatch]) -> EventBatch:
    """One batch of `batches`' events, in order."""
    if len(batches) == 1:
        return batches[0]
    return EventBatch(**{f.name: np.concatenate([getattr(b, f.name) for b in batches])
                         for f in dataclasses.fields(EventBatch)})


@dataclass(frozen=True)
class ValidationRules:
    min_event_time_ms: int = MIN_EVENT_TIME_MS
    max_future_ms: int = MAX_FUTURE_MS
    max_id: int = MAX_ID


def _reasons(cols: dict[str, np.ndarray], unknown: np.ndarray, rules: ValidationRules, latest_ms: int) -> np.ndarray:
    """Index into REASONS (or -1 = valid) for each parsed event, checked in bulk.

    Checks run in REASONS order, and the first failing one wins, so each event gets one reason.
    """
    user, item, action, value, ts = (cols[k] for k in ("user_id", "item_id", "action", "value", "event_time_ms"))
    reason = np.full(len(user), -1, np.int8)
    checks = (
        ("wrong_schema", unknown > 0),
        ("missing_field", (user == 0) | (item == 0) | (action == events_pb2.ACTION_UNSPECIFIED) | (ts == 0)),
        ("wrong_schema", ~np.isin(action, _VALID_ACTIONS)),
        ("id_out_of_range", (user < 0) | (user >= rules.max_id) | (item < 0) | (item >= rules.max_id)),
        ("time_out_of_range", (ts < rules.min_event_time_ms) | (ts > latest_ms)),
        ("nan_value", cols["has_value"] & ~np.isfinite(value)),
    )
    for name, failed in checks:
        reason[(reason < 0) & failed] = REASONS.index(name)
    return reason


def _detail(reason: str, msg: events_pb2.UserEvent) -> str:
    """A human-readable detail for one rejected event (only computed for the rejected ones)."""
    if reason == "wrong_schema":
        return f"fields UserEvent does not define, or unknown action {msg.action}"
    if reason == "missing_field":
        unset = [n for n in ("user_id", "item_id", "event_time_ms") if getattr(msg, n) == 0]
        return "unset: " + ",".join(unset + (["action"] if msg.action == 0 else []))
    if reason == "id_out_of_range":
        return f"user_id={msg.user_id} item_id={msg.item_id}"
    if reason == "time_out_of_range":
        return f"event_time_ms={msg.event_time_ms}"
    return f"value={msg.value}"


def decode_records(
    records: Sequence[RawRecord], rules: ValidationRules = ValidationRules(), now_ms: int | None = None
) -> tuple[EventBatch, list[Rejected]]:
    """Split `records` into a valid EventBatch (arrival order kept) and rejections with reasons.

    The per-record Python work is only the protobuf parse; validation runs on whole columns.
    """
    latest_ms = (int(time.time() * 1000) if now_ms is None else now_ms) + rules.max_future_ms
    parsed: list[RawRecord] = []
    rows: list[tuple[int, int, int, float, int, int]] = []
    rejected: list[Rejected] = []
    msg = events_pb2.UserEvent()
    nan = math.nan
    for rec in records:
        try:
            if rec.value is None:
                raise DecodeError("record has no value")
            msg.ParseFromString(rec.value)
        except DecodeError as exc:
            rejected.append(Rejected(rec, "undecodable", str(exc) or "not a protobuf message"))
            continue
        parsed.append(rec)
        has_value = msg.HasField("value")
        rows.append((msg.user_id, msg.item_id, msg.action, msg.value if has_value else nan, msg.event_time_ms,
                     len(unknown_fields.UnknownFieldSet(msg)), has_value))
    if not rows:
        return _empty_batch(), rejected
    user, item, action, value, ts, unknown, has_value = (np.array(c) for c in zip(*rows))
    value = value.astype(np.float64)
    cols = {"user_id": user.astype(np.int64), "item_id": item.astype(np.int64), "action": action.astype(np.int64),
            "value": value, "event_time_ms": ts.astype(np.int64),
            "has_value": has_value.astype(bool)}
    reason = _reasons(cols, unknown, rules, latest_ms)
    bad = np.flatnonzero(reason >= 0)
    if len(bad):
        for i in bad.tolist():
            msg.ParseFromString(parsed[i].value)
            name = REASONS[reason[i]]
            rejected.append(Rejected(parsed[i], name, _detail(name, msg)))
        rejected.sort(key=lambda r: (r.record.partition, r.record.offset))
    ok = reason < 0
    part = np.fromiter((r.partition for r in parsed), np.int32, len(parsed))
    off = np.fromiter((r.offset for r in parsed), np.int64, len(parsed))
    batch = EventBatch(cols["user_id"][ok], cols["item_id"][ok], cols["action"][ok].astype(np.int8), value[ok],
                       cols["event_time_ms"][ok], part[ok], off[ok])
    return batch, rejected


def _empty_batch() -> EventBatch:
    return EventBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0),
                      np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
