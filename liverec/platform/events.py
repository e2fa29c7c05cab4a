"""UserEvent wire format: the Kafka key and value of each event record.

The key is the decimal user id, so Kafka's default partitioner keeps each user's events on one
partition, in order. The value is a serialized `liverec.v1.UserEvent`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from liverec.v1 import events_pb2

if TYPE_CHECKING:
    from liverec.platform.datasets import EventTable

Action = events_pb2.Action

# Validity of an event, enforced by the trainer (invalid events are dead-lettered).
# 2000-01-01T00:00:00Z: earlier event times are clock bugs or unit mix-ups (seconds for ms).
MIN_EVENT_TIME_MS = 946_684_800_000
MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_ID = 2**62  # ids must be positive and leave headroom below the hash index's sentinels


def event_key(user_id: int) -> bytes:
    return str(int(user_id)).encode()


def encode_event(user_id: int, item_id: int, action: int, value: float, event_time_ms: int,
                 context: dict[str, str] | None = None) -> bytes:
    """One event's bytes; `value` NaN means absent (the proto field stays unset)."""
    msg = events_pb2.UserEvent(user_id=user_id, item_id=item_id, action=action, event_time_ms=event_time_ms)
    if not math.isnan(value):
        msg.value = value
    if context:
        msg.context.update(context)
    return msg.SerializeToString()


def encode_table(table: EventTable, start: int = 0, stop: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs for rows [start, stop) of `table`, in table (event-time) order."""
    stop = len(table) if stop is None else stop
    users = table.user_id[start:stop].tolist()
    items = table.item_id[start:stop].tolist()
    actions = table.action[start:stop].tolist()
    values = table.value[start:stop].tolist()
    times = table.event_time_ms[start:stop].tolist()
    msg = events_pb2.UserEvent()
    for user, item, action, value, ts in zip(users, items, actions, values, times):
        msg.Clear()
        msg.user_id = user
        msg.item_id = item
        msg.action = action
        msg.event_time_ms = ts
        if value == value:  # not NaN
            msg.value = value
        yield event_key(user), msg.SerializeToString()


def sort_check(table: EventTable) -> None:
    """Replay requires event-time order; refuse a table that is not sorted."""
    if len(table) > 1 and bool(np.any(np.diff(table.event_time_ms) < 0)):
        raise ValueError("event table is not sorted by event time")
