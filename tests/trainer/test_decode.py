"""Every kind of bad event is refused with its own reason; good events keep order and fields."""

import math
from dataclasses import dataclass

import pytest
from google.protobuf import descriptor_pb2

from liverec.platform.events import MIN_EVENT_TIME_MS, encode_event
from liverec.trainer.decode import REASONS, decode_records
from liverec.v1 import events_pb2

NOW_MS = 1_800_000_000_000
T = 1_700_000_000_000


@dataclass
class Rec:
    value: bytes | None
    partition: int = 0
    offset: int = 0
    topic: str = "events"
    key: bytes | None = None


def ev(**overrides) -> bytes:
    fields = dict(user_id=7, item_id=9, action=events_pb2.ACTION_CLICK, event_time_ms=T)
    fields.update(overrides)
    return events_pb2.UserEvent(**fields).SerializeToString()


BAD = {
    "undecodable": [b"\xff\xff\xff\xff", None],
    "wrong_schema": [descriptor_pb2.FileDescriptorProto(name="x.proto", package="p").SerializeToString(),
                     ev(action=77)],
    "missing_field": [ev(user_id=0), ev(item_id=0), ev(action=events_pb2.ACTION_UNSPECIFIED), ev(event_time_ms=0)],
    "id_out_of_range": [ev(user_id=-5), ev(item_id=2**62)],
    "time_out_of_range": [ev(event_time_ms=MIN_EVENT_TIME_MS - 1), ev(event_time_ms=NOW_MS + 25 * 3600 * 1000)],
    "nan_value": [ev(value=math.nan), ev(value=math.inf)],
}


def test_reasons_cover_the_documented_kinds() -> None:
    assert set(BAD) == set(REASONS)


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_kind_gets_its_reason(reason: str) -> None:
    records = [Rec(raw, offset=i) for i, raw in enumerate(BAD[reason])]
    batch, rejected = decode_records(records, now_ms=NOW_MS)
    assert len(batch) == 0
    assert [r.reason for r in rejected] == [reason] * len(records)
    assert [r.record.value for r in rejected] == [r.value for r in records]  # original bytes kept
    assert all(r.detail for r in rejected)


def test_good_events_survive_between_bad_ones_in_order() -> None:
    good = [encode_event(u, 100 + u, events_pb2.ACTION_RATE, u / 2, T + u) for u in range(1, 6)]
    good[2] = encode_event(3, 103, events_pb2.ACTION_VIEW, math.nan, T + 3)
    mixed = []
    for i, raw in enumerate(good):
        mixed.append(raw)
        mixed.append(BAD[REASONS[i]][0])
    records = [Rec(raw, partition=1, offset=i) for i, raw in enumerate(mixed)]
    batch, rejected = decode_records(records, now_ms=NOW_MS)
    assert batch.user_id.tolist() == [1, 2, 3, 4, 5]
    assert batch.item_id.tolist() == [101, 102, 103, 104, 105]
    assert batch.event_time_ms.tolist() == [T + u for u in range(1, 6)]
    assert batch.offset.tolist() == [0, 2, 4, 6, 8]
    assert batch.partition.tolist() == [1] * 5
    assert math.isnan(batch.value[2]) and batch.value[0] == 0.5
    assert batch.action.tolist() == [5, 5, 1, 5, 5]
    assert [r.reason for r in rejected] == list(REASONS[:5])
